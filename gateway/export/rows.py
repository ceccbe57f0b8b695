"""What the export queue's modules share about a ``deliveries`` row and its job: the delivery states, the attempt
history, and putting a delivery (and its job) back in the queue.

:mod:`gateway.export.queue` drives deliveries to a final state; :mod:`gateway.export.requeue` puts final ones back
(an operator's retry or re-run, a destination that answers again). Both write through these helpers, each inside
the caller's transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from gateway.errors import NotFound
from gateway.jobs.states import JobState
from gateway.store.index import Delivery, Job

PENDING, SENDING, DELIVERED, REFUSED, DEAD = "pending", "sending", "delivered", "refused", "dead"
#: The states a delivery ends in (nothing sends it again unless it is requeued).
FINAL = (DELIVERED, REFUSED, DEAD)
#: The history outcome of a delivery put back in the queue (its ``reason`` says by what).
REQUEUED = "requeued"
HISTORY_MAX = 100  # history entries kept per delivery (the oldest are dropped after very many attempts)


def appended(
    history: list[dict[str, Any]] | None,
    now: float,
    outcome: str,
    status: int | None,
    reason: str,
    **extra: Any,
) -> list[dict[str, Any]]:
    """``history`` with one more entry (``at``, ``outcome``, ``status``, ``reason`` and ``extra``), bounded."""
    entry = {"at": round(now, 3), "outcome": outcome, "status": status, "reason": reason, **extra}
    return [*(history or []), entry][-HISTORY_MAX:]


def locked_job(session: Session, job_id: int) -> Job:
    """The job row, locked for this transaction.

    Raises
    ------
    gateway.errors.NotFound
        If there is no job ``job_id``.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def requeue_row(row: Delivery, now: float, reason: str) -> None:
    """Put a delivery back to ``pending``, due now, with a fresh count of attempts (its history says why)."""
    row.state, row.claim, row.attempts = PENDING, None, 0
    row.claim_owner = row.claim_expires_at = None
    row.next_attempt_at = row.updated_at = now
    row.history = appended(row.history, now, REQUEUED, None, reason)


def reopen_job(job: Job, now: float) -> None:
    """Move a finished job back to ``encoded`` (the export queue owns it again); an export failure it had is
    kept under ``previous_failures``."""
    detail = dict(job.detail or {})
    if detail.get("failure", {}).get("stage") == "export":
        detail["previous_failures"] = [*detail.get("previous_failures", []), detail.pop("failure")]
    job.detail = detail
    job.state, job.finished_at, job.updated_at = JobState.ENCODED, None, now


def outputs_purged(job: Job) -> bool:
    """Whether retention removed the job's output files (nothing is left to send)."""
    return bool((job.detail or {}).get("retention", {}).get("outputs_purged_at"))
