"""Every write of a job's state: claims under a lease, conditional moves, renewals, hand-backs and reclaims.

The transition table is :data:`gateway.jobs.states.TRANSITIONS`. Each write here is one conditional statement (or
a row read ``FOR UPDATE`` and written in the same transaction): ``UPDATE jobs ... WHERE id = :id AND state =
:from AND lease_owner = :me``. A worker whose lease was taken from it gets :class:`~gateway.errors.LeaseLost`
and drops the job, so two workers (threads, processes, or hosts on one PostgreSQL index) never both move a job,
and a detail merge never loses another's update.

A lease is (owner, expiry). The owner names the process (``host/pid/token``), so that at start a process can
take back at once the jobs of a process on its own host that is gone (kill -9) instead of waiting for their
leases to expire; jobs of other hosts are reclaimed by anyone once their lease has expired.

Every lease is recorded in ``job_claims`` (:class:`~gateway.store.index.JobClaim`) in the transaction that takes
or ends it: a claim opens a row; a move to a state no worker holds, a hand-back, a failure or a take-back closes
it, with when and how. :func:`overlapping_claims` checks that record: no two leases of a job may overlap. A
writer outside this module that ends a lease (the export queue's enqueue, an operator's cancel) closes the claim
with :func:`end_claim` in its own transaction.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from gateway.errors import LeaseLost, one_line
from gateway.jobs.states import FINISHED, LEASED, JobState, allowed
from gateway.store.files import host_name, pid_running
from gateway.store.index import Job, JobClaim
from gateway.store.store import StoreIndex

__all__ = [
    "Claim",
    "Lease",
    "claim",
    "claim_many",
    "claimable_ids",
    "claims_of",
    "end_claim",
    "fail",
    "hand_back",
    "move",
    "next_claimable",
    "note",
    "overlapping_claims",
    "owner_identity",
    "process_running",
    "reclaim_expired",
    "reclaim_orphans",
    "renew",
]

log = logging.getLogger(__name__)


def owner_identity() -> str:
    """A lease owner name for this process: ``host/pid/token`` (the token tells a reused pid apart)."""
    return f"{host_name()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Lease:
    """A job held by a worker: its id and the owner its lease names."""

    job_id: int
    owner: str


def claim(
    store: StoreIndex,
    owner: str,
    lease_s: float,
    *,
    max_attempts: int,
    job_id: int | None = None,
    now: float | None = None,
) -> Lease | None:
    """Take the oldest claimable ``received`` job (or ``job_id``) to ``assembling`` under a lease; ``None`` if none.

    A job is claimable when it is ``received`` and not held back (its ``lease_expires_at``, on a job handed back
    for want of space, is a not-before time). Each claim counts an attempt; a job claimed ``max_attempts`` times
    without finishing (each time its worker died with it) fails with that reason instead of being claimed again.
    The claim records ``detail.claimed_at`` and the wait in the queue, ``detail.timings.queue_s``: from when the job
    last became ``received`` (``detail.queued_at`` after a hand-back or a re-run, else its creation), and opens
    the lease's row in ``job_claims``.
    """
    while True:
        with store.write_sessions.begin() as session:
            job = _next_claimable(session, time.time() if now is None else now, job_id)
            if job is None:
                return None
            # Read the clock once the row is locked: after the commit that ended the job's previous lease, so
            # that the record of this one starts after that one's end.
            at = time.time() if now is None else now
            if job.attempts >= max_attempts:
                _exhausted(job, max_attempts, at)
                if job_id is not None:
                    return None
                continue
            return _take(session, job, owner, lease_s, at)


def claim_many(
    store: StoreIndex,
    owner: str,
    lease_s: float,
    job_ids: Collection[int],
    *,
    max_attempts: int,
    now: float | None = None,
) -> list[Lease]:
    """Claim, in one transaction, those of ``job_ids`` that are still claimable, as :func:`claim` claims one.

    A job another worker holds or has just claimed is skipped (``FOR UPDATE SKIP LOCKED``), one out of attempts
    fails as in :func:`claim`. A worker takes a model's batch worth of jobs at once this way
    (:class:`gateway.jobs.runner.JobRunner`), so that their patches share forward passes.
    """
    if not job_ids:
        return []
    leases: list[Lease] = []
    with store.write_sessions.begin() as session:
        at = time.time() if now is None else now
        query = select(Job).where(_claimable(at), Job.id.in_(list(job_ids))).order_by(Job.id)
        for job in session.scalars(query.with_for_update(skip_locked=True)).all():
            if job.attempts >= max_attempts:
                _exhausted(job, max_attempts, at)
                continue
            leases.append(_take(session, job, owner, lease_s, at))
    return leases


def _take(session: Session, job: Job, owner: str, lease_s: float, at: float) -> Lease:
    """Move a locked claimable job to ``assembling`` under ``owner``'s lease and open the lease's record."""
    job.state = JobState.ASSEMBLING
    job.lease_owner, job.lease_expires_at = owner, at + lease_s
    job.attempts += 1
    job.updated_at = at
    job.detail = _claimed(job, at)
    session.add(JobClaim(job_id=job.id, owner=owner, claimed_at=at))
    return Lease(int(job.id), owner)


def _claimed(job: Job, now: float) -> dict[str, Any]:
    """The detail of a job claimed at ``now``: when, and how long it waited since it last became ``received``."""
    detail = dict(job.detail or {})
    since = detail.get("queued_at")
    waited = now - (since if isinstance(since, int | float) else job.created_at)
    detail["claimed_at"] = round(now, 3)
    detail["timings"] = {**detail.get("timings", {}), "queue_s": round(max(0.0, waited), 3)}
    return detail


def _claimable(now: float) -> Any:
    """``received`` and not held back: the condition every claim and every peek at the next job shares."""
    return and_(Job.state == JobState.RECEIVED, or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= now))


def next_claimable(store: StoreIndex, *, now: float | None = None, skip: Collection[int] = ()) -> int | None:
    """The id of the job :func:`claim` would take next, without taking it (a worker sizes it up first); jobs in
    ``skip`` (those a worker leaves to others: :class:`gateway.jobs.placement.Placement`) are passed over."""
    found = claimable_ids(store, now=now, skip=skip, limit=1)
    return found[0] if found else None


def claimable_ids(
    store: StoreIndex, *, now: float | None = None, skip: Collection[int] = (), limit: int = 1
) -> list[int]:
    """The ids of up to ``limit`` claimable jobs, oldest first, without taking them; ``skip`` as in
    :func:`next_claimable`."""
    now = time.time() if now is None else now
    query = select(Job.id).where(_claimable(now))
    if skip:
        query = query.where(Job.id.not_in(list(skip)))
    with store.sessions() as session:
        return [int(i) for i in session.scalars(query.order_by(Job.id).limit(limit))]


def _next_claimable(session: Session, now: float, job_id: int | None) -> Job | None:
    query = select(Job).where(_claimable(now))
    query = query.where(Job.id == job_id) if job_id is not None else query.order_by(Job.id)
    return session.scalars(query.limit(1).with_for_update(skip_locked=True)).first()


def _exhausted(job: Job, max_attempts: int, now: float) -> None:
    reason = (
        f"interrupted {job.attempts} times while being processed (each time the gateway process ended with it); "
        f"not tried again after jobs.max_attempts={max_attempts}"
    )
    job.detail = {**(job.detail or {}), "failure": {"stage": "run", "reason": reason}}
    job.state, job.finished_at, job.updated_at = JobState.FAILED, now, now
    job.lease_owner = job.lease_expires_at = None
    log.warning("job %d failed: %s", job.id, reason)


@contextmanager
def _held(store: StoreIndex, lease: Lease, current: JobState) -> Iterator[tuple[Session, Job]]:
    """The job's row, locked, if it is in ``current`` under ``lease``; else :class:`LeaseLost`."""
    with store.write_sessions.begin() as session:
        job = session.scalars(
            select(Job)
            .where(Job.id == lease.job_id, Job.state == current, Job.lease_owner == lease.owner)
            .with_for_update()
        ).first()
        if job is None:
            raise LeaseLost(f"job {lease.job_id} is no longer {current.value} under this worker's lease")
        yield session, job


def move(
    store: StoreIndex,
    lease: Lease,
    current: JobState,
    to: JobState,
    *,
    lease_s: float = 0.0,
    timing: tuple[str, float] | None = None,
    now: float | None = None,
    **entries: Any,
) -> None:
    """Move a leased job from ``current`` to ``to``, merging ``entries`` (and a stage ``timing``) into its detail.

    The lease is renewed by ``lease_s`` while the job stays in a leased state, and released when it reaches a
    durable or final one. An entry whose value is ``None`` is left out.

    Raises
    ------
    ValueError
        If the transition table does not allow the move.
    gateway.errors.LeaseLost
        If the job is not in ``current`` under ``lease`` any more (nothing is written).
    """
    if not allowed(current, to):
        raise ValueError(f"job transition {current.value} -> {to.value} is not in the table")
    now = time.time() if now is None else now
    failure = entries.get("failure")
    if isinstance(failure, dict) and isinstance(failure.get("reason"), str):
        entries["failure"] = {**failure, "reason": one_line(failure["reason"])}  # the traceback is in the log
    with _held(store, lease, current) as (session, job):
        job.detail = merged_detail(job.detail, entries, timing)
        job.state, job.updated_at = to, now
        if to in LEASED:
            job.lease_expires_at = now + lease_s
        else:
            job.lease_owner = job.lease_expires_at = None
            end_claim(session, lease.job_id, lease.owner, to.value, now)
        if to in FINISHED:
            job.finished_at = now


def note(
    store: StoreIndex,
    lease: Lease,
    current: JobState,
    *,
    timing: tuple[str, float] | None = None,
    now: float | None = None,
    **entries: Any,
) -> None:
    """Merge ``entries`` into a leased job's detail without moving it (raises :class:`LeaseLost` like :func:`move`)."""
    now = time.time() if now is None else now
    with _held(store, lease, current) as (_session, job):
        job.detail = merged_detail(job.detail, entries, timing)
        job.updated_at = now


def merged_detail(
    detail: dict[str, Any] | None, entries: dict[str, Any], timing: tuple[str, float] | None
) -> dict[str, Any]:
    """``detail`` with ``entries`` (those not ``None``) merged in and a stage ``timing`` (name, seconds) added."""
    merged: dict[str, Any] = dict(detail or {})
    merged.update({key: value for key, value in entries.items() if value is not None})
    if timing is not None:
        merged["timings"] = {**merged.get("timings", {}), timing[0]: round(timing[1], 3)}
    return merged


def renew(store: StoreIndex, owner: str, lease_s: float, *, now: float | None = None) -> int:
    """Extend every lease ``owner`` holds by ``lease_s`` from now; return how many (the worker's heartbeat)."""
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(Job.lease_owner == owner, Job.state.in_(LEASED))
            .values(lease_expires_at=now + lease_s)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def hand_back(
    store: StoreIndex,
    owner: str,
    *,
    job_ids: Collection[int] | None = None,
    not_before: float | None = None,
    refund: bool = True,
    reason: str,
    now: float | None = None,
) -> list[int]:
    """Put jobs ``owner`` holds (all, or ``job_ids``) back to ``received``: their work so far was in memory.

    ``refund`` gives back the attempt their claim counted (a stop or a wait for space is not the job's fault);
    ``not_before`` keeps them from being claimed again before that time. Returns the ids handed back.
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        query = select(Job).where(Job.lease_owner == owner, Job.state.in_(LEASED)).with_for_update()
        if job_ids is not None:
            query = query.where(Job.id.in_(job_ids))
        jobs = session.scalars(query).all()
        for job in jobs:
            end_claim(session, int(job.id), owner, HANDED_BACK, now)
            _to_received(job, now, not_before, reason)
            if refund:
                job.attempts = max(0, job.attempts - 1)
        ids = [int(job.id) for job in jobs]
    if ids:
        log.info("jobs %s handed back to received: %s", ids, reason)
    return ids


def _to_received(job: Job, now: float, not_before: float | None, reason: str) -> None:
    returns = [*(job.detail or {}).get("handed_back", []), {"at": round(now, 3), "from": job.state, "why": reason}]
    job.detail = {**(job.detail or {}), "handed_back": returns[-10:], "queued_at": round(now, 3)}
    job.state, job.updated_at = JobState.RECEIVED, now
    job.lease_owner, job.lease_expires_at = None, not_before


def reclaim_expired(store: StoreIndex, *, now: float | None = None) -> list[int]:
    """Send jobs whose lease expired (their worker or process is gone) back to ``received``; return their ids.

    Jobs left in a leased state with no lease at all (by a gateway older than leases) are taken back too.
    """
    now = time.time() if now is None else now
    expired = or_(Job.lease_owner.is_(None), Job.lease_expires_at.is_(None), Job.lease_expires_at < now)
    return _reclaim(store, and_(Job.state.in_(LEASED), expired), now, "its lease expired")


def reclaim_orphans(store: StoreIndex, owner: str, *, now: float | None = None) -> list[int]:
    """At start: take back at once the jobs leased by processes of this host that are no longer running."""
    now = time.time() if now is None else now
    host = owner.split("/", 1)[0]
    with store.sessions() as session:
        owners = session.scalars(
            select(Job.lease_owner).where(Job.state.in_(LEASED), Job.lease_owner.like(f"{host}/%")).distinct()
        ).all()
    gone = [o for o in owners if o is not None and o != owner and not process_running(o)]
    ids = _reclaim(store, and_(Job.state.in_(LEASED), Job.lease_owner.in_(gone)), now, "its process is gone")
    return ids + reclaim_expired(store, now=now)


def process_running(owner: str) -> bool:
    """Whether the process an owner name of this host names is alive (a pid reused by another process counts)."""
    try:
        pid = int(owner.split("/")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # this process's earlier life: its token differs, so the lease is from before a restart
    return pid_running(pid)


def _reclaim(store: StoreIndex, where: Any, now: float, reason: str) -> list[int]:
    with store.write_sessions.begin() as session:
        jobs = session.scalars(select(Job).where(where).with_for_update(skip_locked=True)).all()
        for job in jobs:
            if job.lease_owner is not None:  # a job of a gateway older than leases has no claim to close
                ended = now if job.lease_expires_at is None else min(now, job.lease_expires_at)
                end_claim(session, int(job.id), job.lease_owner, TAKEN_BACK, ended)
            _to_received(job, now, None, reason)
        ids = [int(job.id) for job in jobs]
    if ids:
        log.warning("jobs %s taken back to received: %s", ids, reason)
    return ids


def fail(store: StoreIndex, lease: Lease, stage: str, reason: str, *, now: float | None = None) -> bool:
    """The supervisor's last word: fail a leased job in whatever leased state it is, with a one-line reason.

    Returns whether it was failed (``False`` if the lease was lost meanwhile: someone else holds the job).
    """
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        job = session.scalars(
            select(Job)
            .where(Job.id == lease.job_id, Job.lease_owner == lease.owner, Job.state.in_(LEASED))
            .with_for_update()
        ).first()
        if job is None:
            return False
        job.detail = {**(job.detail or {}), "failure": {"stage": stage, "reason": one_line(reason)}}
        job.state, job.finished_at, job.updated_at = JobState.FAILED, now, now
        job.lease_owner = job.lease_expires_at = None
        end_claim(session, lease.job_id, lease.owner, JobState.FAILED.value, now)
    return True


# -- the record of leases ------------------------------------------------------------------------------------------

#: How a lease ended besides the state its job reached (``job_claims.outcome``).
HANDED_BACK, TAKEN_BACK = "handed back", "taken back"


@dataclass(frozen=True)
class Claim:
    """One lease of a job, from its claim to its end (``ended_at`` and ``outcome`` are ``None`` while it runs)."""

    id: int
    job_id: int
    owner: str
    claimed_at: float
    ended_at: float | None
    outcome: str | None


def end_claim(session: Session, job_id: int, owner: str, outcome: str, ended_at: float) -> int:
    """Close the open claims ``owner`` holds on ``job_id``, in the caller's transaction; return how many (0 or 1).

    Call it in the transaction that ends the lease: the job's move to a state no worker holds, its hand-back,
    failure or take-back. ``outcome`` is the state reached, :data:`HANDED_BACK` or :data:`TAKEN_BACK`.
    """
    result = session.execute(
        update(JobClaim)
        .where(JobClaim.job_id == job_id, JobClaim.owner == owner, JobClaim.ended_at.is_(None))
        .values(ended_at=ended_at, outcome=outcome[:64])
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def claims_of(store: StoreIndex, job_id: int) -> list[Claim]:
    """Every lease ``job_id`` was held under, oldest first."""
    with store.sessions() as session:
        rows = session.scalars(select(JobClaim).where(JobClaim.job_id == job_id).order_by(JobClaim.id)).all()
        return [_claim(row) for row in rows]


def _claim(row: JobClaim) -> Claim:
    return Claim(int(row.id), int(row.job_id), row.owner, row.claimed_at, row.ended_at, row.outcome)


def overlapping_claims(store: StoreIndex) -> list[tuple[int, int, int]]:
    """Every pair of leases of one job whose times overlap: ``(job_id, claim id, claim id)``; empty when none did.

    A lease lasts ``[claimed_at, ended_at)``; an open one lasts until now and on. Leases that only touch (one ends
    when the next begins) do not overlap. The times are each process's clock: hosts whose clocks disagree by more
    than the gap between one lease's end and the next claim show as an overlap. This reads the whole
    ``job_claims`` table: for tests and audits.
    """
    with store.sessions() as session:
        rows = session.scalars(select(JobClaim).order_by(JobClaim.job_id, JobClaim.claimed_at, JobClaim.id)).all()
        claims = [_claim(row) for row in rows]
    found: list[tuple[int, int, int]] = []
    for k, first in enumerate(claims):
        end = math.inf if first.ended_at is None else first.ended_at
        for later in claims[k + 1 :]:
            if later.job_id != first.job_id or later.claimed_at >= end:
                break
            found.append((first.job_id, first.id, later.id))
    return found
