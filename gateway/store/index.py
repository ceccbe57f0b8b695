"""The SQL index of what the gateway holds: studies, series, revisions, instances, jobs, deliveries and models.

Portable SQLAlchemy 2 schema (no SQLite-only types), so PostgreSQL can take over; SQLite is the embedded
default, opened in WAL mode with ``synchronous=FULL`` and ``BEGIN IMMEDIATE`` transactions so that concurrent
writers queue instead of failing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
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
    state: Mapped[str] = mapped_column(String(16), index=True)  # "open" | "complete"
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float, index=True)
    completed_at: Mapped[float | None] = mapped_column(Float)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Instances of this series refused for want of resources (0xA700) while the revision was open: the revision is
    # then ``held`` at completion, not run on a partial series, until it is complete or an operator releases it.
    refused_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


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
    purged_at: Mapped[float | None] = mapped_column(Float)  # its outputs were removed by retention


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
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(1024))
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float)


class ModelVersion(Base):
    """A registered model version (:mod:`gateway.registry.registry`); its package is ``models/<name>/<version>``.

    ``enabled`` is the model's (the same on every version of a name); ``active`` marks the version routing uses;
    ``pinned`` says it was chosen with ``enable`` (a newer registration does not replace it).
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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" hook issue BEGIN IMMEDIATE
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str, *, writer: bool = False) -> Engine:
    """Create an index engine and the tables.

    SQLite gets WAL and ``synchronous=FULL``; a ``writer`` engine opens its transactions with
    ``BEGIN IMMEDIATE`` (writers queue on the lock instead of failing on upgrade), the others with a plain
    ``BEGIN`` (WAL readers never block the writer). Other databases get a plain pooled engine either way.
    """
    if not url.startswith("sqlite"):
        engine = create_engine(url, pool_pre_ping=True)
    else:
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        begin = "BEGIN IMMEDIATE" if writer else "BEGIN"
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
    Base.metadata.create_all(engine)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    """Return the session factory used by every stage (objects stay usable after commit)."""
    return sessionmaker(engine, expire_on_commit=False)
