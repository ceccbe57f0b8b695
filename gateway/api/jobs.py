"""The JSON API over studies and jobs: ``GET /api/studies``, ``GET /api/jobs``, ``GET /api/jobs/{id}`` (with its
export deliveries), ``POST /api/jobs/{id}/retry`` (``write`` scope: dead and refused deliveries back to the
queue; 409 when the job has none) and ``POST /api/series/{uid}/release`` (``write`` scope: a series held for
instances refused for want of resources goes on without them; 409 when it is not held)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from gateway.api.auth import require_scope
from gateway.api.deps import get_store
from gateway.errors import ExportError, NotFound
from gateway.export.queue import deliveries_of, retry_job
from gateway.ingest.completion import release_series
from gateway.store.index import Instance, Job, Series, SeriesRevision, Study
from gateway.store.store import InstanceStore

router = APIRouter(prefix="/api", tags=["jobs"], dependencies=[Depends(require_scope("read"))])


def job_view(job: Job) -> dict[str, Any]:
    """A job as the API shows it."""
    return {
        "id": job.id,
        "state": job.state,
        "study_instance_uid": job.study_instance_uid,
        "series_instance_uid": job.series_instance_uid,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "detail": job.detail,
    }


@router.get("/jobs")
def list_jobs(
    state: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    store: InstanceStore = Depends(get_store),
) -> list[dict[str, Any]]:
    """Jobs, newest first, optionally of one state."""
    query = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
    if state is not None:
        query = query.where(Job.state == state)
    with store.sessions() as session:
        return [job_view(job) for job in session.scalars(query)]


@router.get("/jobs/{job_id}")
def get_job(job_id: int, store: InstanceStore = Depends(get_store)) -> dict[str, Any]:
    """One job."""
    with store.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        view = job_view(job)
    return {**view, "deliveries": deliveries_of(store, job_id)}


@router.post("/jobs/{job_id}/retry", dependencies=[Depends(require_scope("write"))], response_model=None)
def retry_export(job_id: int, store: InstanceStore = Depends(get_store)) -> dict[str, Any] | JSONResponse:
    """Requeue a job's dead and refused deliveries (attempts reset) and put the job back to ``encoded``."""
    try:
        requeued = retry_job(store, job_id)
    except ExportError as exc:
        return JSONResponse({"detail": exc.reason}, status_code=409)
    return {"requeued": requeued, **get_job(job_id, store)}


@router.post("/series/{series_uid}/release", dependencies=[Depends(require_scope("write"))], response_model=None)
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
