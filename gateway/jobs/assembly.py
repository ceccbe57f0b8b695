"""The assembly stage of a job: its series, as it stands at the job's revision, made into volumes.

The runner (:mod:`gateway.jobs.runner`) claims the job and records the outcome (``assembled``, or ``failed`` with
the reason).

A job's series is assembled from every instance received up to and including its revision (a revision holds the
new arrivals; the volume is the series as it stands). What assembly found (volumes, QC flags, what was resampled,
what was refused and why) is recorded on the job, so "why did this series not run?" has an answer in the API.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from gateway.assemble.assemble import AssemblyResult, assemble_series
from gateway.errors import AssemblyError, GatewayError
from gateway.store.index import Instance, Job, SeriesRevision
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)


def series_paths(store: InstanceStore, job_id: int) -> list[Path]:
    """The files of the job's series, every revision up to the job's own."""
    with store.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise GatewayError(f"no job {job_id}")
        if job.purged_at is not None:
            raise AssemblyError("the series' instances were purged by retention; send the series again to rerun it")
        rows = session.scalars(of_job_series(select(Instance.path), session, job)).all()
    return [store.path_of(p) for p in rows]


def of_job_series(query: Select[Any], session: Session, job: Job) -> Select[Any]:
    """``query`` over ``instances`` narrowed to the job's series as it stood then: every revision up to its own."""
    revision = session.get(SeriesRevision, job.revision_id)
    assert revision is not None, "a job always has its revision"
    return query.join(SeriesRevision, Instance.revision_id == SeriesRevision.id).where(
        Instance.series_instance_uid == job.series_instance_uid, SeriesRevision.revision <= revision.revision
    )


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


@dataclass(frozen=True)
class Assembled:
    """What assembling a job's series gave: the result (``None`` if assembly raised), what the job records of it,
    the failure reason if no volume could be made, and the seconds it took."""

    result: AssemblyResult | None
    summary: dict[str, Any]
    failure: str | None
    seconds: float


def assemble_job(store: InstanceStore, job_id: int) -> Assembled:
    """Assemble a claimed job's series (every revision up to the job's own); the runner records the outcome."""
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
    except (GatewayError, OSError, ValueError) as exc:  # one bad series fails its job; the runner catches the rest
        log.warning("assembly of job %d failed: %s", job_id, type(exc).__name__)
        summary, failure = {}, f"assembly failed: {type(exc).__name__}: {exc}"
    seconds = time.monotonic() - started
    log.info("job %d %s in %.1f s", job_id, "failed at assembly" if failure else "assembled", seconds)
    return Assembled(result, summary, failure, seconds)
