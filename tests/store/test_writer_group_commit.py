"""Group commit led by the submitting threads: every row committed once, errors to their own batch, stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, func, select

from gateway.ingest.instance import ReceivedInstance
from gateway.store.index import Instance, SeriesRevision, make_engine
from gateway.store.writer import IndexWriter, PendingRow

SERIES, STUDY = "1.2.3.4", "1.2.3"
THREADS, PER_THREAD = 8, 25


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}", writer=True)
    yield engine
    engine.dispose()


def _row(uid: str, folder: Path) -> PendingRow:
    info = ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=uid,
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        attributes={"Modality": "CT"},
    )
    return PendingRow(info, f"instances/{uid}.dcm", 123, "dimse:TEST", 1000.0, folder)


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
