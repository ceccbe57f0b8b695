"""The assembly stage of a job: ``received -> assembling -> assembled`` (or ``failed``, with the reason).

A job's series is assembled from every instance received up to and including its revision (a revision holds the
new arrivals; the volume is the series as it stands). What assembly found (volumes, QC flags, what was resampled,
what was refused and why) is recorded on the job, so "why did this series not run?" has an answer in the API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from gateway.assemble.assemble import AssemblyResult, assemble_series
from gateway.errors import GatewayError
from gateway.jobs.record import record
from gateway.jobs.states import JobState
from gateway.store.index import Instance, Job, SeriesRevision
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)


def claim_job(store: InstanceStore) -> int | None:
    """Move the oldest ``received`` job to ``assembling`` and return its id (``None`` if there is none)."""
    with store.write_sessions.begin() as session:
        job_id = session.scalar(select(Job.id).where(Job.state == JobState.RECEIVED).order_by(Job.id).limit(1))
        if job_id is None:
            return None
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.ASSEMBLING, updated_at=time.time()))
        return int(job_id)


def resume_interrupted(store: InstanceStore, states: tuple[JobState, ...] = (JobState.ASSEMBLING,)) -> int:
    """Put jobs a stopped or crashed gateway left in ``states`` back to ``received``; return how many.

    Volumes and results live in memory between assembly, inference and encoding, so when the later stages follow
    assembly the gateway also passes ``assembled``, ``inferring``, ``inferred`` and ``encoding``: an interrupted job
    is assembled again. Once ``encoded``, its files and deliveries are on disk and the export queue resumes them.
    """
    with store.write_sessions.begin() as session:
        result = session.execute(
            update(Job).where(Job.state.in_(states)).values(state=JobState.RECEIVED, updated_at=time.time())
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def series_paths(store: InstanceStore, job_id: int) -> list[Path]:
    """The files of the job's series, every revision up to the job's own."""
    with store.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise GatewayError(f"no job {job_id}")
        revision = session.get(SeriesRevision, job.revision_id)
        assert revision is not None, "a job always has its revision"
        rows = session.scalars(
            select(Instance.path)
            .join(SeriesRevision, Instance.revision_id == SeriesRevision.id)
            .where(
                Instance.series_instance_uid == job.series_instance_uid,
                SeriesRevision.revision <= revision.revision,
            )
        ).all()
    return [store.path_of(p) for p in rows]


def assembly_summary(result: AssemblyResult) -> dict[str, Any]:
    """What the job records of an assembly: each volume's grid and QC, each refusal's reason (no patient data)."""
    return {
        "volumes": [
            {
                "shape": list(v.array.shape),
                "spacing_mm": [round(s, 4) for s in v.spacing],
                "modality": v.modality,
                "slices": len(v.slices),
                "resampled": v.resampled,
                "qc": [{"code": f.code, "message": f.message, "resampled": f.resampled} for f in v.qc],
            }
            for v in result.volumes
        ],
        "refused": [
            {"reason": r.reason, "instances": max(len(r.sop_instance_uids), len(r.paths))} for r in result.refused
        ],
    }


def assemble_job(store: InstanceStore, job_id: int) -> AssemblyResult | None:
    """Assemble a claimed job's series and record the outcome on the job; ``None`` if assembly raised."""
    started = time.monotonic()
    result: AssemblyResult | None = None
    try:
        result = assemble_series(series_paths(store, job_id))
        summary = assembly_summary(result)
        failure = (
            None
            if result.volumes
            else "no volume could be assembled: "
            + "; ".join(sorted({r.reason for r in result.refused}) or ["no image instances"])
        )
    except Exception as exc:  # one bad series fails its job, never the worker
        log.exception("assembly of job %d failed", job_id)
        summary, failure = {}, f"assembly failed: {type(exc).__name__}: {exc}"
    _finish(store, job_id, summary, failure, time.monotonic() - started)
    return result


def _finish(store: InstanceStore, job_id: int, summary: dict[str, Any], failure: str | None, seconds: float) -> None:
    record(
        store,
        job_id,
        timing=("assemble_s", seconds),
        state=JobState.FAILED if failure else JobState.ASSEMBLED,
        assembly=summary,
        failure={"stage": "assemble", "reason": failure} if failure is not None else None,
    )
    log.info("job %d %s in %.1f s", job_id, "failed at assembly" if failure else "assembled", seconds)


class AssemblyWorkers:
    """Threads that claim ``received`` jobs and assemble them, until stopped.

    ``then`` is the next stage, called in the same thread with the job id and the volumes of a job that assembled
    (the volumes stay in memory between the two stages; :func:`resume_interrupted` sends an interrupted job back).
    """

    def __init__(
        self,
        store: InstanceStore,
        count: int,
        poll_s: float,
        then: Callable[[int, AssemblyResult], None] | None = None,
    ) -> None:
        self._store = store
        self._poll = poll_s
        self._then = then
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"assembly-{k}", daemon=True) for k in range(count)]

    def start(self) -> None:
        """Resume interrupted jobs, then start the threads."""
        states: tuple[JobState, ...] = (JobState.ASSEMBLING,)
        if self._then is not None:
            states += (JobState.ASSEMBLED, JobState.INFERRING, JobState.INFERRED, JobState.ENCODING)
        if self._threads and resume_interrupted(self._store, states):
            log.warning("resumed jobs interrupted during assembly")
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop after the job in progress."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = claim_job(self._store)
            except Exception:
                log.exception("claiming a job failed; retrying")
                job_id = None
            if job_id is None:
                self._stop.wait(self._poll)
                continue
            result = assemble_job(self._store, job_id)
            if result is not None and result.volumes and self._then is not None:
                self._then(job_id, result)
