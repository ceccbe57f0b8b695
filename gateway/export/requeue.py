"""Final deliveries back in the export queue: an operator's retry of what failed, a re-run of a job's export, and
the automatic resend of what a destination's outage killed once it answers again.

- :func:`retry_job`: a job's dead and refused deliveries (``gateway jobs retry``, ``POST /api/jobs/{id}/retry``).
- :func:`resend_job`: every delivery of a job, delivered ones included (a re-run from the export stage).
- :func:`revive_destination`: the deliveries to one destination that were given up after retrying for
  ``export.give_up_after_s`` (:data:`gateway.export.outcome.GAVE_UP`); the export workers call it when the
  destination answers a check again (:mod:`gateway.export.checks`). Deliveries the destination rejected (a
  status that says it will never take the file as it is) are not revived: that would only repeat the rejection.

Each moves the deliveries back to ``pending`` (attempts counted afresh, the history kept with a ``requeued``
entry saying why) and their jobs back to ``encoded`` through the transitions the job table allows (``failed`` or
``exported`` to ``encoded``), in one transaction, conditional on the states read under lock.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from gateway.errors import ExportError, JobConflict
from gateway.export.outcome import GAVE_UP
from gateway.export.rows import DEAD, FINAL, REFUSED, locked_job, outputs_purged, reopen_job, requeue_row
from gateway.jobs.states import JobState
from gateway.store.index import Delivery, Job
from gateway.store.store import StoreIndex

__all__ = ["resend_job", "retry_job", "revivable_destinations", "revive_destination"]

log = logging.getLogger(__name__)

_RESENDABLE = (JobState.ENCODED, JobState.EXPORTED, JobState.FAILED)
#: The jobs whose given-up deliveries a destination's return revives (not one being re-run, or cancelled).
_REVIVABLE_JOBS = (JobState.ENCODED, JobState.FAILED)


def retry_job(store: StoreIndex, job_id: int, *, now: float | None = None) -> int:
    """Requeue a job's dead and refused deliveries (attempts reset, history kept); the job goes to ``encoded``.

    Refused ones are sent again too: the destination may have been configured since to take their SOP class
    (if not, they end refused again, and the job ``exported``).

    Returns
    -------
    int
        How many deliveries were requeued.

    Raises
    ------
    gateway.errors.NotFound
        If there is no job ``job_id``.
    gateway.errors.ExportError
        If the job has no dead or refused delivery (nothing to retry), or retention purged its outputs; nothing
        changes.
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        job = locked_job(session, job_id)
        ended = session.scalars(
            select(Delivery).where(Delivery.job_id == job_id, Delivery.state.in_((DEAD, REFUSED)))
        ).all()
        if not ended:
            raise ExportError(f"job {job_id} has no dead or refused delivery to retry (state {job.state})")
        if outputs_purged(job):
            raise ExportError(f"job {job_id}'s outputs were purged by retention: there is nothing left to resend")
        for row in ended:
            requeue_row(row, now, "retry requested")
        reopen_job(job, now)
    log.info("job %d: %d dead or refused deliveries requeued", job_id, len(ended))
    return len(ended)


def resend_job(store: StoreIndex, job_id: int, *, now: float | None = None) -> int:
    """Send every delivery of a job again, delivered ones included (a re-run from the export stage).

    The job must be ``encoded``, ``exported`` or ``failed``; it goes (back) to ``encoded``, and its
    ``detail.encoded_at`` is reset so that the export's time counts from now. Deliveries still ``pending`` or
    ``sending`` are left as they are.

    Returns
    -------
    int
        How many final deliveries were put back to ``pending``.

    Raises
    ------
    gateway.errors.NotFound
        If there is no job ``job_id``.
    gateway.errors.JobConflict
        If the job is in another state (still being processed, or cancelled).
    gateway.errors.ExportError
        If the job has no delivery at all (its results had no destination: the reason says why), or retention
        purged its outputs.
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        job = locked_job(session, job_id)
        if job.state not in _RESENDABLE:
            raise JobConflict(f"job {job_id} is {job.state}: only an encoded, exported or failed job is sent again")
        if outputs_purged(job):
            raise ExportError(f"job {job_id}'s outputs were purged by retention: there is nothing left to resend")
        rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
        if not rows:
            why = (job.detail or {}).get("export", {}).get("reason") or "no delivery was queued"
            raise ExportError(f"job {job_id} has no delivery to send again: {why}")
        ended = [row for row in rows if row.state in FINAL]
        for row in ended:
            requeue_row(row, now, "re-run from export")
            row.delivered_at = None
        if ended:
            reopen_job(job, now)
            job.detail = {**job.detail, "encoded_at": round(now, 3)}
    log.info("job %d: %d deliveries sent again (re-run from export)", job_id, len(ended))
    return len(ended)


def revivable_destinations(store: StoreIndex) -> list[str]:
    """The destinations that have deliveries :func:`revive_destination` would requeue, by name."""
    with store.sessions() as session:
        names = session.scalars(
            select(Delivery.destination)
            .join(Job, Job.id == Delivery.job_id)
            .where(Delivery.state == DEAD, Delivery.last_error.startswith(GAVE_UP), Job.state.in_(_REVIVABLE_JOBS))
            .distinct()
        ).all()
    return sorted(names)


def revive_destination(store: StoreIndex, name: str, *, now: float | None = None) -> int:
    """Put the deliveries to ``name`` that were given up after retrying back to ``pending``; their jobs that had
    failed go back to ``encoded``.

    Only deliveries dead because they were given up (:data:`~gateway.export.outcome.GAVE_UP`: the destination was
    unreachable, busy or timing out for ``give_up_after_s``), of jobs ``encoded`` or ``failed`` whose outputs are
    still there, are revived; a rejection by the destination is not.

    Returns
    -------
    int
        How many deliveries were requeued (logged at INFO, with the number of jobs: counts only).
    """
    now = time.time() if now is None else now
    given_up = (Delivery.destination == name, Delivery.state == DEAD, Delivery.last_error.startswith(GAVE_UP))
    with store.write_sessions.begin() as session:
        jobs = session.scalars(
            select(Job)
            .where(Job.state.in_(_REVIVABLE_JOBS), Job.id.in_(select(Delivery.job_id).where(*given_up)))
            .order_by(Job.id)
            .with_for_update()
        ).all()
        jobs = [job for job in jobs if not outputs_purged(job)]
        rows = session.scalars(
            select(Delivery).where(*given_up, Delivery.job_id.in_([job.id for job in jobs])).with_for_update()
        ).all()
        for row in rows:
            requeue_row(row, now, f"destination {name!r} answers again")
        reopened = [job for job in jobs if job.state == JobState.FAILED]
        for job in reopened:
            reopen_job(job, now)
    if rows:
        log.info(
            "export: destination %s answers again: %d given-up deliveries requeued (%d job(s), %d of them failed)",
            name,
            len(rows),
            len(jobs),
            len(reopened),
        )
    return len(rows)
