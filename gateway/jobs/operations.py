"""An operator's moves of a job: re-run it, cancel it, reprocess a series with the models registered now.

Each is one transaction that reads the job's row ``FOR UPDATE`` and writes it only if it is still in the state the
move starts from (:data:`gateway.jobs.states.TRANSITIONS`), so an operator's move and a worker's never both win:

- a job **cancelled** while a worker holds it loses its lease; the worker's next conditional write raises
  :class:`~gateway.errors.LeaseLost` and the worker drops the job. A cancelled job's deliveries not yet sent are
  ``cancelled`` too: no export worker takes them;
- a **re-run from assembly** puts a finished job back to ``received`` with a fresh detail (the previous run's
  outcome kept, short, in ``detail.previous_runs``); the models that apply now run, and outputs keep their UIDs
  (derived from the sources and the model, :mod:`gateway.encode.uids`), so a PACS's copy is replaced, not doubled;
- a **re-run from export** sends every output of the job again (:func:`gateway.export.queue.resend_job`);
- **reprocessing** a series adds a revision with no new instance and its job: a job covers every revision of its
  series up to its own (:func:`gateway.jobs.assembly.of_job_series`), so it runs on the whole series as stored.

Each records who asked and when: ``detail.requested = {"action", "by", "at"}``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway.errors import ExportError, JobConflict, NotFound
from gateway.ingest.completion import create_job
from gateway.jobs.lifecycle import end_claim
from gateway.jobs.states import DURABLE, FINISHED, LEASED, JobState, allowed
from gateway.store.index import Delivery, Instance, Job, Series, SeriesRevision
from gateway.store.store import StoreIndex

__all__ = ["CANCELLED_DELIVERY", "RERUN_FROM", "cancel", "reprocess_series", "rerun"]

log = logging.getLogger(__name__)

#: The stages a job may be re-run from.
RERUN_FROM: tuple[str, ...] = ("assemble", "export")

#: The state of a cancelled job's deliveries that were still to send (final: no export worker claims it).
CANCELLED_DELIVERY = "cancelled"

_UNSENT = ("pending", "sending")
_PREVIOUS_RUNS_KEPT = 10
#: What a re-run from assembly keeps of a job's detail (the rest is the previous run's, and goes).
_KEPT = ("revision", "instances", "released_with_refused", "previous_runs")
_CANCELLABLE = frozenset({*DURABLE, *LEASED})
_RESENDABLE = frozenset({JobState.ENCODED, JobState.EXPORTED, JobState.FAILED})


def _requested(action: str, by: str | None, now: float) -> dict[str, Any]:
    return {"action": action, "by": by, "at": round(now, 3)}


def _locked_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def rerun(
    store: StoreIndex, job_id: int, *, from_stage: str, by: str | None = None, now: float | None = None
) -> JobState:
    """Run a job again from ``from_stage`` (one of :data:`RERUN_FROM`); return its new state.

    ``"assemble"``: a finished job (``exported``, ``skipped``, ``failed`` or ``cancelled``) goes back to
    ``received``, and runs with the models as registered now. ``"export"``: every output of an ``encoded``,
    ``exported`` or ``failed`` job is sent again; the job is ``encoded`` until they are.

    Parameters
    ----------
    store
        The index.
    job_id
        The job.
    from_stage
        ``"assemble"`` or ``"export"``.
    by
        Who asked (a token's name), recorded in ``detail.requested``.
    now
        The time recorded (seconds since the epoch); the wall clock when omitted.

    Raises
    ------
    ValueError
        If ``from_stage`` is not one of :data:`RERUN_FROM`.
    gateway.errors.NotFound
        If there is no job ``job_id``.
    gateway.errors.JobConflict
        If the job cannot be re-run from there now (the reason says why); nothing changes.
    """
    now = time.time() if now is None else now
    if from_stage == "assemble":
        return _rerun_assembly(store, job_id, by, now)
    if from_stage == "export":
        return _rerun_export(store, job_id, by, now)
    raise ValueError(f"from_stage must be one of {', '.join(RERUN_FROM)}, not {from_stage!r}")


def _rerun_assembly(store: StoreIndex, job_id: int, by: str | None, now: float) -> JobState:
    with store.write_sessions.begin() as session:
        job = _locked_job(session, job_id)
        state = JobState(job.state)
        if state not in FINISHED or not allowed(state, JobState.RECEIVED):
            raise JobConflict(f"job {job_id} is {state.value}: only a finished job can be re-run (cancel it first)")
        if job.purged_at is not None:
            raise JobConflict(f"job {job_id}'s series was purged by retention: send the series again to run it anew")
        job.detail = _fresh_detail(job, now, by)
        job.state, job.updated_at = JobState.RECEIVED, now
        job.finished_at = job.lease_owner = job.lease_expires_at = None
        job.attempts = 0
    log.info("job %d: re-run from assembly requested (was %s)", job_id, state.value)
    return JobState.RECEIVED


def _fresh_detail(job: Job, now: float, by: str | None) -> dict[str, Any]:
    """A job's detail for its next run: what identifies it, the previous runs' outcomes, who asked."""
    detail: dict[str, Any] = dict(job.detail or {})
    previous = {
        "state": job.state,
        "failure": detail.get("failure"),
        "finished_at": job.finished_at,
        "timings": detail.get("timings", {}),
        "requested": detail.get("requested"),
    }
    kept = {key: detail[key] for key in _KEPT if key in detail}
    runs = [*kept.get("previous_runs", []), {k: v for k, v in previous.items() if v is not None}]
    kept["previous_runs"] = runs[-_PREVIOUS_RUNS_KEPT:]
    return {**kept, "queued_at": round(now, 3), "requested": _requested("rerun-assemble", by, now)}


def _rerun_export(store: StoreIndex, job_id: int, by: str | None, now: float) -> JobState:
    from gateway.export.queue import resend_job

    with store.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        state, detail = JobState(job.state), dict(job.detail or {})
    if state not in _RESENDABLE:
        raise JobConflict(
            f"job {job_id} is {state.value}: only an encoded, exported or failed job's outputs can be sent again"
        )
    if not detail.get("outputs"):
        raise JobConflict(f"job {job_id} has no outputs to send (re-run it from assembly instead)")
    try:
        resent = resend_job(store, job_id, now=now)
    except ExportError as exc:
        raise JobConflict(exc.reason) from None
    if not resent:
        raise JobConflict(f"job {job_id}'s deliveries are all still waiting to be sent: nothing to send again")
    _note(store, job_id, _requested("rerun-export", by, now), now)
    log.info("job %d: %d deliveries to send again", job_id, resent)
    return JobState.ENCODED


def _note(store: StoreIndex, job_id: int, requested: dict[str, Any], now: float) -> None:
    with store.write_sessions.begin() as session:
        job = _locked_job(session, job_id)
        job.detail = {**(job.detail or {}), "requested": requested}
        job.updated_at = now


def cancel(store: StoreIndex, job_id: int, *, by: str | None = None, now: float | None = None) -> None:
    """Cancel a job that has not finished: ``received``, held by a worker, or ``encoded`` (deliveries to send).

    Its deliveries still to send become ``cancelled`` (never sent); a worker holding the job drops it at its next
    write. The job is ``cancelled``, a final state (it can be re-run from assembly).

    Raises
    ------
    gateway.errors.NotFound
        If there is no job ``job_id``.
    gateway.errors.JobConflict
        If the job has finished already; nothing changes.
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        job = _locked_job(session, job_id)
        state = JobState(job.state)
        if state not in _CANCELLABLE or not allowed(state, JobState.CANCELLED):
            raise JobConflict(f"job {job_id} is {state.value} already: there is nothing to cancel")
        stopped = session.execute(
            update(Delivery)
            .where(Delivery.job_id == job_id, Delivery.state.in_(_UNSENT))
            .values(state=CANCELLED_DELIVERY, claim=None, claim_owner=None, claim_expires_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        detail = {**(job.detail or {}), "requested": _requested("cancel", by, now)}
        detail["cancelled"] = {"from": state.value, "deliveries_not_sent": int(stopped)}
        job.detail = detail
        if job.lease_owner is not None:  # cancelled under a worker's lease: the lease's record ends here
            end_claim(session, job_id, job.lease_owner, JobState.CANCELLED.value, now)
        job.state, job.updated_at, job.finished_at = JobState.CANCELLED, now, now
        job.lease_owner = job.lease_expires_at = None
    log.info("job %d cancelled (was %s; %d deliveries not sent)", job_id, state.value, stopped)


def reprocess_series(
    store: StoreIndex, series_instance_uid: str, *, by: str | None = None, now: float | None = None
) -> int:
    """Run a series again, as stored, with the models registered now: a new revision and its ``received`` job.

    The revision holds no new instance (``instance_count`` 0) and is complete at once; its job covers every
    revision up to its own, so it runs on the whole series (``detail.instances`` counts them).

    Returns
    -------
    int
        The new job's id.

    Raises
    ------
    gateway.errors.NotFound
        If the index holds no such series.
    gateway.errors.JobConflict
        If the series has a job that has not finished, instances still arriving (an open or held revision), or
        no instance left (purged by retention); nothing changes.
    """
    now = time.time() if now is None else now
    try:
        with store.write_sessions.begin() as session:
            job_id = _reprocess(session, series_instance_uid, by, now)
    except IntegrityError:  # a revision of the series was opened meanwhile (PostgreSQL; SQLite serialises writers)
        raise JobConflict("instances of the series arrived meanwhile; try again once the series is complete") from None
    log.info("job %d: a series reprocessed with the current models", job_id)
    return job_id


def _reprocess(session: Session, series_uid: str, by: str | None, now: float) -> int:
    series = session.get(Series, series_uid, with_for_update=True)
    if series is None:
        raise NotFound("no such series")
    busy = session.scalar(
        select(Job.id).where(Job.series_instance_uid == series_uid, Job.state.not_in(FINISHED)).limit(1)
    )
    if busy is not None:
        raise JobConflict(f"the series has a job that has not finished (job {busy}): wait for it, or cancel it")
    latest = session.scalars(
        select(SeriesRevision)
        .where(SeriesRevision.series_instance_uid == series_uid)
        .order_by(SeriesRevision.revision.desc())
        .limit(1)
    ).first()
    if latest is not None and latest.state != "complete":
        raise JobConflict(f"the series' revision {latest.revision} is {latest.state}: reprocess it once it completes")
    count = int(session.scalar(select(func.count()).where(Instance.series_instance_uid == series_uid)) or 0)
    if not count:
        raise JobConflict("the series has no instance left (purged by retention): send it again to run it")
    number = 1 if latest is None else latest.revision + 1
    revision = SeriesRevision(
        series_instance_uid=series_uid,
        revision=number,
        state="complete",
        first_received_at=now,
        last_received_at=now,
        completed_at=now,
        instance_count=0,
    )
    session.add(revision)
    session.flush()
    made = create_job(session, revision, now, instances=count, requested=_requested("reprocess", by, now))
    return made.job_id
