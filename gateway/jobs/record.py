"""What every stage does to its job row: claim it by moving it from one state to the next, and record its outcome."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import update

from gateway.jobs.states import JobState
from gateway.store.index import Job
from gateway.store.store import InstanceStore

__all__ = ["advance", "record"]


def advance(store: InstanceStore, job_id: int, current: JobState, to: JobState) -> bool:
    """Move the job from ``current`` to ``to`` if it is in ``current`` (one conditional update); whether it moved.

    Two workers claiming the same job: one wins, the other gets ``False``.
    """
    with store.write_sessions.begin() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.state == current).values(state=to, updated_at=time.time())
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def record(
    store: InstanceStore,
    job_id: int,
    *,
    timing: tuple[str, float] | None = None,
    state: JobState | None = None,
    **entries: Any,
) -> None:
    """Merge ``entries`` into the job's detail, add a stage ``timing`` (name, seconds), optionally set ``state``.

    An entry whose value is ``None`` is left out (the detail keeps what it had under that key).
    """
    with store.write_sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None, f"job {job_id} exists"
        detail: dict[str, Any] = dict(job.detail or {})
        detail.update({key: value for key, value in entries.items() if value is not None})
        if timing is not None:
            detail["timings"] = {**detail.get("timings", {}), timing[0]: round(timing[1], 3)}
        job.detail = detail
        if state is not None:
            job.state = state
        job.updated_at = time.time()
