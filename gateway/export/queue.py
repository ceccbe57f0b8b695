"""The durable export queue: one ``deliveries`` row per (output file, destination), driven to a final state.

Each destination gets only the kinds of result it takes (its ``send`` setting: :func:`enqueue` queues a file for
a destination only when the file's kind, read from its SOP class, is one of them; a file of no known kind goes
everywhere); the kinds left out are listed in the job's ``detail.export.not_sent``.

A delivery is ``pending`` until a worker claims it (``sending``, under a claim token, by a conditional update),
then each attempt's outcome is committed as soon as it is known: ``delivered``; ``pending`` again with a later
``next_attempt_at`` (exponential backoff); ``refused`` with the reason, when the destination does not take
objects of that SOP class (it rejected the presentation context as an unsupported abstract syntax, or answered
0x0122); or ``dead`` with the reason. ``delivered``, ``refused`` and ``dead`` are final. A gateway that stops or
crashes leaves ``sending`` rows behind; the next start puts them back to ``pending`` (an instance whose success
was committed is never sent again; one whose answer was lost in the crash may be, under the same SOP Instance
UID).

When every delivery of a job is delivered or refused the job is ``exported`` (``detail.export`` counts the refused
ones and lists their reasons); when none is left to send and some are dead, it is ``failed`` with ``{"stage":
"export", "reason": ...}``. :func:`retry_job` requeues the dead and the refused ones (the destination may have
been reconfigured since).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, get_args

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gateway.config import OutputKind
from gateway.errors import ExportError, LeaseLost, NotFound
from gateway.export.destinations import output_kind
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

PENDING, SENDING, DELIVERED, REFUSED, DEAD = "pending", "sending", "delivered", "refused", "dead"
NO_DESTINATION = "no destination configured"
NO_KIND_TAKEN = "no output is of a kind its destinations take (see not_sent)"
_HISTORY_MAX = 100  # attempts kept per delivery (the oldest are dropped after many manual retries)
_REASONS_LISTED = 5  # distinct reasons quoted in a job's failure or refused_reasons
_KINDS: tuple[str, ...] = get_args(OutputKind)

#: Destination name -> the kinds of result it takes; ``None``: every file, whatever its kind.
_Plan = dict[str, frozenset[str] | None]


class _Header(NamedTuple):
    path: str  # relative to the data folder when inside it
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def enqueue(
    store: StoreIndex,
    job_id: int,
    files: Sequence[Path],
    destinations: Mapping[str, Collection[str]] | Sequence[str],
    *,
    owner: str | None = None,
    now: float | None = None,
) -> int:
    """Queue each file of a job for each destination that takes its kind (one transaction); the job is ``encoded``.

    A file's kind comes from its SOP class (:func:`gateway.export.destinations.output_kind`); a file of no known
    kind goes to every destination. The kinds a destination is not sent are listed in the job's
    ``detail.export.not_sent`` (``{"pacs": ["sc"]}``). With nothing to send (no destination, no file, or no file
    of a kind any destination takes) the job goes straight to ``exported``, its detail saying why. Calling it
    again for the same job adds only the (file, destination) pairs not queued yet.

    Parameters
    ----------
    store
        The instance store (or any :class:`StoreIndex`).
    job_id
        The job whose outputs these are.
    files
        The output files, already written durably (DICOM Part 10).
    destinations
        Destination name -> the kinds of result it takes (:data:`gateway.config.OutputKind` values), as
        :func:`gateway.export.destinations.destinations_for` gives them; or just names, each taking every file.
    owner
        The lease owner of a job the runner holds (:mod:`gateway.jobs.lifecycle`): then the job must be
        ``encoding`` under that lease, or nothing is queued (:class:`~gateway.errors.LeaseLost`); the lease ends
        with the move.
    now
        The time recorded (seconds since the epoch); the wall clock when omitted.

    Returns
    -------
    int
        How many deliveries were added.

    Raises
    ------
    ValueError
        If ``destinations`` names a kind that is not an :data:`~gateway.config.OutputKind`.
    gateway.errors.NotFound
        If there is no job ``job_id``.
    gateway.errors.ExportError
        If a file is not a readable DICOM file with SOP Class and SOP Instance UIDs (nothing is queued).
    gateway.errors.LeaseLost
        If ``owner`` is given and the job is not ``encoding`` under that lease.
    """
    now = time.time() if now is None else now
    plan = _plan(destinations)
    headers = [_header(store, Path(f)) for f in files]
    pairs, not_sent = _routed(headers, plan)
    with store.write_sessions.begin() as session:
        job = _job(session, job_id)
        if owner is not None and (job.state != JobState.ENCODING or job.lease_owner != owner):
            raise LeaseLost(f"job {job_id} is no longer encoding under this worker's lease")
        rows = session.execute(select(Delivery.sop_instance_uid, Delivery.destination).where(Delivery.job_id == job_id))
        queued = {(uid, name) for uid, name in rows}
        added = 0
        for header, name in pairs:
            if (header.sop_instance_uid, name) in queued:
                continue
            queued.add((header.sop_instance_uid, name))
            session.add(_new_delivery(job_id, header, name, now))
            added += 1
        _mark_queued(job, len(queued), list(plan), _why_nothing(plan, headers), not_sent, now)
    log.info("job %d: %d deliveries queued for %d destination(s)", job_id, added, len(plan))
    if not_sent:
        log.info("job %d: kinds not sent, by destination (their send setting): %s", job_id, not_sent)
    return added


def _plan(destinations: Mapping[str, Collection[str]] | Sequence[str]) -> _Plan:
    """Destination name -> the kinds it takes (``None``: everything), checked against the known kinds."""
    if not isinstance(destinations, Mapping):
        return dict.fromkeys(destinations)
    plan: _Plan = {}
    for name, kinds in destinations.items():
        unknown = sorted(set(kinds).difference(_KINDS))
        if unknown:
            raise ValueError(f"destinations[{name!r}] names unknown kind(s) {unknown}; known: {list(_KINDS)}")
        plan[name] = frozenset(kinds)
    return plan


def _routed(headers: Iterable[_Header], plan: _Plan) -> tuple[list[tuple[_Header, str]], dict[str, list[str]]]:
    """The (file, destination) pairs to queue, and for each destination the kinds of file it does not take."""
    pairs: list[tuple[_Header, str]] = []
    skipped: dict[str, set[str]] = {}
    for header in headers:
        kind = output_kind(header.sop_class_uid)
        for name, kinds in plan.items():
            if kinds is None or kind is None or kind in kinds:
                pairs.append((header, name))
            else:
                skipped.setdefault(name, set()).add(kind)
    return pairs, {name: _in_order(kinds) for name, kinds in skipped.items()}


def _in_order(kinds: Iterable[str]) -> list[str]:
    return sorted(set(kinds), key=_KINDS.index)


def _why_nothing(plan: _Plan, headers: Sequence[_Header]) -> str:
    """What the job's detail says when no delivery is queued."""
    if not plan:
        return NO_DESTINATION
    return NO_KIND_TAKEN if headers else "no output file to send"


def _header(store: StoreIndex, path: Path) -> _Header:
    """Stored path, SOP Class UID, SOP Instance UID and transfer syntax of an output file."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        values = (str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as exc:
        raise ExportError(f"output file {path.name} cannot be queued: {type(exc).__name__}") from None
    absolute = path.resolve()
    stored = absolute.relative_to(store.data_dir) if absolute.is_relative_to(store.data_dir) else absolute
    return _Header(str(stored), *values)


def _new_delivery(job_id: int, header: _Header, destination: str, now: float) -> Delivery:
    return Delivery(
        job_id=job_id,
        path=header.path,
        sop_class_uid=header.sop_class_uid,
        sop_instance_uid=header.sop_instance_uid,
        transfer_syntax_uid=header.transfer_syntax_uid,
        destination=destination,
        state=PENDING,
        attempts=0,
        next_attempt_at=now,
        history=[],
        created_at=now,
        updated_at=now,
    )


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def _mark_queued(
    job: Job, total: int, names: list[str], nothing: str, not_sent: dict[str, list[str]], now: float
) -> None:
    detail = dict(job.detail or {})
    export: dict[str, Any] = {"deliveries": total, "destinations": names}
    merged = _merged(detail.get("export", {}).get("not_sent", {}), not_sent)
    if merged:
        export["not_sent"] = merged
    if total:
        job.state, job.finished_at = JobState.ENCODED, None
    else:
        export["reason"] = nothing
        job.state, job.finished_at = JobState.EXPORTED, now
    detail["export"] = export
    job.detail = detail
    job.updated_at = now
    job.lease_owner = job.lease_expires_at = None


def _merged(before: dict[str, list[str]], now: dict[str, list[str]]) -> dict[str, list[str]]:
    """The kinds not sent to each destination, over every :func:`enqueue` of the job."""
    return {name: _in_order([*before.get(name, []), *now.get(name, [])]) for name in {**before, **now}}


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
        row = session.get(Delivery, item.id, with_for_update=True)
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
    if outcome.kind is Kind.REFUSED:
        return REFUSED, outcome.reason
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
    """Move an ``encoded`` job on once none of its deliveries is left to send; return its new state, if any.

    ``exported`` when every delivery was delivered or refused (``detail.export.refused_reasons`` says why for
    the refused ones), ``failed`` when any is dead.
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
            detail["failure"] = {"stage": "export", "reason": _failure_reason(session, job_id, counts)}
        job.state = JobState.FAILED if counts[DEAD] else JobState.EXPORTED
        job.detail = detail
        job.updated_at = job.finished_at = now
        state = JobState(job.state)
    log.info("job %d %s", job_id, state.value)
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
        If the job has no dead or refused delivery (nothing to retry); nothing changes.
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        job = _job(session, job_id)
        ended = session.scalars(
            select(Delivery).where(Delivery.job_id == job_id, Delivery.state.in_((DEAD, REFUSED)))
        ).all()
        if not ended:
            raise ExportError(f"job {job_id} has no dead or refused delivery to retry (state {job.state})")
        if (job.detail or {}).get("retention", {}).get("outputs_purged_at"):
            raise ExportError(f"job {job_id}'s outputs were purged by retention: there is nothing left to resend")
        for row in ended:
            row.state, row.attempts, row.next_attempt_at, row.updated_at = PENDING, 0, now, now
            row.history = _appended(row.history, now, "requeued", None, "retry requested")
        detail = dict(job.detail or {})
        if detail.get("failure", {}).get("stage") == "export":
            detail["previous_failures"] = [*detail.get("previous_failures", []), detail.pop("failure")]
        job.detail = detail
        job.state, job.finished_at = JobState.ENCODED, None
        job.updated_at = now
    log.info("job %d: %d dead or refused deliveries requeued", job_id, len(ended))
    return len(ended)


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
