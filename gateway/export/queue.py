"""The durable export queue: one ``deliveries`` row per (output file, destination), driven to a final state.

:func:`enqueue` (:mod:`gateway.export.enqueue`) queues a run of a job's outputs, each file to each destination
that takes its kind; the kinds left out are listed in the job's ``detail.export.not_sent``.

A delivery is ``pending`` until a worker claims it (``sending``, under a claim token, by a conditional update),
then each attempt's outcome is committed as soon as it is known: ``delivered``; ``pending`` again with a later
``next_attempt_at`` (exponential backoff); ``refused`` with the reason, when the destination does not take
objects of that SOP class (it rejected the presentation context as an unsupported abstract syntax, or answered
0x0122); or ``dead`` with the reason. ``delivered``, ``refused`` and ``dead`` are final.

Several export processes may share one index (``gateway serve --role export`` on PostgreSQL). A claim picks its
rows ``FOR UPDATE SKIP LOCKED`` and names its process (``claim_owner``, ``host/pid/token``:
:func:`gateway.jobs.lifecycle.owner_identity`) with a lease (``claim_expires_at``) that the process renews while it
lives (:func:`renew_claims`). A process that stops or crashes leaves ``sending`` rows behind: they go back to
``pending`` when their lease has expired (:func:`reclaim_expired_claims`, run by every export process), or at
once when a process of the same host starts and finds their process gone (:func:`resume`). A live process's
claims are never taken. An outcome is written only by the claim it was sent under (same token): a process whose
claim was taken meanwhile writes nothing, and the new claimer sends the instance again. Export is therefore
at least once: an instance whose success was committed is never sent again, but one whose answer was lost (a
crash, a claim taken back) may be, under the same SOP Instance UID. That is harmless: a PACS that receives a SOP
Instance UID it holds already keeps one instance (it overwrites or ignores the copy, as its PS3.2 conformance
statement says), by C-STORE as by STOW-RS.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, true, update
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
from gateway.jobs.lifecycle import process_running
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
    "ClaimedItem",
    "StoreIndex",
    "claim",
    "deliveries_of",
    "depth",
    "enqueue",
    "reclaim_expired_claims",
    "record",
    "release",
    "release_held",
    "renew_claims",
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


@dataclass(frozen=True)
class ClaimedItem(Item):
    """A delivery as :func:`claim` hands it out: the item, and the claim token it is ``sending`` under (an outcome
    is recorded only while the row is still under that token: :func:`record`)."""

    claim: str = ""


def claim(
    store: StoreIndex,
    destinations: Collection[str],
    limit: int,
    *,
    owner: str,
    lease_s: float,
    now: float | None = None,
) -> tuple[str, list[ClaimedItem]] | None:
    """Claim up to ``limit`` due deliveries of the destination whose oldest delivery is due first.

    The rows are picked ``FOR UPDATE SKIP LOCKED`` (PostgreSQL: another process's claim under way is passed over,
    not waited for; SQLite's writer lock serialises claims) and stamped with ``owner`` (the process,
    ``host/pid/token``) and a lease of ``lease_s`` seconds, which :func:`renew_claims` extends while it lives.
    Only deliveries of an ``encoded`` job are claimed.

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
        name = session.scalar(
            _joined(select(Delivery.destination))
            .where(*due)
            .order_by(*order)
            .limit(1)
            .with_for_update(of=Delivery, skip_locked=True)
        )
        if name is None:
            return None
        rows = session.scalars(
            _joined(select(Delivery))
            .where(*due, Delivery.destination == name)
            .order_by(*order)
            .limit(limit)
            .with_for_update(of=Delivery, skip_locked=True)
        ).all()
        if not rows:
            return None
        token = uuid.uuid4().hex
        for row in rows:
            row.state, row.claim, row.updated_at = SENDING, token, now
            row.claim_owner, row.claim_expires_at = owner, now + lease_s
        return name, [_item(store, row, token) for row in rows]


def _joined(query: Any) -> Any:
    return query.join(Job, Job.id == Delivery.job_id)


def _item(store: StoreIndex, row: Delivery, token: str) -> ClaimedItem:
    return ClaimedItem(
        row.id,
        row.job_id,
        store.data_dir / row.path,
        row.sop_class_uid,
        row.sop_instance_uid,
        row.transfer_syntax_uid,
        token,
    )


def renew_claims(store: StoreIndex, owner: str, lease_s: float, *, now: float | None = None) -> int:
    """Extend the lease of every ``sending`` delivery ``owner`` holds to ``lease_s`` from now; return how many
    (the export process's heartbeat)."""
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.claim_owner == owner, Delivery.state == SENDING)
            .values(claim_expires_at=now + lease_s)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def _expired(now: float) -> Any:
    """A claim whose lease lapsed, or one without owner or lease (made by a gateway older than claim leases)."""
    return or_(Delivery.claim_owner.is_(None), Delivery.claim_expires_at.is_(None), Delivery.claim_expires_at < now)


def reclaim_expired_claims(store: StoreIndex, *, now: float | None = None) -> int:
    """Put ``sending`` deliveries whose claim's lease expired (their process is gone, on any host) back to
    ``pending``; return how many."""
    now = time.time() if now is None else now
    taken = _take_back(store, _expired(now), now)
    if taken:
        log.warning("export: %d deliveries taken back from an export process whose claim expired", taken)
    return taken


def _take_back(store: StoreIndex, where: Any, now: float) -> int:
    with store.write_sessions.begin() as session:
        rows = session.scalars(
            select(Delivery).where(Delivery.state == SENDING, where).with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            row.state, row.updated_at = PENDING, now
            row.claim = row.claim_owner = row.claim_expires_at = None
        return len(rows)


def _gone_owners(store: StoreIndex, owner: str) -> list[str]:
    """The owners of ``sending`` claims that name a process of ``owner``'s host that is not running (this very
    process's earlier life included: same pid, another token)."""
    host = owner.split("/", 1)[0]
    with store.sessions() as session:
        owners = session.scalars(
            select(Delivery.claim_owner).where(Delivery.state == SENDING, Delivery.claim_owner.is_not(None)).distinct()
        ).all()
    return [o for o in owners if o is not None and o.split("/", 1)[0] == host and not process_running(o)]


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
    """Commit one attempt's outcome for a claimed delivery; return its new state (``None`` if it is not claimed
    under ``item``'s claim any more).

    The outcome is written only while the row is still ``sending`` under the token ``item`` was claimed with. If
    the claim was taken back meanwhile (this process's lease expired), nothing is written: the delivery is sent
    again by whoever claims it next (export is at least once; a duplicate C-STORE of the same SOP Instance UID is
    harmless at the PACS).

    A retryable outcome puts the delivery back to ``pending`` after the policy's backoff (scaled by ``jitter``, a
    draw in [0, 1): :meth:`RetryPolicy.next_attempt_at`) counted from ``retry_from`` (default ``now``; the
    workers pass the batch's start, so that a batch that failed together is due again together), or makes it
    ``dead`` once the policy gives up (``give_up_after_s`` since the first attempt of its round, or
    ``max_attempts``). The first attempt's time is kept in each retry's history entry (``first_attempt_at``).
    Reasons are recorded as one line.
    """
    if not isinstance(item, ClaimedItem):
        raise TypeError(f"item must be a delivery claimed by queue.claim, not {type(item).__name__}")
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        row = session.get(Delivery, item.id, with_for_update=True)
        if row is None or row.state != SENDING or row.claim != item.claim:
            if row is not None and row.state == SENDING:
                log.info("export: delivery %d was claimed again meanwhile; this attempt's outcome is dropped", item.id)
            return None
        row.attempts += 1
        start = now if retry_from is None else retry_from
        first = start if row.attempts == 1 else _first_attempt_at(row)
        state, reason = _next_state(row.attempts, outcome, policy, first, now)
        row.state = state
        row.claim = row.claim_owner = row.claim_expires_at = None
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


def release(
    store: StoreIndex, ids: Collection[int], *, at: float, claim: str | None = None, now: float | None = None
) -> int:
    """Put claimed deliveries that were not attempted back to ``pending``, due at ``at``; return how many.

    With ``claim``, only those still under that claim token (a claim taken back and claimed again meanwhile is
    another process's now).
    """
    if not ids:
        return 0
    now = time.time() if now is None else now
    mine = Delivery.claim == claim if claim is not None else true()
    with store.write_sessions.begin() as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.state == SENDING, mine)
            .values(
                state=PENDING, claim=None, claim_owner=None, claim_expires_at=None, next_attempt_at=at, updated_at=now
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def resume(store: StoreIndex, configured: Collection[str], *, owner: str, now: float | None = None) -> tuple[int, int]:
    """At start: take back the deliveries a gone process left ``sending``; those of unconfigured destinations
    are dead.

    ``owner`` is the starting process (``host/pid/token``). A ``sending`` delivery goes back to ``pending`` if its
    claim expired or has no owner (:func:`reclaim_expired_claims`), or if its owner is a process of this host that
    is not running (a pid check; this process's own earlier life included). Claims of live processes, of this
    host or another, are left alone. Jobs whose deliveries all ended before a crash move on (:func:`settle`).
    Returns (resumed, dead-lettered).
    """
    now = time.time() if now is None else now
    gone = _gone_owners(store, owner)
    resumed = _take_back(store, or_(_expired(now), Delivery.claim_owner.in_(gone)), now)
    with store.write_sessions.begin() as session:
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
    return resumed, len(orphans)


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
