"""The instance store: received files in, durable files and committed index rows out.

An instance is only reported as stored once its bytes are fsynced in place and its index row is committed; the
callers (DIMSE handler, STOW-RS route) acknowledge only then.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gateway.config import StoreSettings
from gateway.errors import OutOfResources, StudyMismatch
from gateway.ingest.instance import ReceivedInstance, read_received
from gateway.store.files import clear_directory, instance_relpath, new_temp_path, place_durably
from gateway.store.index import Instance, Series, SeriesRevision, Study, make_engine, make_sessionmaker

log = logging.getLogger(__name__)

_STUDY_FIELDS = {
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
_SERIES_FIELDS = {
    "modality": "Modality",
    "series_number": "SeriesNumber",
    "series_description": "SeriesDescription",
    "body_part_examined": "BodyPartExamined",
}
_INSTANCE_FIELDS = {
    "instance_number": "InstanceNumber",
    "rows": "Rows",
    "columns": "Columns",
    "number_of_frames": "NumberOfFrames",
}


@dataclass(frozen=True)
class StoreOutcome:
    """The result of :meth:`InstanceStore.put`: what was stored, and whether it was already held."""

    instance: ReceivedInstance
    duplicate: bool


class InstanceStore:
    """Received instances on disk, indexed in SQL.

    Parameters
    ----------
    settings
        Data folder, database URL and free-disk watermark.
    engine
        An existing index engine to share; created from ``settings`` when omitted.
    """

    def __init__(self, settings: StoreSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.tmp_dir = self.data_dir / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "instances").mkdir(exist_ok=True)
        self.engine = engine or make_engine(settings.resolved_database_url)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        removed = clear_directory(self.tmp_dir)
        if removed:
            log.warning("removed %d partial file(s) left by an interrupted run", removed)

    def close(self) -> None:
        """Release the index's connections."""
        self.engine.dispose()

    def temp_path(self) -> Path:
        """Return a new empty file in the store's temporary folder (same file system as the store)."""
        return new_temp_path(self.tmp_dir)

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`OutOfResources` if storing ``incoming`` bytes would cross the free-disk watermark."""
        free = shutil.disk_usage(self.data_dir).free
        if free - incoming < self.settings.min_free_bytes:
            raise OutOfResources("free disk space is below the configured watermark")

    def path_of(self, relpath: str) -> Path:
        """Absolute path of an indexed instance file."""
        return self.data_dir / relpath

    def put(
        self, src: Path, *, source: str, expected_study: str | None = None, now: float | None = None
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
        now
            Arrival time (seconds since the epoch); the wall clock when omitted.

        Raises
        ------
        gateway.errors.IngestError
            Invalid instance, unsupported transfer syntax, study mismatch or out of resources; nothing is
            stored and ``src`` is removed.
        """
        try:
            info = read_received(src)
            if expected_study is not None and info.study_instance_uid != expected_study:
                raise StudyMismatch("StudyInstanceUID does not match the study in the request URL")
            if self._is_indexed(info.sop_instance_uid):
                return StoreOutcome(info, duplicate=True)
            size = src.stat().st_size
            self.check_space(size)
            relpath = instance_relpath(info.sop_instance_uid)
            place_durably(src, self.data_dir / relpath, tmp_dir=self.tmp_dir)
            duplicate = not self._index(info, relpath, size, source, time.time() if now is None else now)
            return StoreOutcome(info, duplicate=duplicate)
        finally:
            src.unlink(missing_ok=True)

    def _is_indexed(self, sop_instance_uid: str) -> bool:
        with self.sessions() as session:
            return session.get(Instance, sop_instance_uid) is not None

    def _index(self, info: ReceivedInstance, relpath: str, size: int, source: str, now: float) -> bool:
        """Commit the index rows for a stored file; ``False`` if a concurrent receipt indexed it first."""
        try:
            with self.sessions.begin() as session:
                self._upsert_parents(session, info, now)
                revision = self._open_revision(session, info.series_instance_uid, now)
                session.add(
                    Instance(
                        sop_instance_uid=info.sop_instance_uid,
                        series_instance_uid=info.series_instance_uid,
                        study_instance_uid=info.study_instance_uid,
                        revision_id=revision.id,
                        sop_class_uid=info.sop_class_uid,
                        transfer_syntax_uid=info.transfer_syntax_uid,
                        path=relpath,
                        size=size,
                        source=source[:64],
                        received_at=now,
                        **_fields(info, _INSTANCE_FIELDS),
                    )
                )
        except IntegrityError:
            if self._is_indexed(info.sop_instance_uid):
                return False
            raise
        return True

    @staticmethod
    def _upsert_parents(session: Session, info: ReceivedInstance, now: float) -> None:
        if session.get(Study, info.study_instance_uid) is None:
            session.add(
                Study(
                    study_instance_uid=info.study_instance_uid,
                    created_at=now,
                    **_fields(info, _STUDY_FIELDS),
                )
            )
        if session.get(Series, info.series_instance_uid) is None:
            session.add(
                Series(
                    series_instance_uid=info.series_instance_uid,
                    study_instance_uid=info.study_instance_uid,
                    created_at=now,
                    **_fields(info, _SERIES_FIELDS),
                )
            )
        session.flush()

    @staticmethod
    def _open_revision(session: Session, series_uid: str, now: float) -> SeriesRevision:
        """The open revision of a series, opening revision n+1 when the latest has completed."""
        latest = session.scalars(
            select(SeriesRevision)
            .where(SeriesRevision.series_instance_uid == series_uid)
            .order_by(SeriesRevision.revision.desc())
            .limit(1)
        ).first()
        if latest is None or latest.state != "open":
            latest = SeriesRevision(
                series_instance_uid=series_uid,
                revision=1 if latest is None else latest.revision + 1,
                state="open",
                first_received_at=now,
                last_received_at=now,
                instance_count=0,
            )
            session.add(latest)
            session.flush()
        latest.last_received_at = max(latest.last_received_at, now)
        latest.instance_count += 1
        return latest


def _fields(info: ReceivedInstance, mapping: dict[str, str]) -> dict[str, Any]:
    return {column: info.attributes.get(keyword) for column, keyword in mapping.items()}
