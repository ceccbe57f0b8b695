"""Series completion: a series revision is complete after a quiet period with no new instance for it.

Completion is a conditional update committed together with the job it creates, so it fires exactly once per
revision, across threads, processes (several ``ingest`` processes on one PostgreSQL index) and restarts
(``last_received_at`` is durable: a gateway restarted in the middle of the quiet period completes the revision once
the period has passed since the last arrival).

A series some of whose instances were refused for want of resources (0xA700, recorded by
:meth:`gateway.store.store.InstanceStore.record_refusal`) is not run on what was stored of it: its quiet revision
is ``held`` instead, and makes no job. A sender retries a 0xA700: the instances sent again reopen the held revision
(:mod:`gateway.store.writer`), and once every refused instance has arrived the revision completes as any other. An
operator may instead release the series (:func:`release_series`, ``gateway series release``): the refusals are
given up and the held revision completes at once::

    open --quiet, no refusal outstanding--> complete (job)
    open --quiet, refusals outstanding----> held --an arrival--> open
                                            held --release-----> complete (job)

An operator's reprocessing of a series (:func:`gateway.jobs.operations.reprocess_series`) adds a revision that is
complete at once, with no new instance, and its job (:func:`create_job`).

Against the index writer (:mod:`gateway.store.writer`) of this process or another, the revision's row decides: an
arrival's update and the completion's conditional update wait for each other's commit (PostgreSQL re-reads the row
then; SQLite lets one writer in at a time). An arrival committed first makes the revision not quiet, and it is not
completed; one committed after the completion opens revision n+1. Both take the revisions' row locks in the order of
their Series Instance UIDs, so they do not deadlock; a transaction that loses a race all the same (PostgreSQL's
deadlock or serialization failure) is run again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from gateway.errors import NotFound
from gateway.jobs.states import JobState
from gateway.store.index import Instance, Job, RefusedInstance, Series, SeriesRevision
from gateway.store.writer import is_conflict

log = logging.getLogger(__name__)

_DUE_MARGIN_S = 0.005  # wake this long after a revision falls quiet (timers fire a little early or late)
_MIN_WAIT_S = 0.01  # never spin: a revision due but still open (another process about to claim it) waits this
_ATTEMPTS = 5  # runs of one completion check that lost a race to another transaction (deadlock, serialization)


@dataclass(frozen=True)
class Completion:
    """One completed series revision and the job it created."""

    job_id: int
    revision_id: int
    study_instance_uid: str
    series_instance_uid: str
    revision: int
    instance_count: int


@dataclass(frozen=True)
class Release:
    """What :func:`release_series` did: refusals given up, and the job of the held revision it completed."""

    refusals_dropped: int
    completion: Completion | None


def complete_quiet_series(
    write_sessions: sessionmaker[Session],
    quiet_period_s: float,
    now: float | None = None,
    *,
    not_last_before: float | None = None,
) -> list[Completion]:
    """Complete every open revision quiet for ``quiet_period_s``; create a ``received`` job for each.

    A revision whose series has instances refused for want of resources, not received since, is ``held`` instead
    (no job; logged with its counts).

    Parameters
    ----------
    write_sessions
        :attr:`InstanceStore.write_sessions`: on SQLite their transactions take the write lock at once, which is
        what lets several callers (threads, processes) race here safely; read sessions would fail with
        "database is locked" instead of waiting.
    quiet_period_s
        Seconds without a new instance after which a revision is complete.
    now
        The current time (seconds since the epoch); the wall clock when omitted.
    not_last_before
        Leave open the revisions whose last instance came before this time (after a restart: their sender was cut
        off and has not re-sent yet).
    """
    now = time.time() if now is None else now
    for attempt in range(_ATTEMPTS):
        try:
            done, held = _complete_quiet(write_sessions, now - quiet_period_s, now, not_last_before or 0.0)
            break
        except DBAPIError as exc:  # nothing was committed: the transaction is run again
            if attempt + 1 == _ATTEMPTS or not is_conflict(exc):
                raise
            log.debug("completion check lost a race (%s); running it again", type(exc).__name__)
    for rev, outstanding in held:
        log.info(
            "series revision %d held: %d instance(s) refused for want of resources not received since (%d refused "
            "while open); it completes when they arrive, or when an operator releases it",
            rev.id,
            outstanding,
            max(rev.refused_count, outstanding),
        )
    for c in done:
        log.info("series complete: job %d, revision %d, %d instance(s)", c.job_id, c.revision, c.instance_count)
    return done


def _complete_quiet(
    write_sessions: sessionmaker[Session], cutoff: float, now: float, not_last_before: float
) -> tuple[list[Completion], list[tuple[SeriesRevision, int]]]:
    """One transaction of :func:`complete_quiet_series`: the completions made, and the revisions held."""
    done: list[Completion] = []
    held: list[tuple[SeriesRevision, int]] = []
    with write_sessions.begin() as session:
        candidates = session.scalars(
            select(SeriesRevision).where(
                SeriesRevision.state == "open",
                SeriesRevision.last_received_at <= cutoff,
                SeriesRevision.last_received_at >= not_last_before,
            )
        ).all()
        missing = _outstanding(session, {rev.series_instance_uid for rev in candidates})
        for rev in sorted(candidates, key=lambda rev: rev.series_instance_uid):  # the index writer's lock order
            outstanding = missing.get(rev.series_instance_uid, 0)
            if not _claim(session, rev, cutoff, now, outstanding):
                continue
            if outstanding:
                held.append((rev, outstanding))
            else:
                done.append(create_job(session, rev, now))
    return done, held


def _outstanding(session: Session, series_uids: set[str]) -> dict[str, int]:
    """Per series: its instances refused for resources and not received since."""
    if not series_uids:
        return {}
    arrived = select(Instance.sop_instance_uid).where(Instance.sop_instance_uid == RefusedInstance.sop_instance_uid)
    rows = session.execute(
        select(RefusedInstance.series_instance_uid, func.count())
        .where(RefusedInstance.series_instance_uid.in_(series_uids), ~arrived.exists())  # a refusal racing its arrival
        .group_by(RefusedInstance.series_instance_uid)
    )
    return {str(uid): int(count) for uid, count in rows}


def _claim(session: Session, rev: SeriesRevision, cutoff: float, now: float, outstanding: int) -> bool:
    """Move a quiet open revision to ``complete``, or to ``held`` while refusals are outstanding; ``False`` if
    another caller got there first (or an arrival came meanwhile)."""
    values: dict[str, object] = {"state": "complete", "completed_at": now}
    if outstanding:
        refused = SeriesRevision.refused_count
        values = {"state": "held", "refused_count": case((refused < outstanding, outstanding), else_=refused)}
    claimed = session.execute(
        update(SeriesRevision)
        .where(SeriesRevision.id == rev.id, SeriesRevision.state == "open", SeriesRevision.last_received_at <= cutoff)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(claimed.rowcount == 1)  # type: ignore[attr-defined]


def release_series(
    write_sessions: sessionmaker[Session], series_instance_uid: str, now: float | None = None
) -> Release:
    """An operator's release of a series held for instances refused for want of resources.

    The series' outstanding refusals are given up, and its held revision, if there is one, completes at once with a
    ``received`` job (on the instances stored, whatever is missing). An open revision then completes after its
    quiet period as any other.

    Parameters
    ----------
    write_sessions
        :attr:`InstanceStore.write_sessions` (or any index's).
    series_instance_uid
        The series to release.
    now
        The current time (seconds since the epoch); the wall clock when omitted.

    Raises
    ------
    NotFound
        The index holds neither the series nor a refusal of one of its instances.
    """
    now = time.time() if now is None else now
    with write_sessions.begin() as session:
        dropped = session.execute(
            delete(RefusedInstance).where(RefusedInstance.series_instance_uid == series_instance_uid)
        ).rowcount  # type: ignore[attr-defined]
        if not dropped and session.get(Series, series_instance_uid) is None:
            raise NotFound("no such series")
        rev = session.scalars(
            select(SeriesRevision)
            .where(SeriesRevision.series_instance_uid == series_instance_uid)
            .order_by(SeriesRevision.revision.desc())
            .limit(1)
        ).first()
        completion = None
        if rev is not None and rev.state == "held":
            released = session.execute(
                update(SeriesRevision)
                .where(SeriesRevision.id == rev.id, SeriesRevision.state == "held")
                .values(state="complete", completed_at=now)
                .execution_options(synchronize_session=False)
            )
            if released.rowcount == 1:  # type: ignore[attr-defined]
                completion = create_job(session, rev, now, released_with_refused=int(dropped))
    if completion is not None:
        log.info(
            "series revision %d released by an operator: job %d on %d instance(s), %d refused instance(s) given up",
            completion.revision_id,
            completion.job_id,
            completion.instance_count,
            dropped,
        )
    elif dropped:
        log.info("an operator gave up %d refused instance(s) of a series not held yet", dropped)
    return Release(int(dropped), completion)


def create_job(session: Session, rev: SeriesRevision, now: float, **detail: object) -> Completion:
    """Add the ``received`` job of a complete revision in ``session``'s transaction; what was made.

    Its detail holds the revision number and the revision's instance count, then ``detail`` (which may replace
    them: an operator's reprocessing counts the whole series, :func:`gateway.jobs.operations.reprocess_series`).
    """
    series = session.get(Series, rev.series_instance_uid)
    assert series is not None, "a revision always belongs to an indexed series"
    study_uid = series.study_instance_uid
    job = Job(
        revision_id=rev.id,
        study_instance_uid=study_uid,
        series_instance_uid=rev.series_instance_uid,
        state=JobState.RECEIVED,
        created_at=now,
        updated_at=now,
        detail={"revision": rev.revision, "instances": rev.instance_count, **detail},
    )
    session.add(job)
    session.flush()
    return Completion(job.id, rev.id, study_uid, rev.series_instance_uid, rev.revision, rev.instance_count)


class CompletionMonitor:
    """Background thread that runs :func:`complete_quiet_series` when the first open revision falls quiet (and at
    least every ``poll_s`` seconds); ``on_complete`` is called when it made jobs (the job runner's wake-up, so a new
    job does not wait for the workers' next poll).

    A series is complete within a few milliseconds of its quiet period, not up to a poll interval later: after each
    check the monitor sleeps until :func:`next_quiet_at`, capped at ``poll_s`` and at one quiet period (a series
    that starts arriving meanwhile falls quiet no sooner than that).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        quiet_period_s: float,
        poll_s: float,
        on_complete: Callable[[], None] | None = None,
        *,
        resend_wait_s: float = 0.0,
    ) -> None:
        self._sessions = sessions
        self._quiet = quiet_period_s
        self._poll = poll_s
        self._on_complete = on_complete
        self._resend_wait = resend_wait_s
        self._started = time.monotonic()
        self._started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completion-monitor", daemon=True)

    def start(self) -> None:
        """Start polling; a revision left open by the previous run waits ``resend_wait_s`` (at least a quiet period)
        from this start.

        A series that was arriving when the gateway stopped (or was killed) has had no instance for a while, but its
        sender was cut off, not done: it re-sends what was not acknowledged once the gateway is back, after its own
        retry delay. Completing the revision at once would run the models on a partial series, and again on the
        whole one in a second revision.
        """
        self._started, self._started_at = time.monotonic(), time.time()
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        wait = self._first_wait()
        while not self._stop.wait(wait):
            waiting = time.monotonic() - self._started < max(self._quiet, self._resend_wait)
            try:
                made = complete_quiet_series(
                    self._sessions, self._quiet, not_last_before=self._started_at if waiting else None
                )
                if made and self._on_complete is not None:
                    self._on_complete()
                wait = self._next_wait(waiting)
            except Exception:
                log.exception("completion check failed; retrying at the next poll")
                wait = self._poll

    def _first_wait(self) -> float:
        return min(self._poll, self._quiet) if self._quiet > 0 else self._poll

    def _next_wait(self, waiting: bool) -> float:
        """Seconds to the next check: when the first open revision falls quiet, at most ``poll_s`` (and at most a
        quiet period, so that a series that starts arriving now is seen before it is due)."""
        due = next_quiet_at(self._sessions, self._quiet, self._started_at if waiting else None)
        longest = self._first_wait()
        if waiting:  # the revisions left open by the previous run are due when the wait after a restart ends
            longest = min(longest, max(self._quiet, self._resend_wait) - (time.monotonic() - self._started))
        if due is not None:
            longest = min(longest, due - time.time() + _DUE_MARGIN_S)
        return max(longest, _MIN_WAIT_S)


def next_quiet_at(
    sessions: sessionmaker[Session], quiet_period_s: float, not_last_before: float | None = None
) -> float | None:
    """When the first open revision falls quiet (seconds since the epoch), or ``None`` when none is open.

    ``not_last_before`` leaves out the revisions :func:`complete_quiet_series` leaves open after a restart.
    """
    with sessions() as session:
        last = session.scalar(
            select(func.min(SeriesRevision.last_received_at)).where(
                SeriesRevision.state == "open", SeriesRevision.last_received_at >= (not_last_before or 0.0)
            )
        )
    return None if last is None else float(last) + quiet_period_s
