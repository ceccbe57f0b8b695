"""The durable export queue: one ``deliveries`` row per (output file, destination), driven to a final state.

:func:`enqueue` (:mod:`gateway.export.enqueue`) queues a run of a job's outputs, each file to each destination
that takes its kind; the kinds left out are listed in the job's ``detail.export.not_sent``.

A delivery is ``pending`` until a worker claims it (``sending``, under a claim token, by a conditional update),
then each attempt's outcome is committed as soon as it is known: ``delivered``; ``pending`` again with a later
``next_attempt_at`` (exponential backoff); ``refused`` with the reason, when the destination does not take
objects of that SOP class (it rejected the presentation context as an unsupported abstract syntax, or answered
0x0122); or ``dead`` with the reason. ``delivered``, ``refused`` and ``dead`` are final. A gateway that stops or
crashes leaves ``sending`` rows behind; the next start puts them back to ``pending`` (an instance whose success
was committed is never sent again; one whose answer was lost in the crash may be, under the same SOP Instance
UID).

A transient failure (unreachable, busy, timed out) is tried again with exponential backoff until the policy gives
up (by default after 24 hours: :class:`~gateway.export.outcome.RetryPolicy`); a delivery given up that way is
resent by itself once its destination answers a check again (:mod:`gateway.export.requeue`). Only deliveries of
an ``encoded`` job are sent: a cancelled job, or one being run again, sends nothing.

When every delivery of a job is delivered or refused the job is ``exported`` (``detail.export`` counts the refused
ones and lists their reasons); when none is left to send and some are dead, it is ``failed`` with ``{"stage":
"export", "reason": ...}`` (one line). The job's ``detail.encoded_at`` is when its deliveries were queued, and
``detail.timings.export_s`` the seconds from then to the end. :func:`retry_job`, :func:`resend_job` and
:func:`revive_destination` (:mod:`gateway.export.requeue`) put final deliveries back.

A job with results and no destination for them is never silent: it ends ``exported`` flagged
``detail.export.undelivered`` (:mod:`gateway.export.enqueue`).

:func:`enqueue`, :func:`release_held` and the requeueing functions live in their own modules and are re-exported
here: this module is the queue's one entry point.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gateway.errors import one_line
from gateway.export.destinations import NO_DESTINATION, output_kind
from gateway.export.enqueue import NO_KIND_TAKEN, NO_OUTPUT, enqueue, release_held
from gateway.export.outcome import Item, Kind, Outcome, RetryPolicy
from gateway.export.requeue import resend_job, retry_job, revivable_destinations, revive_destination
from gateway.export.rows import (
    DEAD,
    DELIVERED,
    PENDING,
    REFUSED,
    SENDING,
    appended,
)
from gateway.jobs.states import JobState
from gateway.store.index import Delivery, Job
from gateway.store.store import StoreIndex

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

__all__ = [
    "DEAD",
    "DELIVERED",
    "NO_DESTINATION",
    "NO_KIND_TAKEN",
    "NO_OUTPUT",
    "PENDING",
    "REFUSED",
    "SENDING",
    "StoreIndex",
    "claim",
    "deliveries_of",
    "depth",
    "enqueue",
    "record",
    "release",
    "release_held",
    "resend_job",
    "resume",
    "retry_job",
    "revivable_destinations",
    "revive_destination",
    "settle",
]

log = logging.getLogger(__name__)

_REASONS_LISTED = 5  # distinct reasons quoted in a job's failure or refused_reasons
_REASON_MAX = 1024  # characters of a delivery's last_error (the column's size)


def claim(
    store: StoreIndex, destinations: Collection[str], limit: int, *, now: float | None = None
) -> tuple[str, list[Item]] | None:
    """Claim up to ``limit`` due deliveries of the destination whose oldest delivery is due first.

    Returns the destination and the claimed items (``sending`` under one claim token), or ``None``.
    """
    now = time.time() if now is None else now
    due = (
        Delivery.state == PENDING,
        Delivery.next_attempt_at <= now,
        Delivery.destination.in_(destinations),
        Job.state == JobState.ENCODED,  # a cancelled job, or one being run again, sends nothing
    )
    order = (Delivery.next_attempt_at, Delivery.id)
    with store.write_sessions.begin() as session:
        name = session.scalar(_joined(select(Delivery.destination)).where(*due).order_by(*order).limit(1))
        if name is None:
            return None
        ids = session.scalars(
            _joined(select(Delivery.id)).where(*due, Delivery.destination == name).order_by(*order).limit(limit)
        ).all()
        token = uuid.uuid4().hex
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.state == PENDING)
            .values(state=SENDING, claim=token, updated_at=now)
        )
        rows = session.scalars(select(Delivery).where(Delivery.claim == token).order_by(*order)).all()
        return name, [_item(store, row) for row in rows]


def _joined(query: Any) -> Any:
    return query.join(Job, Job.id == Delivery.job_id)


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
    draw in [0, 1): :meth:`RetryPolicy.next_attempt_at`) counted from ``retry_from`` (default ``now``; the
    workers pass the batch's start, so that a batch that failed together is due again together), or makes it
    ``dead`` once the policy gives up (``give_up_after_s`` since the first attempt of its round, or
    ``max_attempts``). The first attempt's time is kept in each retry's history entry (``first_attempt_at``).
    Reasons are recorded as one line.
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        row = session.get(Delivery, item.id, with_for_update=True)
        if row is None or row.state != SENDING:
            return None
        row.attempts += 1
        start = now if retry_from is None else retry_from
        first = start if row.attempts == 1 else _first_attempt_at(row)
        state, reason = _next_state(row.attempts, outcome, policy, first, now)
        row.state = state
        row.claim = None
        row.last_status = outcome.status
        row.last_error = one_line(reason, _REASON_MAX) or None
        row.updated_at = now
        extra: dict[str, Any] = {}
        if state == PENDING:
            row.next_attempt_at = policy.next_attempt_at(row.attempts, jitter, first, start)
            extra["first_attempt_at"] = round(first, 3)
        if state == DELIVERED:
            row.delivered_at = now
        text = one_line(outcome.reason, _REASON_MAX)
        row.history = appended(row.history, now, outcome.kind.value, outcome.status, text, **extra)
        return state


def _first_attempt_at(row: Delivery) -> float:
    """When the round of attempts of a delivery that was tried before began (its last retry entry says)."""
    last = (row.history or [{}])[-1]
    first = last.get("first_attempt_at")
    return float(first) if isinstance(first, int | float) else float(row.created_at)


def _next_state(
    attempts: int, outcome: Outcome, policy: RetryPolicy, first_attempt_at: float, now: float
) -> tuple[str, str]:
    if outcome.delivered:
        return DELIVERED, outcome.reason
    if outcome.kind is Kind.REFUSED:
        return REFUSED, outcome.reason
    if outcome.kind is Kind.DEAD:
        return DEAD, outcome.reason
    why = policy.gives_up(attempts, first_attempt_at, now)
    if why is not None:
        return DEAD, f"{why}; last: {outcome.reason}"
    return PENDING, outcome.reason


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
            row.history = appended(row.history, now, Kind.DEAD.value, None, reason)
        jobs = session.scalars(
            select(Job.id).join(Delivery, Delivery.job_id == Job.id).where(Job.state == JobState.ENCODED).distinct()
        ).all()
    for job_id in jobs:
        settle(store, job_id, now=now)
    return int(resumed.rowcount), len(orphans)  # type: ignore[attr-defined]


def settle(
    store: StoreIndex, job_id: int, *, metrics: GatewayMetrics | None = None, now: float | None = None
) -> JobState | None:
    """Move an ``encoded`` job on once none of its deliveries is left to send; return its new state, if any.

    ``exported`` when every delivery was delivered or refused (``detail.export.refused_reasons`` says why for
    the refused ones), ``failed`` when any is dead (with a one-line reason). ``detail.timings.export_s`` is the
    time since ``detail.encoded_at``, also observed in ``metrics`` (stage ``export``).
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.state != JobState.ENCODED:
            return None
        rows = session.execute(
            select(Delivery.state, func.count()).where(Delivery.job_id == job_id).group_by(Delivery.state)
        )
        counts = Counter({state: int(n) for state, n in rows})
        if not counts or counts[PENDING] or counts[SENDING]:
            return None
        detail = dict(job.detail or {})
        detail["export"] = _summary(session, job_id, counts, detail.get("export", {}))
        if counts[DEAD]:
            detail["failure"] = {"stage": "export", "reason": one_line(_failure_reason(session, job_id, counts))}
        encoded_at = detail.get("encoded_at")
        seconds = max(0.0, now - float(encoded_at)) if isinstance(encoded_at, int | float) else None
        if seconds is not None:
            detail["timings"] = {**detail.get("timings", {}), "export_s": round(seconds, 3)}
        job.state = JobState.FAILED if counts[DEAD] else JobState.EXPORTED
        job.detail = detail
        job.updated_at = job.finished_at = now
        state = JobState(job.state)
    if state is JobState.FAILED:
        log.warning("job %d failed at export: %d of %d deliveries dead", job_id, counts[DEAD], sum(counts.values()))
    else:
        log.info("job %d exported", job_id)
    if metrics is not None and seconds is not None:
        metrics.job_stage("export", "", seconds)
    return state


def _summary(session: Session, job_id: int, counts: Counter[str], before: dict[str, Any]) -> dict[str, Any]:
    warnings = session.scalar(
        select(func.count()).where(
            Delivery.job_id == job_id, Delivery.state == DELIVERED, Delivery.last_error.is_not(None)
        )
    )
    summary = {key: value for key, value in before.items() if key != "refused_reasons"}
    summary.update(
        deliveries=sum(counts.values()),
        delivered=counts[DELIVERED],
        warnings=int(warnings or 0),
        refused=counts[REFUSED],
        dead=counts[DEAD],
    )
    if counts[REFUSED]:
        summary["refused_reasons"] = _listed(_reasons(session, job_id, REFUSED))
    return summary


def _reasons(session: Session, job_id: int, state: str) -> list[str]:
    """``destination: reason`` of the job's deliveries in ``state``, each once, in queue order."""
    pairs = session.execute(
        select(Delivery.destination, Delivery.last_error)
        .where(Delivery.job_id == job_id, Delivery.state == state)
        .order_by(Delivery.id)
    )
    return list(dict.fromkeys(f"{name}: {error}" for name, error in pairs))


def _listed(reasons: list[str]) -> list[str]:
    more = len(reasons) - _REASONS_LISTED
    return reasons[:_REASONS_LISTED] + ([f"(and {more} more)"] if more > 0 else [])


def _failure_reason(session: Session, job_id: int, counts: Counter[str]) -> str:
    reasons = _reasons(session, job_id, DEAD)
    more = f" (and {len(reasons) - _REASONS_LISTED} more)" if len(reasons) > _REASONS_LISTED else ""
    total = sum(counts.values())
    return f"{counts[DEAD]} of {total} deliveries dead: " + "; ".join(reasons[:_REASONS_LISTED]) + more


def deliveries_of(store: StoreIndex, job_id: int) -> list[dict[str, Any]]:
    """A job's deliveries as the API shows them: instance, kind, destination, state, attempts and their history.

    ``state`` is ``pending``, ``sending``, ``delivered``, ``refused`` or ``dead``; ``kind`` is the output's
    :data:`~gateway.config.OutputKind` (``None`` for a SOP class of no known kind).
    """
    with store.sessions() as session:
        rows = session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)).all()
        return [
            {
                "sop_instance_uid": row.sop_instance_uid,
                "sop_class_uid": row.sop_class_uid,
                "kind": output_kind(row.sop_class_uid),
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


def depth(store: StoreIndex) -> dict[str, dict[str, int]]:
    """How many deliveries each destination has in each state: ``{"pacs": {"pending": 3, "dead": 1}}``."""
    with store.sessions() as session:
        rows = session.execute(
            select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)
        ).all()
    found: dict[str, dict[str, int]] = {}
    for name, state, count in rows:
        found.setdefault(str(name), {})[str(state)] = int(count)
    return found
