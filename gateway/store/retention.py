"""Retention: what the gateway may forget, and forgetting it in a crash-safe order.

Two kinds of thing are purged (``retention`` settings):

- a **series' received instances**, once none of its jobs is active, no revision of it is open or held and no
  delivery of its jobs is queued: ``instances_days`` after the end of its last job (exported or skipped), or
  ``failed_days`` for a failed one (the longest wins). The job rows stay as history, with ``purged_at`` and
  ``detail["retention"]``; so do the study, series and revision rows (the jobs reference them).
- a **job's outputs** (``outputs/job-<id>/``, ``results/job-<id>/``), once it is finished and each of its
  deliveries is final (delivered, refused or dead): ``outputs_days`` after it finished. Its deliveries stay as
  history; the job's detail records the purge; its rows in ``outputs`` (what QIDO-RS lists) go.

Above ``disk_high_watermark`` (the data folder's file system, :class:`DiskUsage`), both kinds are purged
oldest-first whatever their age until the disk is below ``disk_low_watermark``; when nothing more may be purged
a WARNING says so, once per episode. Before the store refuses an instance for want of space
(``store.min_free_bytes``), :meth:`Retention.make_room` purges the same way, so that ingest is refused only
when nothing could be purged.

"Finished" is the job's ``finished_at``; a job finished before that column was set (it is ``NULL``) counts from
its ``updated_at``.

Crash-safe order, for each batch:

1. One index transaction (SQLite ``BEGIN IMMEDIATE``: no job, revision or delivery changes meanwhile) checks each
   candidate again, deletes the instance rows and marks the jobs, and writes and fsyncs the journal of the files
   to delete (:mod:`gateway.store.purge_journal`) before it commits.
2. The files are removed (and their folders fsynced); then the journal.

A crash before the commit leaves the index as it was (a journal written then lists files the index still holds:
they are kept). A crash after it leaves a journal that the next purge finishes first. The index never names a
deleted file, and no file a purge took out of the index is left behind.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from gateway.audit.trail import AuditTrail, StudyTally
from gateway.config import RetentionSettings
from gateway.jobs.states import FINISHED, JobState
from gateway.store.index import Delivery, Instance, Job, SeriesRevision, Study
from gateway.store.outputs import forget_job_outputs
from gateway.store.purge_journal import (
    FolderEntry,
    InstanceEntry,
    Journal,
    identity,
    leftover_journals,
    remove_files,
    remove_folders,
)
from gateway.store.store import InstanceStore, StoreIndex

__all__ = ["Candidate", "DiskUsage", "PurgeReport", "Retention", "RetentionWorker"]

log = logging.getLogger(__name__)

DAY_S = 86_400.0
#: ``gateway.export.queue``'s PENDING and SENDING: a delivery still queued needs its file (spelt out here: the
#: store does not import the export stage).
_IN_FLIGHT = ("pending", "sending")
_BATCH_FILES = 2000  # files removed per index transaction: bounds how long the write lock is held
_CHUNK = 500  # values per SQL IN list
_MAKE_ROOM_BACKOFF_S = 1.0  # after make_room found nothing to purge
AGE, SPACE = "age", "disk space"
_T = TypeVar("_T")


@dataclass(frozen=True)
class DiskUsage:
    """The data folder's file system against the retention watermarks and the ingest floor."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    min_free_bytes: int
    high_watermark: float
    low_watermark: float

    @classmethod
    def measure(cls, data_dir: Path, settings: RetentionSettings, min_free_bytes: int) -> DiskUsage:
        """Measure the file system of ``data_dir`` (``free``: what an unprivileged writer may still use)."""
        usage = shutil.disk_usage(data_dir)
        return cls(
            total_bytes=usage.total,
            used_bytes=usage.used,
            free_bytes=usage.free,
            min_free_bytes=min_free_bytes,
            high_watermark=settings.disk_high_watermark,
            low_watermark=settings.disk_low_watermark,
        )

    @property
    def used_fraction(self) -> float:
        """Share of the file system in use."""
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def accepting(self) -> bool:
        """Whether ingest accepts an instance (free space at or above ``store.min_free_bytes``)."""
        return self.free_bytes >= self.min_free_bytes

    @property
    def above_high(self) -> bool:
        """Whether the disk is above the high watermark (purging oldest-first is due)."""
        return self.used_fraction > self.high_watermark

    @property
    def over_low_bytes(self) -> int:
        """Bytes to free to get below the low watermark."""
        return max(0, self.used_bytes - math.floor(self.low_watermark * self.total_bytes))

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``/healthz``, ``/api/storage``)."""
        return {
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "used_fraction": round(self.used_fraction, 4),
            "high_watermark": self.high_watermark,
            "low_watermark": self.low_watermark,
            "min_free_bytes": self.min_free_bytes,
            "accepting": self.accepting,
        }


@dataclass(frozen=True)
class Candidate:
    """Something retention may purge now: a series' instances (``series_instance_uid``) or a job's outputs
    (``job_id`` and its ``folders``). ``due_at`` is when its age purges it (``inf``: kept by age forever)."""

    finished_at: float
    due_at: float
    bytes: int
    series_instance_uid: str | None = None
    instances: int = 0
    job_id: int | None = None
    folders: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        """Identifies the candidate across plans."""
        if self.series_instance_uid is not None:
            return "series", self.series_instance_uid
        return "outputs", str(self.job_id)


@dataclass
class PurgeReport:
    """What one purge freed (or, for a dry run, would free); no patient data."""

    dry_run: bool = False
    series: int = 0
    instances: int = 0
    outputs: int = 0  # jobs whose outputs went
    bytes: int = 0  # the files' sizes
    for_space: int = 0  # of series + outputs, those purged for disk space rather than age
    recovered: int = 0  # journals of interrupted purges finished
    starved: bool = False  # above a watermark with nothing more that may be purged
    disk: DiskUsage | None = None  # after the purge
    finished_at: float = field(default_factory=time.time)

    def add(self, candidate: Candidate, reason: str) -> None:
        """Count a candidate purged for ``reason`` (age or disk space)."""
        if candidate.series_instance_uid is not None:
            self.series += 1
            self.instances += candidate.instances
        else:
            self.outputs += 1
        self.bytes += candidate.bytes
        self.for_space += reason == SPACE

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``/api/storage``)."""
        return {
            "dry_run": self.dry_run,
            "series": self.series,
            "instances": self.instances,
            "outputs": self.outputs,
            "bytes": self.bytes,
            "for_space": self.for_space,
            "recovered": self.recovered,
            "starved": self.starved,
            "finished_at": self.finished_at,
            "disk": None if self.disk is None else self.disk.as_dict(),
        }

    def summary(self) -> str:
        """One line for people: ``freed 3 series (120 instances), the outputs of 2 jobs: 61.2 MB``."""
        verb = "would free" if self.dry_run else "freed"
        line = (
            f"{verb} {self.series} series ({self.instances} instances), the outputs of {self.outputs} jobs: "
            f"{_megabytes(self.bytes)} ({self.bytes} bytes)"
        )
        if self.for_space:
            line += f"; {self.for_space} of them for disk space"
        if self.recovered:
            line += f"; finished {self.recovered} interrupted purge(s)"
        return line


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class Retention:
    """Plans and runs purges over one data folder and its index.

    Parameters
    ----------
    index
        The data folder and the index's sessions (an :class:`~gateway.store.store.InstanceStore`, or the index
        alone for ``gateway purge``).
    settings
        The retention settings.
    min_free_bytes
        ``store.min_free_bytes``: below it ingest refuses instances, so :meth:`make_room` purges first.
    audit
        The audit trail: a DICOM Study Deleted for each study whose instances a committed purge batch took out.
    """

    def __init__(
        self, index: StoreIndex, settings: RetentionSettings, min_free_bytes: int, *, audit: AuditTrail | None = None
    ) -> None:
        self._index = index
        self.audit = audit or AuditTrail.disabled()
        self.settings = settings
        self.min_free_bytes = min_free_bytes
        self._data_dir = index.data_dir
        self._journals = self._data_dir / "purge"
        self._lock = threading.Lock()  # one purge at a time in this process
        self._starved = False
        self._idle_until = 0.0  # monotonic time before which make_room does not look again

    def disk(self) -> DiskUsage:
        """The data folder's file system now."""
        return DiskUsage.measure(self._data_dir, self.settings, self.min_free_bytes)

    def run(self, *, dry_run: bool = False, now: float | None = None) -> PurgeReport:
        """Purge what is due by age, then what the watermarks require; finish interrupted purges first.

        A dry run changes nothing and reports what a purge would free now (for the watermark part, counting the
        age part's bytes as freed).
        """
        now = time.time() if now is None else now
        report = PurgeReport(dry_run=dry_run)
        with self._lock:
            if dry_run:
                self._plan(now, report)
            else:
                report.recovered = self.finish_journals()
                aged = [c for c in self.candidates(now) if c.due_at <= now]
                self._purge(aged, AGE, now, report)
                self._free_space(now, report, incoming=None, tried={c.key for c in aged})
        report.disk = self.disk()
        if report.series or report.outputs or report.recovered:
            log.info("retention %s", report.summary())
        return report

    def make_room(self, incoming: int) -> None:
        """Purge oldest-first until ``incoming`` bytes fit above ``min_free_bytes`` (and the disk is below the high
        watermark); called by the store before it refuses an instance. Never raises: a failure is logged."""
        if time.monotonic() < self._idle_until:
            return
        try:
            with self._lock:
                report = PurgeReport()
                short = self._free_space(time.time(), report, incoming=incoming, tried=set())
            if report.series or report.outputs:
                log.info("retention, to make room for an instance: %s", report.summary())
            elif short:  # nothing could be purged: the refusals that follow this one do not each look again
                self._idle_until = time.monotonic() + _MAKE_ROOM_BACKOFF_S
            # else the space was back by the time it was measured again (a temporary file gone): no back-off
        except Exception:
            log.exception("retention could not make room; the instance is refused if space is short")

    def candidates(self, now: float) -> list[Candidate]:
        """Everything that may be purged now (whatever its age), oldest first."""
        with self._index.sessions() as session:
            found = [*self._series_candidates(session), *self._outputs_candidates(session)]
        return sorted(found, key=lambda c: c.finished_at)

    def finish_journals(self) -> int:
        """Finish the purges a crash interrupted (their index rows are gone; their files may not be); how many."""
        finished = 0
        for journal in leftover_journals(self._journals):
            entries = journal.entries()
            if entries is None:
                journal.discard()  # torn or empty: written by a purge that never committed
                continue
            self._remove(journal, *entries)
            finished += 1
        if finished:
            log.warning("retention finished %d purge(s) interrupted by a crash", finished)
        return finished

    # -- planning -------------------------------------------------------------------------------------------------

    def _plan(self, now: float, report: PurgeReport) -> None:
        candidates = self.candidates(now)
        aged = [c for c in candidates if c.due_at <= now]
        for c in aged:
            report.add(c, AGE)
        disk = self.disk()
        freed = sum(c.bytes for c in aged)
        disk = replace(disk, used_bytes=disk.used_bytes - freed, free_bytes=disk.free_bytes + freed)
        rest = [c for c in candidates if c.due_at > now]
        need = self._need(disk, None, rest)
        chosen = _oldest_first(rest, need)
        for c in chosen:
            report.add(c, SPACE)
        report.starved = need > sum(c.bytes for c in chosen)

    def _need(self, disk: DiskUsage, incoming: int | None, candidates: Sequence[Candidate]) -> int:
        """Bytes to free: down to the low watermark when above the high one; and for ``incoming`` bytes to fit
        above ``min_free_bytes``, when purging everything could make them fit."""
        need = disk.over_low_bytes if disk.above_high else 0
        if incoming is not None:
            short = disk.min_free_bytes + incoming - disk.free_bytes
            if 0 < short <= sum(c.bytes for c in candidates):
                need = max(need, short)
        return need

    def _series_candidates(self, session: Session) -> list[Candidate]:
        jobs = session.execute(
            select(Job.series_instance_uid, Job.state, Job.finished_at, Job.updated_at).where(Job.purged_at.is_(None))
        ).all()
        blocked = _blocked_series(session)
        ends: dict[str, list[tuple[float, float]]] = {}
        for uid, state, finished_at, updated_at in jobs:
            if uid in blocked:
                continue
            finished = finished_at if finished_at is not None else updated_at
            ends.setdefault(uid, []).append((finished, finished + self._keep_s(state)))
        held = _held_instances(session, ends)
        return [
            Candidate(
                finished_at=max(f for f, _ in ends[uid]),
                due_at=max(d for _, d in ends[uid]),
                bytes=size,
                series_instance_uid=uid,
                instances=count,
            )
            for uid, (count, size) in held.items()
        ]

    def _keep_s(self, state: str) -> float:
        days = self.settings.failed_days if state == JobState.FAILED else self.settings.instances_days
        return math.inf if days is None else days * DAY_S

    def _outputs_candidates(self, session: Session) -> list[Candidate]:
        folders = _job_folders(self._data_dir)
        if not folders:
            return []
        keep = math.inf if self.settings.outputs_days is None else self.settings.outputs_days * DAY_S
        in_flight = set(session.scalars(select(Delivery.job_id).where(Delivery.state.in_(_IN_FLIGHT)).distinct()))
        found: list[Candidate] = []
        for ids in _chunks(sorted(folders)):
            rows = session.execute(
                select(Job.id, Job.state, Job.finished_at, Job.updated_at).where(Job.id.in_(ids))
            ).all()
            for job_id, state, finished_at, updated_at in rows:
                if state not in FINISHED or job_id in in_flight:
                    continue
                finished = finished_at if finished_at is not None else updated_at
                size = sum(_tree_bytes(self._data_dir / rel) for rel in folders[job_id])
                found.append(Candidate(finished, finished + keep, size, job_id=job_id, folders=folders[job_id]))
        return found

    # -- purging --------------------------------------------------------------------------------------------------

    def _free_space(
        self, now: float, report: PurgeReport, *, incoming: int | None, tried: set[tuple[str, str]]
    ) -> bool:
        """Purge oldest-first, measuring again after each round, until :meth:`_need` is met or nothing is left;
        whether space is still short (``False`` when it was met, or there was no shortage at all)."""
        while True:
            disk = self.disk()
            short = incoming is not None and disk.free_bytes - incoming < disk.min_free_bytes
            if not (disk.above_high or short):
                self._starved = False
                return False
            candidates = [c for c in self.candidates(now) if c.key not in tried]
            need = self._need(disk, incoming, candidates)
            if need <= 0:  # short for this instance, but purging all there is would not make it fit
                return True
            chosen = _oldest_first(candidates, need)
            if not chosen:
                report.starved = True
                self._warn_starved(disk)
                return True
            tried.update(c.key for c in chosen)
            self._purge(chosen, SPACE, now, report)

    def _warn_starved(self, disk: DiskUsage) -> None:
        if self._starved:
            return
        self._starved = True
        log.warning(
            "disk %.1f%% used (%s free, ingest floor %s) and nothing more may be purged: the rest belongs to active "
            "jobs, queued deliveries or open series, or is not the gateway's",
            100 * disk.used_fraction,
            _megabytes(disk.free_bytes),
            _megabytes(disk.min_free_bytes),
        )

    def _purge(self, candidates: Sequence[Candidate], reason: str, now: float, report: PurgeReport) -> None:
        for batch in _batches(candidates):
            journal = Journal.create(self._journals)
            deleted = StudyTally()
            try:
                with self._index.write_sessions.begin() as session:
                    _hold_writers(session)
                    done, instances, folders = self._take_out(session, batch, reason, now, deleted)
                    journal.write(instances, folders)  # durable before the commit
            except BaseException:
                journal.discard()
                raise
            for study in deleted.studies():  # committed: the index no longer holds them
                self.audit.study_deleted(study.study_instance_uid, study.patient_id, study.sop_classes)
            self._remove(journal, instances, folders)
            for c in done:
                report.add(c, reason)

    def _take_out(
        self, session: Session, batch: Sequence[Candidate], reason: str, now: float, deleted: StudyTally
    ) -> tuple[list[Candidate], list[InstanceEntry], list[FolderEntry]]:
        """Check each candidate again under the write lock; delete its rows and mark its jobs; count the instances
        taken out per study in ``deleted``."""
        done: list[Candidate] = []
        instances: list[InstanceEntry] = []
        folders: list[FolderEntry] = []
        blocked = _blocked_series(session)
        in_flight = set(session.scalars(select(Delivery.job_id).where(Delivery.state.in_(_IN_FLIGHT)).distinct()))
        for c in batch:
            if c.series_instance_uid is not None:
                if c.series_instance_uid in blocked:
                    continue
                entries, size = self._take_series(session, c.series_instance_uid, reason, now, deleted)
                if entries:
                    instances.extend(entries)
                    done.append(replace(c, instances=len(entries), bytes=size))
            elif (
                c.job_id is not None
                and c.job_id not in in_flight
                and self._take_outputs(session, c.job_id, reason, now)
            ):
                folders.extend(FolderEntry(rel, c.job_id) for rel in c.folders)
                done.append(c)
        return done, instances, folders

    def _take_series(
        self, session: Session, uid: str, reason: str, now: float, deleted: StudyTally
    ) -> tuple[list[InstanceEntry], int]:
        rows = session.execute(
            select(
                Instance.sop_instance_uid,
                Instance.path,
                Instance.size,
                Instance.study_instance_uid,
                Instance.sop_class_uid,
                Study.patient_id,
            )
            .join(Study, Study.study_instance_uid == Instance.study_instance_uid)
            .where(Instance.series_instance_uid == uid)
        ).all()
        if not rows:
            return [], 0
        entries = [InstanceEntry(row.path, row.sop_instance_uid, identity(self._data_dir / row.path)) for row in rows]
        for row in rows:
            deleted.add(row.study_instance_uid, row.patient_id, row.sop_class_uid)
        session.execute(delete(Instance).where(Instance.series_instance_uid == uid))
        for job in session.scalars(select(Job).where(Job.series_instance_uid == uid, Job.purged_at.is_(None))):
            job.purged_at = now
            _note(job, instances_purged_at=now, instances_purged_for=reason, instances=len(rows))
        return entries, sum(row.size for row in rows)

    def _take_outputs(self, session: Session, job_id: int, reason: str, now: float) -> bool:
        job = session.get(Job, job_id)
        if job is None or job.state not in FINISHED:
            return False
        _note(job, outputs_purged_at=now, outputs_purged_for=reason)
        forget_job_outputs(session, job_id)  # QIDO-RS and WADO-RS no longer list them
        return True

    def _remove(self, journal: Journal, instances: list[InstanceEntry], folders: list[FolderEntry]) -> None:
        """Remove what the committed journal lists, less what the index holds again; then drop the journal."""
        with self._index.sessions() as session:
            indexed = _indexed(session, [e.sop_instance_uid for e in instances])
            purged = _outputs_purged(session, {f.job_id for f in folders})
        ok = remove_files(self._data_dir, [e for e in instances if e.sop_instance_uid not in indexed])
        ok = remove_folders(self._data_dir, [f for f in folders if f.job_id in purged]) and ok
        if ok:
            journal.discard()
        else:
            journal.release()


def _note(job: Job, **entries: Any) -> None:
    """Merge ``entries`` into the job's ``detail["retention"]`` (a new dict: JSON columns track assignment only)."""
    detail = dict(job.detail or {})
    detail["retention"] = {**detail.get("retention", {}), **entries}
    job.detail = detail


def _blocked_series(session: Session) -> set[str]:
    """Series that must not be purged: an active job, an open or held revision, or a queued delivery."""
    active = select(Job.series_instance_uid).where(Job.state.not_in(FINISHED))
    unsettled = select(SeriesRevision.series_instance_uid).where(SeriesRevision.state != "complete")
    sending = (
        select(Job.series_instance_uid).join(Delivery, Delivery.job_id == Job.id).where(Delivery.state.in_(_IN_FLIGHT))
    )
    blocked: set[str] = set()
    for query in (active, unsettled, sending):
        blocked.update(session.scalars(query.distinct()))
    return blocked


def _held_instances(session: Session, uids: Collection[str]) -> dict[str, tuple[int, int]]:
    """``{series: (instances, bytes)}`` for those of ``uids`` that hold instances."""
    held: dict[str, tuple[int, int]] = {}
    for chunk in _chunks(sorted(uids)):
        rows = session.execute(
            select(Instance.series_instance_uid, func.count(), func.coalesce(func.sum(Instance.size), 0))
            .where(Instance.series_instance_uid.in_(chunk))
            .group_by(Instance.series_instance_uid)
        ).all()
        held.update({uid: (int(n), int(size)) for uid, n, size in rows})
    return held


def _indexed(session: Session, sop_uids: Sequence[str]) -> set[str]:
    """Those of ``sop_uids`` the index holds (stored again since their purge, or never purged)."""
    found: set[str] = set()
    for chunk in _chunks(sop_uids):
        found.update(session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk))))
    return found


def _outputs_purged(session: Session, job_ids: Collection[int]) -> set[int]:
    """Those of ``job_ids`` whose outputs purge committed, still finished, with nothing queued."""
    if not job_ids:
        return set()
    in_flight = set(session.scalars(select(Delivery.job_id).where(Delivery.state.in_(_IN_FLIGHT)).distinct()))
    purged: set[int] = set()
    for chunk in _chunks(sorted(job_ids)):
        for job in session.scalars(select(Job).where(Job.id.in_(chunk))):
            marked = (job.detail or {}).get("retention", {}).get("outputs_purged_at") is not None
            if marked and job.state in FINISHED and job.id not in in_flight:
                purged.add(job.id)
    return purged


def _job_folders(data_dir: Path) -> dict[int, tuple[str, ...]]:
    """``{job id: ("outputs/job-<id>", "results/job-<id>")}``, the output folders present on disk."""
    found: dict[int, list[str]] = {}
    for top in ("outputs", "results"):
        try:
            entries = list(os.scandir(data_dir / top))
        except FileNotFoundError:
            continue
        for entry in entries:
            number = entry.name.removeprefix("job-")
            if entry.name.startswith("job-") and number.isdigit() and entry.is_dir(follow_symlinks=False):
                found.setdefault(int(number), []).append(f"{top}/{entry.name}")
    return {job_id: tuple(rels) for job_id, rels in found.items()}


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except FileNotFoundError:
                continue
    return total


def _oldest_first(candidates: Iterable[Candidate], need: int) -> list[Candidate]:
    """The oldest candidates whose bytes add up to ``need`` (all of them if they do not)."""
    chosen: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: c.finished_at):
        if need <= 0:
            break
        chosen.append(c)
        need -= c.bytes
    return chosen


#: What a purge's transaction keeps still on PostgreSQL: the tables whose writes could change its checks.
_HELD_STILL = ("series_revisions", "jobs", "deliveries")


def _hold_writers(session: Session) -> None:
    """Keep every other writer out of the tables a purge checks until ``session``'s transaction ends.

    SQLite's ``BEGIN IMMEDIATE`` already does (one writer at a time). On PostgreSQL, where several gateway
    processes write at once, the tables are locked ``SHARE ROW EXCLUSIVE``: reads go on, while an arrival (which
    opens or bumps a revision), a job's move or a delivery's change waits for the purge batch to commit, so no
    instance arrives in a series being purged and no delivery is queued for outputs being removed.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"LOCK TABLE {', '.join(_HELD_STILL)} IN SHARE ROW EXCLUSIVE MODE"))


def _batches(candidates: Sequence[Candidate]) -> Iterator[list[Candidate]]:
    batch: list[Candidate] = []
    files = 0
    for c in candidates:
        batch.append(c)
        files += c.instances + len(c.folders)
        if files >= _BATCH_FILES:
            yield batch
            batch, files = [], 0
    if batch:
        yield batch


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class RetentionWorker:
    """Retention in the background of ``gateway serve``.

    It purges at start (finishing a purge a crash interrupted), every ``retention.interval_s``, and as soon as the
    disk is above the high watermark (looked at every ``poll_s``); while it runs, the store calls
    :meth:`Retention.make_room` before it refuses an instance for want of space.

    Parameters
    ----------
    store
        The instance store.
    settings
        The retention settings.
    poll_s
        How often the disk is measured between full runs.
    audit
        The audit trail (a DICOM Study Deleted for each study purged).
    """

    def __init__(
        self,
        store: InstanceStore,
        settings: RetentionSettings,
        *,
        poll_s: float = 5.0,
        audit: AuditTrail | None = None,
    ) -> None:
        self._store = store
        self.retention = Retention(store, settings, store.settings.min_free_bytes, audit=audit)
        self._interval = settings.interval_s
        self._poll = min(poll_s, settings.interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        #: The last background purge's report (``None`` before the first).
        self.last_report: PurgeReport | None = None

    def start(self) -> None:
        """Start the thread and let the store purge before refusing for space."""
        self._store.make_room = self.retention.make_room
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a purge under way finishes its batch) and detach from the store."""
        self._stop.set()
        self._store.make_room = None
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def _run(self) -> None:
        next_run = 0.0
        while not self._stop.is_set():
            clock = time.monotonic()
            try:
                if clock >= next_run:
                    self.last_report = self.retention.run()
                    next_run = clock + self._interval
                elif self.retention.disk().above_high:
                    self.last_report = self.retention.run()
            except Exception:
                log.exception("retention failed; it runs again at the next interval")
                next_run = clock + self._interval
            self._stop.wait(min(self._poll, max(0.0, next_run - time.monotonic())))
