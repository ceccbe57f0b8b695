"""The durable export queue: one ``deliveries`` row per (output file, destination), driven to delivered or dead.

A delivery is ``pending`` until a worker claims it (``sending``, under a claim token, by a conditional update),
then each attempt's outcome is committed as soon as it is known: ``delivered``; ``pending`` again with a later
``next_attempt_at`` (exponential backoff); or ``dead`` with the reason. A gateway that stops or crashes leaves
``sending`` rows behind; the next start puts them back to ``pending`` (an instance whose success was committed is
never sent again; one whose answer was lost in the crash may be, under the same SOP Instance UID).

When every delivery of a job is delivered the job is ``exported``; when none is left to send and some are dead,
it is ``failed`` with ``{"stage": "export", "reason": ...}``. :func:`retry_job` requeues the dead ones.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gateway.errors import ExportError, NotFound
from gateway.export.outcome import Item, Kind, Outcome, RetryPolicy
from gateway.jobs.states import JobState
from gateway.store.index import Delivery, Job
from gateway.store.store import StoreIndex

__all__ = [
    "StoreIndex",
    "claim",
    "deliveries_of",
    "enqueue",
    "record",
    "release",
    "resume",
    "retry_job",
    "settle",
]

log = logging.getLogger(__name__)

PENDING, SENDING, DELIVERED, DEAD = "pending", "sending", "delivered", "dead"
NO_DESTINATION = "no destination configured"
_HISTORY_MAX = 100  # attempts kept per delivery (the oldest are dropped after many manual retries)
_REASONS_IN_FAILURE = 5


def enqueue(
    store: StoreIndex, job_id: int, files: Sequence[Path], destinations: Sequence[str], *, now: float | None = None
) -> int:
    """Queue every file of a job for every destination, in one transaction, and move the job to ``encoded``.

    With no destination (or no file) there is nothing to send: the job goes straight to ``exported``, its detail
    saying why. Calling it again for the same job adds only the (file, destination) pairs not queued yet.

    Parameters
    ----------
    store
        The instance store (or any :class:`StoreIndex`).
    job_id
        The job whose outputs these are.
    files
        The output files, already written durably (DICOM Part 10).
    destinations
        Destination names (:func:`gateway.export.destinations.destinations_for`).
    now
        The time recorded (seconds since the epoch); the wall clock when omitted.

    Returns
    -------
    int
        How many deliveries were added.

    Raises
    ------
    gateway.errors.NotFound
        If there is no job ``job_id``.
    gateway.errors.ExportError
        If a file is not a readable DICOM file with SOP Class and SOP Instance UIDs (nothing is queued).
    """
    now = time.time() if now is None else now
    headers = [_header(store, Path(f)) for f in files]
    names = list(dict.fromkeys(destinations))
    with store.write_sessions.begin() as session:
        job = _job(session, job_id)
        rows = session.execute(select(Delivery.sop_instance_uid, Delivery.destination).where(Delivery.job_id == job_id))
        queued = {(uid, name) for uid, name in rows}
        added = 0
        for relpath, sop_class, sop_instance, syntax in headers:
            for name in names:
                if (sop_instance, name) in queued:
                    continue
                queued.add((sop_instance, name))
                session.add(_new_delivery(job_id, relpath, sop_class, sop_instance, syntax, name, now))
                added += 1
        _mark_queued(job, len(queued), names, now)
    log.info("job %d: %d deliveries queued for %d destination(s)", job_id, added, len(names))
    return added


def _header(store: StoreIndex, path: Path) -> tuple[str, str, str, str]:
    """(stored path, SOP Class UID, SOP Instance UID, transfer syntax) of an output file."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        values = (str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as exc:
        raise ExportError(f"output file {path.name} cannot be queued: {type(exc).__name__}") from None
    absolute = path.resolve()
    stored = absolute.relative_to(store.data_dir) if absolute.is_relative_to(store.data_dir) else absolute
    return (str(stored), *values)


def _new_delivery(
    job_id: int, path: str, sop_class: str, sop_instance: str, syntax: str, destination: str, now: float
) -> Delivery:
    return Delivery(
        job_id=job_id,
        path=path,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax_uid=syntax,
        destination=destination,
        state=PENDING,
        attempts=0,
        next_attempt_at=now,
        history=[],
        created_at=now,
        updated_at=now,
    )


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def _mark_queued(job: Job, total: int, names: list[str], now: float) -> None:
    detail = dict(job.detail or {})
    detail["export"] = {"deliveries": total, "destinations": names}
    if total:
        job.state = JobState.ENCODED
    else:
        detail["export"]["reason"] = NO_DESTINATION if not names else "no output file to send"
        job.state = JobState.EXPORTED
    job.detail = detail
    job.updated_at = now


def claim(
    store: StoreIndex, destinations: Collection[str], limit: int, *, now: float | None = None
) -> tuple[str, list[Item]] | None:
    """Claim up to ``limit`` due deliveries of the destination whose oldest delivery is due first.

    Returns the destination and the claimed items (``sending`` under one claim token), or ``None``.
    """
    now = time.time() if now is None else now
    due = (Delivery.state == PENDING, Delivery.next_attempt_at <= now, Delivery.destination.in_(destinations))
    order = (Delivery.next_attempt_at, Delivery.id)
    with store.write_sessions.begin() as session:
        name = session.scalar(select(Delivery.destination).where(*due).order_by(*order).limit(1))
        if name is None:
            return None
        ids = session.scalars(
            select(Delivery.id).where(*due, Delivery.destination == name).order_by(*order).limit(limit)
        ).all()
        token = uuid.uuid4().hex
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.state == PENDING)
            .values(state=SENDING, claim=token, updated_at=now)
        )
        rows = session.scalars(select(Delivery).where(Delivery.claim == token).order_by(*order)).all()
        return name, [_item(store, row) for row in rows]


def _item(store: StoreIndex, row: Delivery) -> Item:
    return Item(
        row.id,
        row.job_id,
        store.data_dir / row.path,
        row.sop_class_uid,
        row.sop_instance_uid,
        row.transfer_syntax_uid,
    )


def record(
    store: StoreIndex,
    item: Item,
    outcome: Outcome,
    policy: RetryPolicy,
    *,
    jitter: float = 0.5,
    now: float | None = None,
    retry_from: float | None = None,
) -> str | None:
    """Commit one attempt's outcome for a claimed delivery; return its new state (``None`` if it was not claimed).

    A retryable outcome puts the delivery back to ``pending`` after the policy's backoff (scaled by ``jitter``, a
    draw in [0, 1): :meth:`RetryPolicy.delay_s`) counted from ``retry_from`` (default ``now``; the workers pass
    the batch's start, so that a batch that failed together is due again together), or makes it ``dead`` once it
    has had ``max_attempts`` attempts.
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        row = session.get(Delivery, item.id)
        if row is None or row.state != SENDING:
            return None
        row.attempts += 1
        state, reason = _next_state(row.attempts, outcome, policy)
        row.state = state
        row.claim = None
        row.last_status = outcome.status
        row.last_error = reason[:1024] or None
        row.updated_at = now
        if state == PENDING:
            row.next_attempt_at = (now if retry_from is None else retry_from) + policy.delay_s(row.attempts, jitter)
        if state == DELIVERED:
            row.delivered_at = now
        row.history = _appended(row.history, now, outcome.kind.value, outcome.status, outcome.reason)
        return state


def _next_state(attempts: int, outcome: Outcome, policy: RetryPolicy) -> tuple[str, str]:
    if outcome.delivered:
        return DELIVERED, outcome.reason
    if outcome.kind is Kind.DEAD:
        return DEAD, outcome.reason
    if attempts >= policy.max_attempts:
        return DEAD, f"gave up after {attempts} attempts; last: {outcome.reason}"
    return PENDING, outcome.reason


def _appended(
    history: list[dict[str, Any]] | None, now: float, outcome: str, status: int | None, reason: str
) -> list[dict[str, Any]]:
    entry = {"at": round(now, 3), "outcome": outcome, "status": status, "reason": reason}
    return [*(history or []), entry][-_HISTORY_MAX:]


def release(store: StoreIndex, ids: Collection[int], *, at: float, now: float | None = None) -> int:
    """Put claimed deliveries that were not attempted back to ``pending``, due at ``at``; return how many."""
    if not ids:
        return 0
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.state == SENDING)
            .values(state=PENDING, claim=None, next_attempt_at=at, updated_at=now)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def resume(store: StoreIndex, configured: Collection[str], *, now: float | None = None) -> tuple[int, int]:
    """At start: ``sending`` deliveries go back to ``pending``, those of unconfigured destinations are dead.

    Jobs whose deliveries all ended before a crash let their job move on (:func:`settle`). Returns (resumed,
    dead-lettered).
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        resumed = session.execute(
            update(Delivery).where(Delivery.state == SENDING).values(state=PENDING, claim=None, updated_at=now)
        )
        orphans = session.scalars(
            select(Delivery).where(Delivery.state == PENDING, Delivery.destination.not_in(configured))
        ).all()
        for row in orphans:
            reason = f"destination {row.destination!r} is no longer configured"
            row.state, row.last_error, row.updated_at = DEAD, reason, now
            row.history = _appended(row.history, now, Kind.DEAD.value, None, reason)
        jobs = session.scalars(
            select(Job.id).join(Delivery, Delivery.job_id == Job.id).where(Job.state == JobState.ENCODED).distinct()
        ).all()
    for job_id in jobs:
        settle(store, job_id, now=now)
    return int(resumed.rowcount), len(orphans)  # type: ignore[attr-defined]


def settle(store: StoreIndex, job_id: int, *, now: float | None = None) -> JobState | None:
    """Move an ``encoded`` job on once none of its deliveries is left to send; return its new state, if any."""
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.ENCODED:
            return None
        rows = session.execute(
            select(Delivery.state, func.count()).where(Delivery.job_id == job_id).group_by(Delivery.state)
        )
        counts = Counter({state: int(n) for state, n in rows})
        if not counts or counts[PENDING] or counts[SENDING]:
            return None
        detail = dict(job.detail or {})
        detail["export"] = {**detail.get("export", {}), **_summary(session, job_id, counts)}
        if counts[DEAD]:
            detail["failure"] = {"stage": "export", "reason": _failure_reason(session, job_id, counts)}
        job.state = JobState.FAILED if counts[DEAD] else JobState.EXPORTED
        job.detail = detail
        job.updated_at = now
        state = JobState(job.state)
    log.info("job %d %s", job_id, state.value)
    return state


def _summary(session: Session, job_id: int, counts: Counter[str]) -> dict[str, int]:
    warnings = session.scalar(
        select(func.count()).where(
            Delivery.job_id == job_id, Delivery.state == DELIVERED, Delivery.last_error.is_not(None)
        )
    )
    return {
        "deliveries": sum(counts.values()),
        "delivered": counts[DELIVERED],
        "warnings": int(warnings or 0),
        "dead": counts[DEAD],
    }


def _failure_reason(session: Session, job_id: int, counts: Counter[str]) -> str:
    pairs = session.execute(
        select(Delivery.destination, Delivery.last_error)
        .where(Delivery.job_id == job_id, Delivery.state == DEAD)
        .order_by(Delivery.id)
    )
    reasons = list(dict.fromkeys(f"{name}: {error}" for name, error in pairs))
    more = f" (and {len(reasons) - _REASONS_IN_FAILURE} more)" if len(reasons) > _REASONS_IN_FAILURE else ""
    total = sum(counts.values())
    return f"{counts[DEAD]} of {total} deliveries dead: " + "; ".join(reasons[:_REASONS_IN_FAILURE]) + more


def retry_job(store: StoreIndex, job_id: int, *, now: float | None = None) -> int:
    """Put a job's dead deliveries back to ``pending`` (attempts reset, history kept) and the job to ``encoded``.

    Returns
    -------
    int
        How many deliveries were requeued.

    Raises
    ------
    gateway.errors.NotFound
        If there is no job ``job_id``.
    gateway.errors.ExportError
        If the job has no dead delivery (nothing to retry).
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        job = _job(session, job_id)
        dead = session.scalars(select(Delivery).where(Delivery.job_id == job_id, Delivery.state == DEAD)).all()
        if not dead:
            raise ExportError(f"job {job_id} has no dead delivery to retry (state {job.state})")
        for row in dead:
            row.state, row.attempts, row.next_attempt_at, row.updated_at = PENDING, 0, now, now
            row.history = _appended(row.history, now, "requeued", None, "retry requested")
        detail = dict(job.detail or {})
        if detail.get("failure", {}).get("stage") == "export":
            detail["previous_failures"] = [*detail.get("previous_failures", []), detail.pop("failure")]
        job.detail = detail
        job.state = JobState.ENCODED
        job.updated_at = now
    log.info("job %d: %d dead deliveries requeued", job_id, len(dead))
    return len(dead)


def deliveries_of(store: StoreIndex, job_id: int) -> list[dict[str, Any]]:
    """A job's deliveries as the API shows them: instance, destination, state, attempts and their history."""
    with store.sessions() as session:
        rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)).all()
        return [
            {
                "sop_instance_uid": row.sop_instance_uid,
                "sop_class_uid": row.sop_class_uid,
                "destination": row.destination,
                "state": row.state,
                "attempts": row.attempts,
                "next_attempt_at": row.next_attempt_at if row.state == PENDING else None,
                "last_status": row.last_status,
                "last_error": row.last_error,
                "delivered_at": row.delivered_at,
                "history": row.history or [],
            }
            for row in rows
        ]
