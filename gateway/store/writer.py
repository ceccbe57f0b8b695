"""Group commit: the index rows of every association and request are written in batches, one at a time.

Each caller has already flushed its file's bytes; it hands the index row to :meth:`IndexWriter.submit` and waits.
Whichever caller finds no commit in progress (the leader) takes whatever is queued, fsyncs the (few) folders the new
files were linked into, writes all rows in one transaction and commits once, then wakes the callers whose rows it
committed; a caller whose row is still queued becomes the next leader. Under load many instances share one folder
fsync and one database commit; alone, an instance pays the same two flushes it would anyway, in its own thread,
with no hand-off to another thread and back.

Several processes may write one PostgreSQL index at once (several ``ingest`` roles): their transactions may race to
create the same study, series or revision, or index the same instance. Parents and revisions are inserted so that
a race is not an error (``ON CONFLICT DO NOTHING``, then a look at what the other process made); whatever still
conflicts (an instance indexed by the other process, a deadlock) rolls the batch back, and it is written again,
checking each instance (:data:`_ATTEMPTS` times at most). Locks are taken in one order in every transaction (series
by UID), which keeps deadlocks rare. SQLite's single writer lock makes none of this happen there.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Delete,
    Engine,
    Insert,
    Integer,
    Update,
    bindparam,
    case,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError, IntegrityError

from gateway.ingest.instance import ReceivedInstance
from gateway.store.files import fsync_dir
from gateway.store.index import Instance, RefusedInstance, Series, SeriesRevision, Study

log = logging.getLogger(__name__)

_MAX_BATCH = 256
_ATTEMPTS = 5  # tries of one batch: the first, then retries after a conflict with another writer
_RETRY_SLEEP_S = 0.005  # up to this long (times the retry's number) between tries: jitter, so racers part ways
#: SQLSTATEs of a transaction that lost a race and may simply be run again: serialization failure, deadlock.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})
_JITTER = random.SystemRandom()  # jitter only; SystemRandom needs no seeding

STUDY_FIELDS = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_description": "StudyDescription",
    "referring_physician_name": "ReferringPhysicianName",
}
SERIES_FIELDS = {
    "modality": "Modality",
    "series_number": "SeriesNumber",
    "series_description": "SeriesDescription",
    "body_part_examined": "BodyPartExamined",
}
INSTANCE_FIELDS = {
    "instance_number": "InstanceNumber",
    "rows": "Rows",
    "columns": "Columns",
    "number_of_frames": "NumberOfFrames",
}


@dataclass
class PendingRow:
    """One stored file waiting for its index row to be committed."""

    info: ReceivedInstance
    relpath: str
    size: int
    source: str
    received_at: float
    folder: Path
    done: threading.Event = field(default_factory=threading.Event)
    inserted: bool = False
    error: BaseException | None = None


class IndexWriter:
    """The single writer of instance rows (and the studies, series and revisions they create).

    There is no writer thread: the callers of :meth:`submit` take turns committing, one at a time, each turn
    committing every row queued by then (a group commit led by the caller whose turn it is).

    Parameters
    ----------
    engine
        An engine whose transactions take the write lock at once (SQLite ``BEGIN IMMEDIATE``).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._cache = WriterCache()  # used by the leader only
        self._pending: list[PendingRow] = []
        self._turn = threading.Condition()  # guards _pending, _leading and _stopped
        self._leading = False  # a caller is committing a batch
        self._stopped = False

    def submit(self, row: PendingRow) -> bool:
        """Commit ``row`` durably; ``True`` if it was inserted, ``False`` if the instance was already indexed.

        Raises
        ------
        RuntimeError
            If the writer has been stopped.
        Exception
            Whatever the database raised for the batch holding this row (nothing of the batch is committed).
        """
        with self._turn:
            if self._stopped:
                raise RuntimeError("the index writer is stopped")
            self._pending.append(row)
        while (batch := self._lead_or_wait(row)) is not None:
            self._commit_as_leader(batch)
        if row.error is not None:
            raise row.error
        return row.inserted

    def _lead_or_wait(self, row: PendingRow) -> list[PendingRow] | None:
        """Wait until ``row`` is committed (``None``) or no one leads; then lead: the queued rows to commit."""
        with self._turn:
            while self._leading and not row.done.is_set():
                self._turn.wait()
            if row.done.is_set():
                return None
            self._leading = True
            batch = self._pending[:_MAX_BATCH]
            del self._pending[:_MAX_BATCH]
            return batch

    def _commit_as_leader(self, batch: list[PendingRow]) -> None:
        try:
            self._commit(batch)
        finally:
            with self._turn:
                self._leading = False
                self._turn.notify_all()

    @property
    def running(self) -> bool:
        """Whether the writer takes rows (it has not been stopped)."""
        return not self._stopped

    def stop(self) -> None:
        """Refuse new rows, and wait (up to 30 s) until the rows already submitted are committed."""
        with self._turn:
            self._stopped = True
            self._turn.wait_for(lambda: not (self._leading or self._pending), timeout=30)

    def _commit(self, batch: list[PendingRow]) -> None:
        try:
            for folder in {row.folder for row in batch}:
                fsync_dir(folder)
            self._cache.learn(self._write(batch))  # only once committed
        except BaseException as exc:
            log.exception("index commit of %d instance(s) failed", len(batch))
            for row in batch:
                row.error = exc
        finally:
            for row in batch:
                row.done.set()

    def _write(self, batch: list[PendingRow]) -> WriterCache:
        """Write and commit ``batch``; after a conflict (an instance indexed meanwhile, here or by another process,
        or a race lost to another writer) write it again, checking each row, up to :data:`_ATTEMPTS` times."""
        for attempt in range(_ATTEMPTS):
            try:
                with self._engine.begin() as conn:
                    return write_rows(conn, batch, self._cache, check_existing=attempt > 0)
            except DBAPIError as exc:
                if attempt + 1 == _ATTEMPTS or not is_conflict(exc):
                    raise
                log.debug("index batch of %d row(s) conflicted (%s); writing it again", len(batch), type(exc).__name__)
            if attempt:  # the first retry (a duplicate, most often) goes at once
                time.sleep(_JITTER.uniform(0, _RETRY_SLEEP_S * attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")


def is_conflict(exc: BaseException) -> bool:
    """Whether a database error is one that running the transaction again may not meet: a unique key taken
    meanwhile (``IntegrityError``), or PostgreSQL's serialization failure or deadlock (SQLSTATE 40001, 40P01)."""
    if isinstance(exc, IntegrityError):
        return True
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)  # psycopg 3, psycopg2
    return code in _TRANSIENT_SQLSTATES


@dataclass
class WriterCache:
    """What the writer learnt from committed transactions, to skip queries in the next ones.

    Studies and series are never deleted, so a hit stays true. An open revision may have been completed or held
    since (by the completion monitor): its cached id is only used by an update conditional on its state being
    ``open`` or ``held`` (an arrival reopens a held revision).
    """

    studies: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    open_revisions: dict[str, int] = field(default_factory=dict)

    def learn(self, other: WriterCache) -> None:
        """Merge what one committed transaction established."""
        self.studies |= other.studies
        self.series |= other.series
        self.open_revisions.update(other.open_revisions)


#: The states of a revision that arrivals join: ``held`` waits for instances refused earlier, so it is reopened.
_JOINABLE = ("open", "held")

_BUMP_REVISION = (
    update(SeriesRevision)
    .where(SeriesRevision.id == bindparam("rid"), or_(*(SeriesRevision.state == state for state in _JOINABLE)))
    .values(
        state="open",
        last_received_at=case(
            (SeriesRevision.last_received_at > bindparam("last"), SeriesRevision.last_received_at),
            else_=bindparam("last"),
        ),
        instance_count=SeriesRevision.instance_count + bindparam("n"),
    )
)


class DriverStatement:
    """A Core statement compiled once per dialect and run on the DB-API cursor: the hot path skips SQLAlchemy's
    per-execution work (compilation cache look-up, parameter processing, result objects).

    It runs inside the caller's transaction (the same connection), and a driver's error is raised as SQLAlchemy's
    (:class:`~sqlalchemy.exc.IntegrityError`, :class:`~sqlalchemy.exc.OperationalError`, ...), as a Core execution
    would raise it. Parameters are plain Python values (strings, numbers, ``None``) that every DB-API driver binds
    without type processing (sqlite3's ``qmark`` tuples, psycopg's ``pyformat`` dicts).
    """

    def __init__(self, statement: Insert | Update | Delete) -> None:
        self._statement = statement
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def execute(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        """Run the statement once per parameter set in ``rows``; return the rows it changed, in all."""
        if not rows:
            return 0
        sql, order, defaults = self._compile(conn)
        params: list[Any] = [
            tuple({**defaults, **row}[key] for key in order) if order is not None else {**defaults, **row}
            for row in rows
        ]
        cursor = conn.connection.cursor()
        try:
            if len(params) == 1:
                cursor.execute(sql, params[0])
            else:
                cursor.executemany(sql, params)
            return int(cursor.rowcount)
        except conn.dialect.loaded_dbapi.Error as exc:
            dbapi_error = conn.dialect.loaded_dbapi.Error
            raise DBAPIError.instance(sql, params, exc, dbapi_error, dialect=conn.dialect) from exc
        finally:
            cursor.close()

    def _compile(self, conn: Connection) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        name = conn.dialect.name
        with self._lock:
            if name not in self._compiled:
                compiled = self._statement.compile(dialect=conn.dialect)
                order = tuple(compiled.positiontup or ()) if compiled.positional else None
                self._compiled[name] = (compiled.string, order, dict(compiled.params))
            return self._compiled[name]


_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "revision_id",
    "sop_class_uid",
    "transfer_syntax_uid",
    "path",
    "size",
    "source",
    "received_at",
    *INSTANCE_FIELDS,
)
_INSERT_INSTANCE = DriverStatement(insert(Instance).values({c: bindparam(c) for c in _INSTANCE_COLUMNS}))
_BUMP = DriverStatement(_BUMP_REVISION)
_CLEAR_REFUSAL = DriverStatement(delete(RefusedInstance).where(RefusedInstance.sop_instance_uid == bindparam("uid")))


def write_rows(
    conn: Connection, batch: list[PendingRow], cache: WriterCache | None = None, *, check_existing: bool = False
) -> WriterCache:
    """Insert the rows of ``batch``, with the studies, series and revisions they need.

    Without ``check_existing`` an instance already indexed makes the insert fail (``IntegrityError``); the caller
    retries with it, and such rows are then marked not inserted. The instances' refusals, if they were refused
    earlier (:func:`record_refusal`), are cleared. Returns what the transaction established.
    """
    cache = cache or WriterCache()
    learnt = WriterCache()
    seen: set[str] = set()
    if check_existing:
        uids = [row.info.sop_instance_uid for row in batch]
        seen = set(conn.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids))))
    fresh: list[PendingRow] = []
    for row in batch:
        row.inserted = row.info.sop_instance_uid not in seen
        if row.inserted:
            seen.add(row.info.sop_instance_uid)
            fresh.append(row)
    clear_refusals(conn, [row.info.sop_instance_uid for row in batch])
    if not fresh:
        return learnt
    learnt.studies, learnt.series = _insert_missing_parents(conn, fresh, cache)
    by_series: dict[str, list[PendingRow]] = defaultdict(list)
    for row in fresh:
        by_series[row.info.series_instance_uid].append(row)
    instances: list[dict[str, Any]] = []
    for series_uid, rows in sorted(by_series.items()):  # lock revisions in one order, as the completion monitor
        times = [r.received_at for r in rows]
        revision_id = _record_arrivals(conn, series_uid, times, cache.open_revisions.get(series_uid))
        learnt.open_revisions[series_uid] = revision_id
        instances.extend(_instance_values(r, revision_id) for r in rows)
    _INSERT_INSTANCE.execute(conn, instances)
    return learnt


def _insert_missing_parents(conn: Connection, rows: list[PendingRow], known: WriterCache) -> tuple[set[str], set[str]]:
    studies = {r.info.study_instance_uid: r for r in rows if r.info.study_instance_uid not in known.studies}
    _insert_new(conn, Study.study_instance_uid, studies, _study_values)
    series = {r.info.series_instance_uid: r for r in rows if r.info.series_instance_uid not in known.series}
    _insert_new(conn, Series.series_instance_uid, series, _series_values)
    return set(studies), set(series)


def _insert_new(
    conn: Connection,
    key: Any,
    candidates: dict[str, PendingRow],
    values: Callable[[str, PendingRow], dict[str, Any]],
) -> None:
    """Insert a row for each candidate UID not already in ``key``'s table."""
    if not candidates:
        return
    present = set(conn.scalars(select(key).where(key.in_(candidates))))
    new = [values(uid, row) for uid, row in sorted(candidates.items()) if uid not in present]
    if new:  # another process may be inserting the same UIDs: on PostgreSQL, its row is as good as ours
        conn.execute(_insert_ignoring_conflicts(conn, key.class_), new)


def _insert_ignoring_conflicts(conn: Connection, entity: Any) -> Insert:
    """An insert that skips rows whose key is taken, where writers race (PostgreSQL); a plain insert elsewhere
    (SQLite's writers take turns: a taken key there is a bug to hear of)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(entity).on_conflict_do_nothing()
    return insert(entity)


def _study_values(uid: str, row: PendingRow) -> dict[str, Any]:
    return {
        "study_instance_uid": uid,
        "created_at": row.received_at,
        **_fields(row.info, STUDY_FIELDS, Study.__table__),
    }


def _series_values(uid: str, row: PendingRow) -> dict[str, Any]:
    return {
        "series_instance_uid": uid,
        "study_instance_uid": row.info.study_instance_uid,
        "created_at": row.received_at,
        **_fields(row.info, SERIES_FIELDS, Series.__table__),
    }


def _record_arrivals(conn: Connection, series_uid: str, times: list[float], cached: int | None) -> int:
    """Add arrivals to the series' open or held revision (opening revision n+1 after a completion); its id.

    Another transaction may complete the revision read here before it is bumped (the completion monitor, in this
    process or another), or open the next revision first (another writer): the revision is read again until the
    arrivals are counted in one. Each round follows a change committed meanwhile, and a completion is final.
    """
    if cached is not None and _bump(conn, cached, times):
        return cached
    while True:
        latest = conn.execute(
            select(SeriesRevision.id, SeriesRevision.revision, SeriesRevision.state)
            .where(SeriesRevision.series_instance_uid == series_uid)
            .order_by(SeriesRevision.revision.desc())
            .limit(1)
        ).first()
        if latest is not None and latest.state in _JOINABLE and _bump(conn, int(latest.id), times):
            return int(latest.id)
        opened = _open_revision(conn, series_uid, 1 if latest is None else latest.revision + 1, times)
        if opened is not None:
            return opened


def _open_revision(conn: Connection, series_uid: str, revision: int, times: list[float]) -> int | None:
    """Insert an open revision holding the arrivals; its id, or ``None`` if another writer opened it first."""
    values = {
        "series_instance_uid": series_uid,
        "revision": revision,
        "state": "open",
        "first_received_at": min(times),
        "last_received_at": max(times),
        "instance_count": len(times),
    }
    if conn.dialect.name == "postgresql":
        statement = postgresql.insert(SeriesRevision).values(values).on_conflict_do_nothing()
        inserted = conn.execute(statement.returning(SeriesRevision.id)).scalar()
        return None if inserted is None else int(inserted)
    key = conn.execute(insert(SeriesRevision).values(values)).inserted_primary_key
    assert key is not None
    return int(key[0])


def _bump(conn: Connection, revision_id: int, times: list[float]) -> bool:
    """Count arrivals in a revision if it is open or held (then reopened); ``False`` if it has been completed."""
    return _BUMP.execute(conn, [{"rid": revision_id, "last": max(times), "n": len(times)}]) == 1


def _instance_values(row: PendingRow, revision_id: int) -> dict[str, Any]:
    info = row.info
    return {
        "sop_instance_uid": info.sop_instance_uid,
        "series_instance_uid": info.series_instance_uid,
        "study_instance_uid": info.study_instance_uid,
        "revision_id": revision_id,
        "sop_class_uid": info.sop_class_uid,
        "transfer_syntax_uid": info.transfer_syntax_uid,
        "path": row.relpath,
        "size": row.size,
        "source": row.source[:64],
        "received_at": row.received_at,
        **_fields(info, INSTANCE_FIELDS, Instance.__table__),
    }


def _fields(info: ReceivedInstance, mapping: dict[str, str], table: Any) -> dict[str, Any]:
    """The index columns of ``mapping`` from the received attributes, fitted to the columns' types.

    Received values are not trusted to conform: an integer that is not one is dropped, an over-long string is
    cut to the column's length (the file keeps the full value).
    """
    values: dict[str, Any] = {}
    for column, keyword in mapping.items():
        value = info.attributes.get(keyword)
        kind = table.c[column].type
        if isinstance(kind, Integer):
            value = _as_int(value)
        elif isinstance(value, str) and kind.length is not None:
            value = value[: kind.length]
        values[column] = value
    return values


def _as_int(value: object) -> int | None:
    try:
        number = int(str(value)) if value is not None else None
    except ValueError:
        return None
    return number if number is None or -(2**31) <= number < 2**31 else None


def record_refusal(conn: Connection, series_instance_uid: str, sop_instance_uid: str, reason: str, at: float) -> bool:
    """Remember an instance refused for want of resources, so that its series is held until it arrives.

    The series' open (or held) revision counts the refusal (``refused_count``). An instance already indexed is
    not recorded (its series lacks nothing), nor counted twice when refused again. ``True`` if newly recorded.
    """
    indexed = select(Instance.sop_instance_uid).where(Instance.sop_instance_uid == sop_instance_uid)
    known = select(RefusedInstance.sop_instance_uid).where(RefusedInstance.sop_instance_uid == sop_instance_uid)
    if conn.execute(indexed).first() is not None or conn.execute(known).first() is not None:
        return False
    values = {"sop_instance_uid": sop_instance_uid, "series_instance_uid": series_instance_uid}
    conn.execute(insert(RefusedInstance).values(**values, reason=reason[:64], at=at))
    latest = (
        select(SeriesRevision.id)
        .where(SeriesRevision.series_instance_uid == series_instance_uid)
        .order_by(SeriesRevision.revision.desc())
        .limit(1)
        .scalar_subquery()
    )
    conn.execute(
        update(SeriesRevision)
        .where(SeriesRevision.id == latest, SeriesRevision.state.in_(_JOINABLE))
        .values(refused_count=SeriesRevision.refused_count + 1)
    )
    return True


def clear_refusals(conn: Connection, sop_instance_uids: list[str]) -> int:
    """Forget the refusals of instances that have now arrived; return how many there were."""
    return _CLEAR_REFUSAL.execute(conn, [{"uid": uid} for uid in sop_instance_uids])
