"""The index writer on a real SQLite index and a real PostgreSQL one: its hot path (DB-API statements: rows,
revisions, refusals, conflicts) and the group commit led by the submitting threads (every row committed once, errors
to their own batch, stop). Several writers at once on one PostgreSQL index: tests/store/test_two_ingest.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.exc import IntegrityError

from gateway.ingest.instance import ReceivedInstance
from gateway.store.index import Instance, RefusedInstance, SeriesRevision, make_engine
from gateway.store.writer import IndexWriter, PendingRow, WriterCache, clear_refusals, record_refusal, write_rows

SERIES, STUDY = "1.2.3.4", "1.2.3"
THREADS, PER_THREAD = 8, 25


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A writer engine on a fresh SQLite index, or a fresh database of a real PostgreSQL server (psycopg)."""
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url, writer=True)
    yield engine
    engine.dispose()


def _row(uid: str, tmp_path: Path, at: float = 1000.0, **attributes: str | int | None) -> PendingRow:
    info = ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=uid,
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        attributes={"Modality": "CT", "InstanceNumber": 7, "Rows": 512, "Columns": "x", **attributes},
    )
    return PendingRow(info, f"instances/{uid}.dcm", 123, "dimse:TEST", at, tmp_path)


def test_rows_and_revision_counts(engine: Engine, tmp_path: Path) -> None:
    cache = WriterCache()
    with engine.begin() as conn:
        cache.learn(write_rows(conn, [_row("1.2.3.4.1", tmp_path), _row("1.2.3.4.2", tmp_path, 1001.0)], cache))
    with engine.begin() as conn:  # the cached open revision is bumped through the driver statement
        cache.learn(write_rows(conn, [_row("1.2.3.4.3", tmp_path, 1005.0)], cache))
    with engine.connect() as conn:
        rows = conn.execute(select(Instance).order_by(Instance.sop_instance_uid)).all()
        revision = conn.execute(select(SeriesRevision)).one()
    assert [r.sop_instance_uid for r in rows] == ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]
    assert (rows[0].instance_number, rows[0].rows, rows[0].columns, rows[0].source) == (7, 512, None, "dimse:TEST")
    assert {r.revision_id for r in rows} == {revision.id}
    assert (revision.instance_count, revision.state, revision.last_received_at) == (3, "open", 1005.0)


def test_a_conflict_is_sqlalchemys_integrity_error_and_the_retry_skips_it(engine: Engine, tmp_path: Path) -> None:
    with engine.begin() as conn:
        write_rows(conn, [_row("1.2.3.4.1", tmp_path)])
    batch = [_row("1.2.3.4.1", tmp_path), _row("1.2.3.4.2", tmp_path)]
    with pytest.raises(IntegrityError), engine.begin() as conn:
        write_rows(conn, batch)
    with engine.begin() as conn:
        write_rows(conn, batch, check_existing=True)
    assert [row.inserted for row in batch] == [False, True]
    with engine.connect() as conn:
        assert conn.execute(select(SeriesRevision.instance_count)).scalar_one() == 2


def test_an_arrival_clears_its_refusal(engine: Engine, tmp_path: Path) -> None:
    with engine.begin() as conn:
        write_rows(conn, [_row("1.2.3.4.1", tmp_path)])
        assert record_refusal(conn, SERIES, "1.2.3.4.2", "disk full", 1001.0)
        assert record_refusal(conn, SERIES, "1.2.3.4.3", "disk full", 1001.0)
    with engine.begin() as conn:
        write_rows(conn, [_row("1.2.3.4.2", tmp_path)])
    with engine.connect() as conn:
        left = conn.scalars(select(RefusedInstance.sop_instance_uid)).all()
    assert left == ["1.2.3.4.3"]


def _submit_concurrently(writer: IndexWriter, folder: Path) -> list[bool]:
    """Every thread submits its rows one after the other, all threads starting together; the results."""
    results: list[bool] = []
    lock, start = threading.Lock(), threading.Barrier(THREADS)

    def work(t: int) -> None:
        start.wait()
        for i in range(PER_THREAD):
            inserted = writer.submit(_row(f"1.2.3.4.{t}.{i}", folder))
            with lock:
                results.append(inserted)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_concurrent_submits_are_each_committed_once(engine: Engine, tmp_path: Path) -> None:
    commits = [0]
    event.listen(engine, "commit", lambda conn: commits.__setitem__(0, commits[0] + 1))
    writer = IndexWriter(engine)
    assert _submit_concurrently(writer, tmp_path) == [True] * (THREADS * PER_THREAD)
    assert 1 <= commits[0] <= THREADS * PER_THREAD
    assert _submit_concurrently(writer, tmp_path) == [False] * (THREADS * PER_THREAD)  # all duplicates now
    writer.stop()
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Instance)) == THREADS * PER_THREAD
        assert conn.execute(select(SeriesRevision.instance_count)).scalar_one() == THREADS * PER_THREAD


def test_a_failed_batch_fails_its_rows_and_the_next_caller_leads(engine: Engine, tmp_path: Path) -> None:
    writer = IndexWriter(engine)
    with pytest.raises(FileNotFoundError):  # its folder cannot be fsynced: nothing of the batch is committed
        writer.submit(_row("1.2.3.4.1", tmp_path / "missing"))
    assert writer.submit(_row("1.2.3.4.2", tmp_path))
    writer.stop()
    with engine.connect() as conn:
        assert conn.scalars(select(Instance.sop_instance_uid)).all() == ["1.2.3.4.2"]


def test_a_stopped_writer_refuses_rows(engine: Engine, tmp_path: Path) -> None:
    writer = IndexWriter(engine)
    assert writer.running
    writer.stop()
    assert not writer.running
    with pytest.raises(RuntimeError, match="stopped"):
        writer.submit(_row("1.2.3.4.1", tmp_path))


def test_driver_statements_count_every_parameter_set(engine: Engine, tmp_path: Path) -> None:
    with engine.begin() as conn:
        write_rows(conn, [_row("1.2.3.4.1", tmp_path)])
        for uid in ("1.2.3.4.2", "1.2.3.4.3"):
            assert record_refusal(conn, SERIES, uid, "disk full", 1001.0)
    with engine.begin() as conn:  # one executemany: the rows changed by all of its parameter sets
        assert clear_refusals(conn, ["1.2.3.4.2", "1.2.3.4.9", "1.2.3.4.3"]) == 2


def test_arrivals_after_a_completion_open_the_next_revision(engine: Engine, tmp_path: Path) -> None:
    cache = WriterCache()
    with engine.begin() as conn:
        cache.learn(write_rows(conn, [_row("1.2.3.4.1", tmp_path)], cache))
        conn.execute(update(SeriesRevision).values(state="complete", completed_at=1002.0))  # as the monitor does
    for at, writer_cache in ((1003.0, cache), (1004.0, WriterCache())):  # the cached id, and another process's
        with engine.begin() as conn:
            cache.learn(write_rows(conn, [_row(f"1.2.3.4.{at:.0f}", tmp_path, at)], writer_cache))
    with engine.connect() as conn:
        revisions = conn.execute(select(SeriesRevision).order_by(SeriesRevision.revision)).all()
        second = conn.scalars(select(Instance.revision_id).where(Instance.sop_instance_uid != "1.2.3.4.1")).all()
    assert [(r.revision, r.state, r.instance_count) for r in revisions] == [(1, "complete", 1), (2, "open", 2)]
    assert second == [revisions[1].id] * 2
