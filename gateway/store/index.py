"""The SQL index of what the gateway holds: studies, series, revisions, instances, jobs, outputs, deliveries, models.

Portable SQLAlchemy 2 schema (no SQLite-only types), so PostgreSQL can take over; SQLite is the embedded
default, opened in WAL mode with ``synchronous=FULL`` and ``BEGIN IMMEDIATE`` transactions so that concurrent
writers queue instead of failing. The schema is versioned by the Alembic revisions of
:mod:`gateway.store.migrations`: a writer engine (:func:`make_engine`) brings the database to this gateway's schema,
so a table or column added here needs a revision there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from gateway.errors import IndexSchemaError

log = logging.getLogger(__name__)

_UID = String(64)


class Base(DeclarativeBase):
    """Declarative base of the index tables."""


class Study(Base):
    """One study (patient/study-level attributes of its first received instance)."""

    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(_UID, primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324), index=True)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    created_at: Mapped[float] = mapped_column(Float)


class Series(Base):
    """One series of a study."""

    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(_UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_instance_uid"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)


class SeriesRevision(Base):
    """A run of arrivals for one series; closed ("complete") after the quiet period.

    Instances that arrive after a revision completed open the next revision, so that each completion is a
    distinct, recorded event (and a distinct job), never a silent merge.
    """

    __tablename__ = "series_revisions"
    __table_args__ = (UniqueConstraint("series_instance_uid", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(ForeignKey("series.series_instance_uid"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)  # "open" | "held" | "complete"
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float, index=True)
    completed_at: Mapped[float | None] = mapped_column(Float)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Instances of this series refused for want of resources (0xA700) while the revision was open: the revision is
    # then ``held`` at completion, not run on a partial series, until it is complete or an operator releases it.
    refused_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class RefusedInstance(Base):
    """An instance refused for want of resources (0xA700: low disk, inflate limit) and not received since.

    Its series' revision is held at completion while any such row remains (:mod:`gateway.ingest.completion`); the
    row goes when the instance arrives (stored or duplicate) or when an operator releases the series. No foreign
    key: the series may not be indexed yet (its first instance refused).
    """

    __tablename__ = "refused_instances"

    sop_instance_uid: Mapped[str] = mapped_column(_UID, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(_UID, index=True)
    reason: Mapped[str] = mapped_column(String(64))
    at: Mapped[float] = mapped_column(Float)


class Instance(Base):
    """One stored instance: where its bytes are and what the searches need."""

    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(_UID, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(ForeignKey("series.series_instance_uid"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_instance_uid"), index=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("series_revisions.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(_UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(_UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    """The work for one completed series revision; later stages drive its ``state`` forward."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("series_revisions.id"), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(_UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(_UID, index=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The lease of the worker running a stage (gateway.jobs.runner): who, until when; an expired lease is reclaimed.
    lease_owner: Mapped[str | None] = mapped_column(String(64), index=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # claims from a durable state
    finished_at: Mapped[float | None] = mapped_column(Float, index=True)  # reached exported, skipped or failed
    purged_at: Mapped[float | None] = mapped_column(Float)  # its series' instances were removed by retention


class Output(Base):
    """One DICOM object the gateway made for a job (a SEG, SR, presentation state, KO, key image or Parametric Map).

    Written when the job's outputs are encoded (:mod:`gateway.jobs.encoding`, an upsert: a re-run makes the same
    UIDs), removed when retention purges the job's outputs; searched and retrieved by QIDO-RS and WADO-RS beside
    the received instances (:mod:`gateway.store.outputs`). Kept apart from ``instances`` so that the gateway's own
    results never open a series revision, and so never a job. ``path`` is relative to the data folder when the file
    lies inside it. ``job_id`` is the job that wrote the file last.
    """

    __tablename__ = "outputs"

    sop_instance_uid: Mapped[str] = mapped_column(_UID, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(_UID, index=True)
    study_instance_uid: Mapped[str] = mapped_column(_UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(_UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(_UID)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class Delivery(Base):
    """One output file of a job to send to one export destination: the durable queue of :mod:`gateway.export`.

    ``state`` is ``pending`` (due at ``next_attempt_at``), ``sending`` (claimed by a worker under ``claim``),
    ``delivered``, ``refused`` (the destination does not take its SOP class) or ``dead``; ``history`` lists every
    attempt (``at``, ``outcome``, ``status``, ``reason``).
    ``path`` is relative to the data folder when the file lies inside it.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "sop_instance_uid", "destination"),
        Index("ix_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    sop_class_uid: Mapped[str] = mapped_column(_UID)
    sop_instance_uid: Mapped[str] = mapped_column(_UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(_UID)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    claim: Mapped[str | None] = mapped_column(String(32), index=True)
    # The process whose workers hold the claim (``host/pid/token``) and until when: a claim whose process is gone
    # or whose lease lapsed goes back to ``pending``; a live one is left alone (several export processes).
    claim_owner: Mapped[str | None] = mapped_column(String(64), index=True)
    claim_expires_at: Mapped[float | None] = mapped_column(Float)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(1024))
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float)


class ModelVersion(Base):
    """A registered model version (:mod:`gateway.registry.registry`); its package is ``models/<name>/<version>``.

    ``enabled`` is the model's (the same on every version of a name); ``active`` marks the version routing uses;
    ``pinned`` says it was chosen with ``enable`` (a newer registration does not replace it). ``changed_at`` is
    set when the version is registered and each time its model is enabled: a version that failed to load is not
    loaded again until it changes (``NULL`` in an index made before it: read as ``registered_at``).
    """

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    active: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[float] = mapped_column(Float)
    changed_at: Mapped[float | None] = mapped_column(Float)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    dry_run: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RemovedModel(Base):
    """A model version the operator removed (:meth:`gateway.registry.registry.Registry.remove`): a tombstone.

    Written in the removal's transaction, so that registering the shipped packages at start does not bring the
    version back; registering the package explicitly clears it. ``sha256`` is the removed weights' digest.
    """

    __tablename__ = "removed_models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(32), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    removed_at: Mapped[float] = mapped_column(Float)


def _sqlite_pragmas(*, foreign_keys: bool) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" hook issue BEGIN IMMEDIATE
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return on_connect


def _create_engine(url: str, *, writer: bool, foreign_keys: bool = True, **kwargs: Any) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, **kwargs)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
    event.listen(engine, "connect", _sqlite_pragmas(foreign_keys=foreign_keys))
    begin = "BEGIN IMMEDIATE" if writer else "BEGIN"
    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
    return engine


def make_engine(url: str, *, writer: bool = False) -> Engine:
    """Create an index engine; a ``writer`` engine first brings the database to this gateway's schema.

    SQLite gets WAL and ``synchronous=FULL``; a ``writer`` engine opens its transactions with
    ``BEGIN IMMEDIATE`` (writers queue on the lock instead of failing on upgrade), the others with a plain
    ``BEGIN`` (WAL readers never block the writer). Other databases get a plain pooled engine either way.

    Raises
    ------
    IndexSchemaError
        The database was made by a newer gateway, or cannot be upgraded (see :func:`upgrade_index`).
    """
    engine = _create_engine(url, writer=writer)
    if writer:
        try:
            upgrade_index(url)
        except BaseException:
            engine.dispose()
            raise
    return engine


def upgrade_index(url: str) -> None:
    """Bring the index at ``url`` to this gateway's schema (:mod:`gateway.store.migrations`), if it is not there.

    Creates a fresh database, upgrades one made by an older gateway (0.1.0's included) in place, and refuses one
    made by a newer gateway. One process at a time: the migration runs in a transaction that holds the database's
    write lock (SQLite: ``BEGIN IMMEDIATE``) or its migration lock (PostgreSQL: an advisory lock), so a second
    process starting at once waits, then finds the schema at head. SQLite migrates with foreign keys off (so that
    a revision may copy a table, as batch operations do) and checks them all before committing.

    Raises
    ------
    IndexSchemaError
        The database is at a revision this gateway does not know, or a revision broke a foreign key.
    """
    from gateway.store.migrations import upgrade_to_head  # imports Alembic: only when a writer opens the index

    engine = _create_engine(url, writer=True, foreign_keys=False, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            changed = upgrade_to_head(conn)
            if changed is not None and conn.dialect.name == "sqlite":
                _check_foreign_keys(conn)
    finally:
        engine.dispose()
    if changed is not None:
        before, after = changed
        if before is None:
            log.info("index schema created at revision %s", after)
        else:
            log.info("index schema upgraded from %s to %s", before, after)


def _check_foreign_keys(conn: Connection) -> None:
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = ", ".join(sorted({str(row[0]) for row in broken}))
        raise IndexSchemaError(f"the index's schema upgrade would break foreign keys in {tables}; nothing changed")


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    """Return the session factory used by every stage (objects stay usable after commit)."""
    return sessionmaker(engine, expire_on_commit=False)


class JobClaim(Base):
    """One lease of a job by a worker, from its claim to its end: the record that no two leases of a job overlap.

    Written in the transactions that claim, move, hand back, fail or take back the job (:mod:`gateway.jobs.lifecycle`).
    ``ended_at`` is when the lease ended: when the job reached a state no worker holds, was handed back or failed,
    or, for a lease taken back from a gone worker, when that lease expired (or when it was taken, if earlier);
    ``outcome`` says how (the state reached, ``handed back``, ``taken back``). An open claim has neither.
    """

    __tablename__ = "job_claims"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    claimed_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str | None] = mapped_column(String(64))


class Worker(Base):
    """A gateway process sharing the index (``gateway serve --role ...``), as it last reported itself.

    ``owner`` is the name its job leases and delivery claims carry (``host/pid/token``); ``roles`` the comma-separated
    roles it runs (``ingest``, ``worker``, ``export``); ``device`` the inference device of a worker role;
    ``models`` the model names it runs (``None``: every model). ``heartbeat_at`` is renewed while it runs;
    ``stopped_at`` is set when it stops cleanly. A process whose heartbeat is older than a few leases is gone.
    """

    __tablename__ = "workers"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    roles: Mapped[str] = mapped_column(String(64))
    device: Mapped[str | None] = mapped_column(String(32))
    models: Mapped[list[str] | None] = mapped_column(JSON)
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float, index=True)
    stopped_at: Mapped[float | None] = mapped_column(Float)
