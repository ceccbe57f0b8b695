"""Two ingest processes on one index (issue 13): their index writers and completion monitors race, and every instance
is indexed once, every series gets one revision per completion and every revision one job.

The processes are real (``spawn``ed, each with its own :class:`InstanceStore`, engine and writer threads) where the
outcome alone is checked; the races a scheduler rarely shows are staged on a real PostgreSQL server: one transaction
is held open at its commit until the other is seen waiting on its lock (``pg_stat_activity``), then let go.
"""

from __future__ import annotations

import multiprocessing
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import Engine, event, func, insert, select, text
from sqlalchemy.orm import Session

from gateway.config import StoreSettings
from gateway.ingest.completion import Completion, complete_quiet_series
from gateway.ingest.instance import ReceivedInstance
from gateway.store.index import Instance, Job, Series, SeriesRevision, Study, make_engine
from gateway.store.store import InstanceStore
from gateway.store.writer import IndexWriter, PendingRow, record_refusal, write_rows
from gateway.synth.ct import write_synthetic_ct

STUDY = "1.2.826.0.1.3680043.8.498.77"
SERIES_COUNT, SLICES = 20, 4
THREADS = 4  # per process: a DICOM listener stores from several associations at once
T0, QUIET = 1_700_000_000.0, 10.0
TIMEOUT_S = 180.0

both_backends = pytest.mark.parametrize("index_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    """Twenty small synthetic CT series of one study: per series, its slices' files."""
    root = tmp_path_factory.mktemp("series")
    for seed in range(SERIES_COUNT):
        write_synthetic_ct(root / f"s{seed:02d}", SLICES, rows=16, columns=16, seed=seed, study_instance_uid=STUDY)
    return [sorted((root / f"s{seed:02d}").glob("*.dcm")) for seed in range(SERIES_COUNT)]


@pytest.fixture
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """``None`` (the data folder's SQLite index) or a fresh database on a real PostgreSQL server."""
    return str(request.getfixturevalue("postgres_url")) if request.param == "postgresql" else None


def open_store(data_dir: Path, url: str | None) -> InstanceStore:
    """One process's store: its own engines and index writer on the shared data folder and index."""
    return InstanceStore(StoreSettings(data_dir=data_dir, min_free_bytes=0, database_url=url))


@pytest.fixture
def store(tmp_path: Path, index_url: str | None) -> Iterator[InstanceStore]:
    """The first process's store (it also makes the index's schema)."""
    s = open_store(tmp_path / "data", index_url)
    try:
        yield s
    finally:
        s.close()


def put_copy(store: InstanceStore, file: Path, now: float | None = None) -> bool:
    """Store a copy of ``file`` (the store consumes what it is given); whether it was a duplicate."""
    copy = store.temp_path()
    shutil.copyfile(file, copy)
    return store.put(copy, source="test", now=now).duplicate


def ingest_process(data_dir: str, url: str | None, files: list[str], start: Any, results: Any) -> None:
    """An ingest process: store ``files`` from :data:`THREADS` threads once every process is ready; report."""
    store = open_store(Path(data_dir), url)
    report: dict[str, Any] = {"inserted": 0, "duplicates": 0, "errors": []}
    lock = threading.Lock()

    def put(file: str) -> None:
        try:
            duplicate = put_copy(store, Path(file))
        except Exception as exc:
            with lock:
                report["errors"].append(f"{type(exc).__name__}: {exc}")
            return
        with lock:
            report["duplicates" if duplicate else "inserted"] += 1

    try:
        start.wait(timeout=60)
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(put, files))
    finally:
        store.close()
        results.put(report)


def ingest_at_once(data_dir: Path, url: str | None, shares: list[list[Path]]) -> list[dict[str, Any]]:
    """Run one ingest process per share, all storing at once; their reports."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(len(shares)), ctx.Queue()
    processes = [
        ctx.Process(target=ingest_process, args=(str(data_dir), url, [str(f) for f in share], start, results))
        for share in shares
    ]
    for process in processes:
        process.start()
    try:
        return [results.get(timeout=TIMEOUT_S) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def check_one_revision_per_series(store: InstanceStore, series_files: list[list[Path]]) -> None:
    """Every instance indexed once, and each series in one open revision counting all its instances."""
    with store.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == SERIES_COUNT * SLICES
        revisions = session.scalars(select(SeriesRevision)).all()
        counted = session.execute(select(Instance.revision_id, func.count()).group_by(Instance.revision_id))
        by_revision = {int(rid): int(n) for rid, n in counted}
    assert len(revisions) == len(series_files)
    assert {(r.revision, r.state, r.instance_count) for r in revisions} == {(1, "open", SLICES)}
    assert by_revision == {r.id: SLICES for r in revisions}


def check_one_job_per_series(store: InstanceStore) -> None:
    made = complete_quiet_series(store.write_sessions, 0.0, now=time.time() + 1)
    assert sorted(c.instance_count for c in made) == [SLICES] * SERIES_COUNT
    with store.sessions() as session:
        assert session.scalar(select(func.count(func.distinct(Job.series_instance_uid)))) == SERIES_COUNT


@both_backends
def test_two_ingest_processes_index_the_instances_of_shared_series_once(
    store: InstanceStore, index_url: str | None, series_files: list[list[Path]]
) -> None:
    # Each series' slices alternate between the processes, and each process goes through the series in turn.
    shares: list[list[Path]] = [[], []]
    for s, files in enumerate(series_files):
        for k, file in enumerate(files):
            shares[(s + k) % 2].append(file)
    reports = ingest_at_once(store.data_dir, index_url, [sorted(share, key=lambda f: f.name) for share in shares])
    assert [r["errors"] for r in reports] == [[], []]
    assert sum(r["inserted"] for r in reports) == SERIES_COUNT * SLICES
    assert sum(r["duplicates"] for r in reports) == 0
    check_one_revision_per_series(store, series_files)
    check_one_job_per_series(store)


@both_backends
def test_instances_sent_to_both_ingest_processes_at_once_are_indexed_once(
    store: InstanceStore, index_url: str | None, series_files: list[list[Path]]
) -> None:
    every = [file for files in series_files for file in files]
    reports = ingest_at_once(store.data_dir, index_url, [every, every[::-1]])
    assert [r["errors"] for r in reports] == [[], []]
    assert sum(r["inserted"] for r in reports) == SERIES_COUNT * SLICES
    assert sum(r["duplicates"] for r in reports) == SERIES_COUNT * SLICES
    check_one_revision_per_series(store, series_files)
    check_one_job_per_series(store)


@both_backends
def test_two_completion_monitors_make_one_job_per_revision(
    store: InstanceStore, index_url: str | None, series_files: list[list[Path]]
) -> None:
    other = open_store(store.data_dir, index_url)  # the second process's engines
    try:
        for k in range(3):  # revision k+1 of every series: one slice each, then both monitors at once
            arrived = T0 + 100 * k
            for files in series_files:
                put_copy(store, files[k], now=arrived)
            completed = [c for made in complete_in_two_threads([store, other], arrived + QUIET + 1) for c in made]
            assert sorted(c.revision for c in completed) == [k + 1] * SERIES_COUNT
            assert len({c.series_instance_uid for c in completed}) == SERIES_COUNT
    finally:
        other.close()
    with store.sessions() as session:
        jobs = session.scalars(select(Job)).all()
        states = set(session.scalars(select(SeriesRevision.state)))
    assert len(jobs) == len({j.revision_id for j in jobs}) == 3 * SERIES_COUNT
    assert states == {"complete"}


def complete_in_two_threads(stores: list[InstanceStore], now: float) -> list[list[Completion]]:
    """Each store's :func:`complete_quiet_series` from its own thread, started together; what each made."""
    start = threading.Barrier(len(stores))

    def check(s: InstanceStore) -> list[Completion]:
        start.wait(timeout=30)
        return complete_quiet_series(s.write_sessions, QUIET, now=now)

    with ThreadPoolExecutor(len(stores)) as pool:
        return list(pool.map(check, stores))


# Races staged on PostgreSQL: one transaction waits for another's commit.


def wait_for_lock_waiter(url: str) -> None:
    """Return once a session of the database waits on a lock (fail after 30 s)."""
    engine = make_engine(url)
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                if conn.scalar(query):
                    return
            time.sleep(0.01)
        pytest.fail("no session came to wait on a lock")
    finally:
        engine.dispose()


class Racer:
    """Run ``work`` in a thread; keep what it returned or raised."""

    def __init__(self, work: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._work = work
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._work()
        except BaseException as exc:
            self.error = exc

    def join(self) -> object:
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the racing transaction never finished"
        if self.error is not None:
            raise self.error
        return self.result


def on_first_commit(engine: Engine, hook: Callable[[], None]) -> None:
    """Call ``hook`` as the next transaction of ``engine`` commits (its locks still held), once."""
    fired: list[bool] = []

    def before(_conn: object) -> None:
        if not fired:
            fired.append(True)
            hook()

    event.listen(engine, "commit", before)


def _row(uid: str, series: str, folder: Path, at: float = T0) -> PendingRow:
    info = ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=uid,
        study_instance_uid=STUDY,
        series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        attributes={"Modality": "CT"},
    )
    return PendingRow(info, f"instances/{uid}.dcm", 123, "dimse:TEST", at, folder)


@pytest.fixture
def engines(postgres_url: str) -> Iterator[tuple[Engine, Engine]]:
    """Two writer engines on one PostgreSQL index: two processes' connections."""
    pair = (make_engine(postgres_url, writer=True), make_engine(postgres_url, writer=True))
    yield pair
    for engine in pair:
        engine.dispose()


def test_two_writers_opening_the_first_revision_share_it(
    engines: tuple[Engine, Engine], postgres_url: str, tmp_path: Path
) -> None:
    first, second = engines
    series = "1.2.3.9"
    with first.begin() as conn:  # the series is known, no revision yet
        conn.execute(insert(Study).values(study_instance_uid=STUDY, created_at=T0))
        conn.execute(insert(Series).values(series_instance_uid=series, study_instance_uid=STUDY, created_at=T0))
    rollbacks: list[object] = []
    event.listen(second, "rollback", rollbacks.append)
    racer: list[Racer] = []

    def second_opens_it_too() -> None:  # revision 1 is inserted, not committed: the second writer's insert waits
        racer.append(Racer(lambda: IndexWriter(second).submit(_row("1.2.3.9.2", series, tmp_path, T0 + 1))))
        wait_for_lock_waiter(postgres_url)

    on_first_commit(first, second_opens_it_too)
    assert IndexWriter(first).submit(_row("1.2.3.9.1", series, tmp_path))
    assert racer[0].join() is True
    assert rollbacks == []  # the second insert gave way (ON CONFLICT DO NOTHING): no batch was written again
    with first.connect() as conn:
        revision = conn.execute(select(SeriesRevision)).one()
        revision_ids = set(conn.scalars(select(Instance.revision_id)))
    assert (revision.revision, revision.instance_count, revision.last_received_at) == (1, 2, T0 + 1)
    assert revision_ids == {revision.id}


def test_a_writer_that_loses_a_deadlock_writes_its_batch_again(
    engines: tuple[Engine, Engine], postgres_url: str, tmp_path: Path
) -> None:
    writer_engine, other = engines
    series = "1.2.3.8"
    with other.begin() as conn:  # an open revision, and an instance of it refused earlier (sent again below)
        write_rows(conn, [_row("1.2.3.8.1", series, tmp_path)])
        assert record_refusal(conn, series, "1.2.3.8.2", "disk full", T0)
    rollbacks: list[object] = []
    event.listen(writer_engine, "rollback", rollbacks.append)
    with other.connect() as conn, conn.begin():
        conn.execute(text("SET LOCAL deadlock_timeout = '20s'"))  # the writer finds the deadlock, and loses it
        conn.execute(text("UPDATE series_revisions SET instance_count = instance_count"))  # locks the revision
        # The writer deletes the refusal (row locked), then waits on the revision...
        racer = Racer(lambda: IndexWriter(writer_engine).submit(_row("1.2.3.8.2", series, tmp_path, T0 + 1)))
        wait_for_lock_waiter(postgres_url)
        # ... and this transaction waits on the refusal: a deadlock, which PostgreSQL breaks by failing the writer.
        conn.execute(text("DELETE FROM refused_instances"))
    assert racer.join() is True
    assert len(rollbacks) >= 1
    with other.connect() as conn:
        assert conn.execute(select(SeriesRevision.instance_count)).scalar_one() == 2
        assert conn.scalar(select(func.count()).select_from(Instance)) == 2


@pytest.fixture
def pg_stores(tmp_path: Path, postgres_url: str) -> Iterator[tuple[InstanceStore, InstanceStore, InstanceStore]]:
    """Three processes' stores on one PostgreSQL index and data folder: a writer, a monitor, a writer new to it."""
    stores = tuple(open_store(tmp_path / "data", postgres_url) for _ in range(3))
    try:
        yield stores  # type: ignore[misc]
    finally:
        for s in stores:
            s.close()


def series_revisions(session: Session) -> list[tuple[int, str, int]]:
    rows = session.scalars(select(SeriesRevision).order_by(SeriesRevision.revision))
    return [(r.revision, r.state, r.instance_count) for r in rows]


@pytest.mark.parametrize("writer", ["cached", "fresh"], ids=["same-writer", "other-writer"])
def test_an_arrival_committed_after_the_completion_opens_the_next_revision(
    pg_stores: tuple[InstanceStore, InstanceStore, InstanceStore],
    postgres_url: str,
    series_files: list[list[Path]],
    writer: str,
) -> None:
    first, monitor, fresh = pg_stores
    files = series_files[0]
    for file in files[:3]:
        put_copy(first, file, now=T0)
    late = first if writer == "cached" else fresh  # "fresh" reads the revision as open, then waits to bump it
    racer: list[Racer] = []

    def arrival_waits() -> None:  # the revision is claimed and its job made, not committed yet
        racer.append(Racer(lambda: put_copy(late, files[3], now=T0 + QUIET + 2)))
        wait_for_lock_waiter(postgres_url)

    on_first_commit(monitor.write_engine, arrival_waits)
    made = complete_quiet_series(monitor.write_sessions, QUIET, now=T0 + QUIET + 1)
    assert racer[0].join() is False  # stored, not a duplicate
    assert [(c.revision, c.instance_count) for c in made] == [(1, 3)]
    with first.sessions() as session:
        assert series_revisions(session) == [(1, "complete", 3), (2, "open", 1)]
        late_revision = session.scalar(select(SeriesRevision.id).where(SeriesRevision.revision == 2))
        in_late = session.scalars(select(Instance.sop_instance_uid).where(Instance.revision_id == late_revision))
        assert list(in_late) == [pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID]
    again = complete_quiet_series(monitor.write_sessions, QUIET, now=T0 + 2 * QUIET + 3)
    assert [(c.revision, c.instance_count) for c in again] == [(2, 1)]


def test_an_arrival_committed_before_the_completion_keeps_the_revision_open(
    pg_stores: tuple[InstanceStore, InstanceStore, InstanceStore],
    postgres_url: str,
    series_files: list[list[Path]],
) -> None:
    first, monitor, _ = pg_stores
    files = series_files[1]
    for file in files[:3]:
        put_copy(first, file, now=T0)
    racer: list[Racer] = []

    def completion_waits() -> None:  # the arrival is counted in the revision, not committed yet
        racer.append(Racer(lambda: complete_quiet_series(monitor.write_sessions, QUIET, now=T0 + QUIET + 1)))
        wait_for_lock_waiter(postgres_url)

    on_first_commit(first.write_engine, completion_waits)
    assert put_copy(first, files[3], now=T0 + 5) is False
    assert racer[0].join() == []  # the revision was quiet when read, not when claimed
    with first.sessions() as session:
        assert series_revisions(session) == [(1, "open", 4)]
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    made = complete_quiet_series(monitor.write_sessions, QUIET, now=T0 + 5 + QUIET + 1)
    assert [(c.revision, c.instance_count) for c in made] == [(1, 4)]
