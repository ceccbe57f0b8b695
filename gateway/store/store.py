"""The instance store: received files in, durable files and committed index rows out.

An instance is only reported as stored once its bytes are fsynced in place and its index row is committed; the
callers (DIMSE handler, STOW-RS route) acknowledge only then. An instance refused for want of resources (0xA700:
low disk, a deflated data set past the inflate limit) is remembered by its UIDs, so that its series is held, not
run on what was stored of it, until it is sent again (:mod:`gateway.ingest.completion`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from gateway.config import IngestSettings, StoreSettings
from gateway.errors import OutOfResources, StudyMismatch
from gateway.ingest.instance import (
    DEFAULT_INFLATE_LIMIT,
    InflateLimit,
    ReceivedInstance,
    check_identity,
    peek_uids,
    read_received,
)
from gateway.store.files import (
    clear_directory,
    instance_relpath,
    link_into_place,
    new_temp_path,
    replace_into_place,
    stage,
)
from gateway.store.index import Instance, RefusedInstance, make_engine, make_sessionmaker
from gateway.store.writer import IndexWriter, PendingRow, clear_refusals, record_refusal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreOutcome:
    """The result of :meth:`InstanceStore.put`: what was stored, and whether it was already held."""

    instance: ReceivedInstance
    duplicate: bool


class StoreIndex(Protocol):
    """The data folder and the index's sessions: what the registry and the export queue need of a store.

    An :class:`InstanceStore` has them; so does the registry's index-only view (``gateway models`` and ``gateway jobs``
    commands open the index without touching the store's temporary folder).
    """

    @property
    def data_dir(self) -> Path: ...

    @property
    def sessions(self) -> sessionmaker[Session]: ...

    @property
    def write_sessions(self) -> sessionmaker[Session]: ...


class InstanceStore:
    """Received instances on disk, indexed in SQL.

    Parameters
    ----------
    settings
        Data folder, database URL and free-disk watermark.
    engine
        An existing index engine to share; created from ``settings`` when omitted.
    ingest
        The ``ingest`` settings: how far a Deflated data set may inflate (their defaults when omitted).
    """

    def __init__(
        self, settings: StoreSettings, engine: Engine | None = None, *, ingest: IngestSettings | None = None
    ) -> None:
        self.settings = settings
        #: How far a received Deflated data set may inflate before it is refused.
        self.inflate: InflateLimit = DEFAULT_INFLATE_LIMIT if ingest is None else InflateLimit.of(ingest)
        self.data_dir = settings.data_dir.resolve()
        self.tmp_dir = self.data_dir / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "instances").mkdir(exist_ok=True)
        url = settings.resolved_database_url
        self.engine = engine or make_engine(url)
        self.write_engine = engine or make_engine(url, writer=True)
        #: Sessions for reading (SQLite: deferred transactions that never block the writer).
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        #: Sessions for writing jobs and completions (SQLite: ``BEGIN IMMEDIATE``).
        self.write_sessions: sessionmaker[Session] = make_sessionmaker(self.write_engine)
        removed = clear_directory(self.tmp_dir)
        if removed:
            log.warning("removed %d partial file(s) left by an interrupted run", removed)
        self._writer = IndexWriter(self.write_engine)
        #: Called with the incoming size before :meth:`check_space` refuses for want of space: retention
        #: (:class:`gateway.store.retention.RetentionWorker`) purges what it may, then the space is measured again.
        self.make_room: Callable[[int], None] | None = None

    def problems(self) -> list[str]:
        """Why the store cannot take instances now: its index writer stopped, or the index not answering."""
        if not self._writer.running:
            return ["the instance store is closed (its index writer is stopped)"]
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error: the index is down, locked or gone
            return [f"the index does not answer: {type(exc).__name__}"]
        return []

    def close(self) -> None:
        """Commit what is queued and release the index's connections."""
        self._writer.stop()
        self.engine.dispose()
        self.write_engine.dispose()

    def temp_path(self) -> Path:
        """Return a new empty file in the store's temporary folder (same file system as the store)."""
        return new_temp_path(self.tmp_dir)

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`OutOfResources` if storing ``incoming`` bytes would cross the free-disk watermark."""
        free = shutil.disk_usage(self.data_dir).free
        if free - incoming < self.settings.min_free_bytes and self.make_room is not None:
            self.make_room(incoming)
            free = shutil.disk_usage(self.data_dir).free
        if free - incoming < self.settings.min_free_bytes:
            raise OutOfResources("free disk space is below the configured watermark")

    def path_of(self, relpath: str) -> Path:
        """Absolute path of an indexed instance file."""
        return self.data_dir / relpath

    def put(
        self,
        src: Path,
        *,
        source: str,
        expected_study: str | None = None,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        now: float | None = None,
    ) -> StoreOutcome:
        """Validate, store durably and index the Part 10 file ``src``; ``src`` is consumed either way.

        Parameters
        ----------
        src
            A received file (DIMSE temporary file or STOW-RS part); removed or moved into the store.
        source
            Where it came from, for the index (``"dimse:CALLING_AE"``, ``"stow"``).
        expected_study
            For STOW-RS to a study URL: the Study Instance UID every instance must have.
        sop_class_uid, sop_instance_uid
            For C-STORE: the request's AffectedSOPClassUID and AffectedSOPInstanceUID, which the data set must have.
        now
            Arrival time (seconds since the epoch); the wall clock when omitted.

        Raises
        ------
        gateway.errors.IngestError
            Invalid instance, unsupported transfer syntax, study or SOP mismatch (0xA900) or out of resources;
            nothing is stored and ``src`` is removed. An instance refused for resources is remembered
            (:meth:`record_refusal`) when its UIDs can be read.
        """
        info: ReceivedInstance | None = None
        try:
            info = read_received(src, inflate=self.inflate, scratch_dir=self.tmp_dir)
            check_identity(info, sop_class_uid, sop_instance_uid)
            if expected_study is not None and info.study_instance_uid != expected_study:
                raise StudyMismatch("StudyInstanceUID does not match the study in the request URL")
            size = src.stat().st_size
            self.check_space(size)
            relpath = instance_relpath(info.series_instance_uid, info.sop_instance_uid)
            if not self._place(src, self.data_dir / relpath, info.sop_instance_uid):
                self._arrived_again(info.sop_instance_uid)
                return StoreOutcome(info, duplicate=True)
            row = PendingRow(
                info,
                relpath,
                size,
                source,
                time.time() if now is None else now,
                (self.data_dir / relpath).parent,
            )
            return StoreOutcome(info, duplicate=not self._writer.submit(row))
        except OutOfResources as exc:
            self._remember_refusal(src, info, exc, now)
            raise
        finally:
            src.unlink(missing_ok=True)

    def record_refusal(
        self, series_instance_uid: str, sop_instance_uid: str, reason: str, now: float | None = None
    ) -> bool:
        """Remember an instance refused for want of resources: its series is held until it arrives.

        Returns ``True`` if it was newly recorded (not when already indexed or already refused).
        """
        at = time.time() if now is None else now
        with self.write_engine.begin() as conn:
            return record_refusal(conn, series_instance_uid, sop_instance_uid, reason, at)

    def refusal_uids(self, src: Path | bytes) -> tuple[str, str] | None:
        """The (Series, SOP Instance) UIDs of a refused file or of its first bytes, if they can be read."""
        uids = peek_uids(src)
        if uids is None or uids.series_instance_uid is None or uids.sop_instance_uid is None:
            return None
        return uids.series_instance_uid, uids.sop_instance_uid

    def _remember_refusal(
        self, src: Path, info: ReceivedInstance | None, exc: OutOfResources, now: float | None
    ) -> None:
        """Record a refusal for resources; a failure to record it is logged, never hides the refusal."""
        uids = (info.series_instance_uid, info.sop_instance_uid) if info is not None else self.refusal_uids(src)
        if uids is None:
            log.warning("an instance refused for resources could not be identified: its series will not be held")
            return
        try:
            self.record_refusal(*uids, exc.reason, now)
        except Exception:
            log.exception("could not record an instance refused for resources: its series will not be held")

    def _arrived_again(self, sop_instance_uid: str) -> None:
        """A duplicate arrived: clear its refusal, if it was refused once (a read first; a write only then)."""
        query = select(RefusedInstance.sop_instance_uid).where(RefusedInstance.sop_instance_uid == sop_instance_uid)
        with self.engine.connect() as conn:
            if conn.execute(query).first() is None:
                return
        with self.write_engine.begin() as conn:
            clear_refusals(conn, [sop_instance_uid])

    def is_indexed(self, sop_instance_uid: str) -> bool:
        """Whether the index holds the instance."""
        with self.engine.connect() as conn:
            query = select(Instance.sop_instance_uid).where(Instance.sop_instance_uid == sop_instance_uid)
            return conn.execute(query).first() is not None

    def _place(self, src: Path, dest: Path, sop_instance_uid: str) -> bool:
        """Put the received bytes at ``dest`` durably; ``False`` if an indexed copy is already there.

        The path is derived from the UIDs, so an existing file at ``dest`` means a duplicate, or an orphan that
        an interrupted run stored but never indexed (it is replaced). No index query is needed for new instances.
        """
        staged = stage(src, self.tmp_dir)
        try:
            if link_into_place(staged, dest):
                return True
            if self.is_indexed(sop_instance_uid):
                return False
            log.warning(
                "replacing an unindexed copy of an instance (left by an interrupted run, or being stored at this "
                "moment by another ingest process)"
            )
            replace_into_place(staged, dest)
            return True
        finally:
            staged.unlink(missing_ok=True)
