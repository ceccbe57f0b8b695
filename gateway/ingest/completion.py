"""Series completion: a series revision is complete after a quiet period with no new instance for it.

Completion is a conditional update committed together with the job it creates, so it fires exactly once per
revision, across threads, processes and restarts (``last_received_at`` is durable: a gateway restarted in the
middle of the quiet period completes the revision once the period has passed since the last arrival).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from gateway.jobs.states import JobState
from gateway.store.index import Job, Series, SeriesRevision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """One completed series revision and the job it created."""

    job_id: int
    revision_id: int
    study_instance_uid: str
    series_instance_uid: str
    revision: int
    instance_count: int


def complete_quiet_series(
    write_sessions: sessionmaker[Session], quiet_period_s: float, now: float | None = None
) -> list[Completion]:
    """Complete every open revision quiet for ``quiet_period_s``; create a ``received`` job for each.

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
    """
    now = time.time() if now is None else now
    cutoff = now - quiet_period_s
    done: list[Completion] = []
    with write_sessions.begin() as session:
        candidates = session.scalars(
            select(SeriesRevision).where(SeriesRevision.state == "open", SeriesRevision.last_received_at <= cutoff)
        ).all()
        for rev in candidates:
            claimed = session.execute(
                update(SeriesRevision)
                .where(
                    SeriesRevision.id == rev.id,
                    SeriesRevision.state == "open",
                    SeriesRevision.last_received_at <= cutoff,
                )
                .values(state="complete", completed_at=now)
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                continue
            done.append(_create_job(session, rev, now))
    for c in done:
        log.info("series complete: job %d, revision %d, %d instance(s)", c.job_id, c.revision, c.instance_count)
    return done


def _create_job(session: Session, rev: SeriesRevision, now: float) -> Completion:
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
        detail={"revision": rev.revision, "instances": rev.instance_count},
    )
    session.add(job)
    session.flush()
    return Completion(job.id, rev.id, study_uid, rev.series_instance_uid, rev.revision, rev.instance_count)


class CompletionMonitor:
    """Background thread that runs :func:`complete_quiet_series` every ``poll_s`` seconds."""

    def __init__(self, sessions: sessionmaker[Session], quiet_period_s: float, poll_s: float) -> None:
        self._sessions = sessions
        self._quiet = quiet_period_s
        self._poll = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completion-monitor", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                complete_quiet_series(self._sessions, self._quiet)
            except Exception:
                log.exception("completion check failed; retrying at the next poll")
