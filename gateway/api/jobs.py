"""The JSON API over studies and jobs.

Reading (``read`` scope): ``GET /api/studies``; ``GET /api/jobs`` (compact summaries, newest first, filtered by
``state``, ``modality`` and ``problems``, paged by ``limit`` and ``offset``, the total in the ``X-Total-Count``
header: :func:`gateway.jobs.views.job_summaries`); ``GET /api/jobs/{id}`` (the whole job, with its export
deliveries and every attempt).

Changing (``write`` scope; 409 with the reason when the job or series is not in a state that allows it, 404 when
there is no such job or series): ``POST /api/jobs/{id}/retry`` (dead and refused deliveries back to the queue),
``POST /api/jobs/{id}/rerun?from=assemble|export``, ``POST /api/jobs/{id}/cancel``,
``POST /api/series/{uid}/reprocess`` (a new job on the series as stored, with the models registered now) and
``POST /api/series/{uid}/release`` (a series held for instances refused for want of resources goes on without
them).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from gateway.api.auth import caller_name, require_scope
from gateway.api.deps import get_store
from gateway.errors import ExportError, JobConflict, NotFound
from gateway.export.queue import deliveries_of, retry_job
from gateway.ingest.completion import release_series
from gateway.jobs import operations, views
from gateway.runtime import Gateway
from gateway.store.index import Instance, Job, Series, SeriesRevision, Study
from gateway.store.store import InstanceStore

router = APIRouter(prefix="/api", tags=["jobs"], dependencies=[Depends(require_scope("read"))])
_write = [Depends(require_scope("write"))]

#: The response header of ``GET /api/jobs`` that says how many jobs match the filters in all (every page).
TOTAL_HEADER = "X-Total-Count"


def job_view(job: Job) -> dict[str, Any]:
    """A job as the API shows it in full."""
    return {
        "id": job.id,
        "state": job.state,
        "study_instance_uid": job.study_instance_uid,
        "series_instance_uid": job.series_instance_uid,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "detail": job.detail,
    }


@router.get("/jobs")
def list_jobs(
    response: Response,
    state: str | None = None,
    modality: str | None = None,
    problems: bool = Query(False, description="Only failed jobs and jobs whose results reached no destination."),
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    store: InstanceStore = Depends(get_store),
) -> list[dict[str, Any]]:
    """Job summaries, newest first; how many match in all is in the ``X-Total-Count`` header."""
    page, total = views.job_summaries(
        store, state=state, modality=modality, problems=problems, limit=limit, offset=offset
    )
    response.headers[TOTAL_HEADER] = str(total)
    return [s.as_dict() for s in page]


@router.get("/jobs/{job_id}")
def get_job(job_id: int, store: InstanceStore = Depends(get_store)) -> dict[str, Any]:
    """One job in full: its detail (routing, assembly QC, results, outputs, timings) and its deliveries."""
    with store.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        view = job_view(job)
    summary = views.job_summary(store, job_id)
    extra = {"models_run": list(summary.models_run), "undelivered": summary.undelivered, "failure": summary.failure}
    return {**view, **extra, "stages": summary.stages.as_dict(), "deliveries": deliveries_of(store, job_id)}


def _conflict(exc: JobConflict | ExportError) -> JSONResponse:
    return JSONResponse({"detail": exc.reason}, status_code=409)


def _wake(request: Request, stage: Literal["jobs", "export"]) -> None:
    """A job is ``received`` (``jobs``) or has deliveries queued (``export``): the running gateway's idle workers
    of that stage look now rather than at their next poll."""
    gateway = getattr(request.app.state, "gateway", None)
    if isinstance(gateway, Gateway):
        (gateway.wake_jobs if stage == "jobs" else gateway.wake_export)()


@router.post("/jobs/{job_id}/rerun", dependencies=_write, response_model=None)
def rerun_job(
    job_id: int,
    request: Request,
    from_stage: Literal["assemble", "export"] = Query(
        ..., alias="from", description="assemble: run the job afresh; export: send its outputs again."
    ),
    store: InstanceStore = Depends(get_store),
) -> dict[str, Any] | JSONResponse:
    """Run a finished job again from assembly (with the models registered now), or send its outputs again."""
    try:
        operations.rerun(store, job_id, from_stage=from_stage, by=caller_name(request))
    except JobConflict as exc:
        return _conflict(exc)
    _wake(request, "jobs" if from_stage == "assemble" else "export")
    return get_job(job_id, store)


@router.post("/jobs/{job_id}/cancel", dependencies=_write, response_model=None)
def cancel_job(
    job_id: int, request: Request, store: InstanceStore = Depends(get_store)
) -> dict[str, Any] | JSONResponse:
    """Cancel a job that has not finished; its deliveries not yet sent are not sent."""
    try:
        operations.cancel(store, job_id, by=caller_name(request))
    except JobConflict as exc:
        return _conflict(exc)
    return get_job(job_id, store)


@router.post("/series/{series_uid}/reprocess", dependencies=_write, response_model=None)
def reprocess(
    series_uid: str, request: Request, store: InstanceStore = Depends(get_store)
) -> dict[str, Any] | JSONResponse:
    """Run a series again, as stored, with the models registered now (a new revision and its job)."""
    try:
        job_id = operations.reprocess_series(store, series_uid, by=caller_name(request))
    except JobConflict as exc:
        return _conflict(exc)
    _wake(request, "jobs")
    return {"job_id": job_id, "job": views.job_summary(store, job_id).as_dict()}


@router.post("/jobs/{job_id}/retry", dependencies=_write, response_model=None)
def retry_export(
    job_id: int, request: Request, store: InstanceStore = Depends(get_store)
) -> dict[str, Any] | JSONResponse:
    """Requeue a job's dead and refused deliveries (attempts reset) and put the job back to ``encoded``."""
    try:
        requeued = retry_job(store, job_id)
    except ExportError as exc:
        return _conflict(exc)
    _wake(request, "export")
    return {"requeued": requeued, **get_job(job_id, store)}


@router.post("/series/{series_uid}/release", dependencies=_write, response_model=None)
def release_held_series(series_uid: str, store: InstanceStore = Depends(get_store)) -> dict[str, Any] | JSONResponse:
    """Give up the instances of a held series that were refused for want of resources; its job runs without them."""
    released = release_series(store.write_sessions, series_uid)  # NotFound -> 404
    if released.completion is None and not released.refusals_dropped:
        return JSONResponse({"detail": "the series is not held: no refused instance is outstanding"}, status_code=409)
    job_id = released.completion.job_id if released.completion is not None else None
    return {"refusals_dropped": released.refusals_dropped, "job_id": job_id}


@router.get("/studies")
def list_studies(
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    store: InstanceStore = Depends(get_store),
) -> list[dict[str, Any]]:
    """Studies held, with their series, revisions and jobs (no patient identifiers beyond the UIDs)."""
    with store.sessions() as session:
        studies = session.scalars(select(Study).order_by(Study.created_at.desc()).limit(limit).offset(offset)).all()
        return [_study_view(session, study) for study in studies]


def _study_view(session: Any, study: Study) -> dict[str, Any]:
    series_rows = session.scalars(select(Series).where(Series.study_instance_uid == study.study_instance_uid)).all()
    return {
        "study_instance_uid": study.study_instance_uid,
        "received_at": study.created_at,
        "series": [_series_view(session, s) for s in series_rows],
    }


def _series_view(session: Any, series: Series) -> dict[str, Any]:
    uid = series.series_instance_uid
    count = session.scalar(select(func.count()).where(Instance.series_instance_uid == uid))
    revisions = session.scalars(
        select(SeriesRevision).where(SeriesRevision.series_instance_uid == uid).order_by(SeriesRevision.revision)
    ).all()
    jobs = {j.revision_id: j.id for j in session.scalars(select(Job).where(Job.series_instance_uid == uid))}
    return {
        "series_instance_uid": uid,
        "modality": series.modality,
        "instances": count,
        "revisions": [
            {
                "revision": r.revision,
                "state": r.state,
                "instances": r.instance_count,
                "last_received_at": r.last_received_at,
                "completed_at": r.completed_at,
                "job_id": jobs.get(r.id),
            }
            for r in revisions
        ],
    }
