"""One job, ``GET /ui/jobs/{id}``, and what an operator can do with it.

The page answers "what happened, and why": the routing decision of every model with each rule's check and the
reason ("why didn't my model run"), the assembly's QC flags, the outputs, every delivery with its attempts, and the
failure reason. Its buttons (``write`` scope) retry the dead deliveries
(:func:`gateway.export.queue.retry_job`), re-run the job from a chosen stage (:func:`gateway.jobs.operations.rerun`)
or cancel it (:func:`gateway.jobs.operations.cancel`); each answers with the page again and a notice, and wakes the
job workers. The radiologist's view of the results is ``/ui/jobs/{id}/results`` (:mod:`gateway.ui.results`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from gateway.errors import ExportError, JobConflict
from gateway.export.queue import deliveries_of, retry_job
from gateway.jobs import operations
from gateway.jobs.states import FINISHED, JobState
from gateway.jobs.views import STAGES, JobSummary, job_summary
from gateway.runtime import Gateway
from gateway.store.index import Job
from gateway.store.store import StoreIndex
from gateway.ui.errors import UI_PREFIX
from gateway.ui.jobs import Segment, time_bar
from gateway.ui.session import Reader, Writer
from gateway.ui.templating import render

log = logging.getLogger(__name__)

router = APIRouter(prefix=f"{UI_PREFIX}/jobs", include_in_schema=False)

#: Delivery states the "retry" button puts back in the queue.
RETRYABLE = frozenset({"dead", "refused"})
_RESENDABLE = frozenset({JobState.ENCODED, JobState.EXPORTED, JobState.FAILED})
_STAGE_LABELS = {"assemble": "assembly (runs the models registered now)", "export": "export (sends every output again)"}


@dataclass(frozen=True)
class JobView:
    """What the job page shows (no patient data: UIDs, the series' description, the gateway's own records)."""

    summary: JobSummary
    bar: list[Segment]
    detail: dict[str, Any]
    routing: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    refused: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    deliveries: list[dict[str, Any]]
    failure: dict[str, Any] | None
    export: dict[str, Any]
    can_retry: bool
    can_cancel: bool
    rerun_from: list[tuple[str, str]]


def job_view(store: StoreIndex, job_id: int) -> JobView:
    """Gather the job page's data.

    Raises
    ------
    gateway.errors.NotFound
        If there is no job ``job_id``.
    """
    summary = job_summary(store, job_id)
    with store.sessions() as session:
        detail: dict[str, Any] = dict(session.scalar(select(Job.detail).where(Job.id == job_id)) or {})
    deliveries = deliveries_of(store, job_id)
    outputs = list(detail.get("outputs") or [])
    assembly = detail.get("assembly") or {}
    state = JobState(summary.state) if summary.state in {s.value for s in JobState} else None
    return JobView(
        summary=summary,
        bar=time_bar(summary),
        detail=detail,
        routing=list((detail.get("inference") or {}).get("routing") or []),
        volumes=list(assembly.get("volumes") or []),
        refused=list(assembly.get("refused") or []),
        outputs=outputs,
        deliveries=deliveries,
        failure=detail.get("failure"),
        export=dict(detail.get("export") or {}),
        can_retry=any(d["state"] in RETRYABLE for d in deliveries),
        can_cancel=state is not None and state not in FINISHED,
        rerun_from=_rerun_choices(state, bool(outputs)),
    )


def _rerun_choices(state: JobState | None, has_outputs: bool) -> list[tuple[str, str]]:
    choices = []
    for stage in operations.RERUN_FROM:
        if (stage == "assemble" and state in FINISHED) or (stage == "export" and state in _RESENDABLE and has_outputs):
            choices.append((stage, _STAGE_LABELS.get(stage, stage)))
    return choices


def _page(request: Request, job_id: int, notice: tuple[str, str] | None = None, status_code: int = 200) -> HTMLResponse:
    view = job_view(request.app.state.store, job_id)
    context = {
        "job": view,
        "notice": notice,
        "stages": STAGES,
        "active": "jobs",
        "title": f"Job {job_id}",
    }
    return render(request, "job.html", context, status_code=status_code)


@router.get("/{job_id}")
def job_page(request: Request, job_id: int, _: Reader) -> HTMLResponse:
    """One job."""
    return _page(request, job_id)


async def _act(request: Request, job_id: int, action: Callable[[], str]) -> HTMLResponse:
    """Do ``action`` (returns what to tell); the page again with the outcome (409 when it could not be done)."""
    try:
        done = await run_in_threadpool(action)
    except (JobConflict, ExportError) as exc:
        return _page(request, job_id, ("bad", exc.reason), status_code=409)
    gateway: Gateway = request.app.state.gateway
    gateway.wake_jobs()  # a re-run from assembly
    gateway.wake_export()  # a retry, or a re-run from export
    return _page(request, job_id, ("ok", done))


@router.post("/{job_id}/retry")
async def retry(request: Request, job_id: int, who: Writer) -> HTMLResponse:
    """Put the job's dead (and refused) deliveries back in the queue."""
    store = request.app.state.store

    def action() -> str:
        count = retry_job(store, job_id)
        log.info("job %d: %d deliveries retried from the web UI by %r", job_id, count, who.name)
        return f"{count} deliver{'y' if count == 1 else 'ies'} back in the queue."

    return await _act(request, job_id, action)


@router.post("/{job_id}/rerun")
async def rerun(
    request: Request,
    job_id: int,
    from_stage: Annotated[str, Form()],
    who: Writer,
) -> HTMLResponse:
    """Run the job again from ``from_stage`` (a form field: one of :data:`gateway.jobs.operations.RERUN_FROM`)."""
    if from_stage not in operations.RERUN_FROM:
        return _page(request, job_id, ("bad", f"a job is re-run from {' or '.join(operations.RERUN_FROM)}"), 400)
    store = request.app.state.store

    def action() -> str:
        state = operations.rerun(store, job_id, from_stage=from_stage, by=who.name)
        return f"The job runs again from {from_stage}; it is {state.value} now."

    return await _act(request, job_id, action)


@router.post("/{job_id}/cancel")
async def cancel(request: Request, job_id: int, who: Writer) -> HTMLResponse:
    """Cancel the job (its deliveries not yet sent are not sent)."""
    store = request.app.state.store

    def action() -> str:
        operations.cancel(store, job_id, by=who.name)
        return "The job is cancelled."

    return await _act(request, job_id, action)
