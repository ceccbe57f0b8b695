"""The studies page, ``GET /ui/studies``: what was received, per series, and "reprocess with the current models".

Each study (newest first, 20 a page) with its series: modality, description, instances held, and every revision
with its job. No patient data: the study is shown by its date, description and UID. ``POST
/ui/series/{uid}/reprocess`` (``write``) makes a new revision of the series, as stored, and its job, which runs
with the models registered now (:func:`gateway.jobs.operations.reprocess_series`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from gateway.errors import JobConflict
from gateway.jobs import operations
from gateway.runtime import Gateway
from gateway.store.index import Instance, Job, Series, SeriesRevision, Study
from gateway.store.store import StoreIndex
from gateway.ui.errors import UI_PREFIX
from gateway.ui.session import Reader, Writer
from gateway.ui.templating import render

log = logging.getLogger(__name__)

router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)

PAGE_SIZE = 20


@dataclass(frozen=True)
class RevisionRow:
    """A revision of a series (a batch of its instances that completed) and its job."""

    revision: int
    state: str
    instances: int
    completed_at: float | None
    job_id: int | None
    job_state: str | None


@dataclass(frozen=True)
class SeriesRow:
    """A series as received."""

    series_instance_uid: str
    modality: str | None
    series_number: int | None
    description: str | None
    instances: int
    revisions: list[RevisionRow]

    @property
    def busy(self) -> bool:
        """Whether a job of the series has not finished (it cannot be reprocessed now)."""
        finished = {"exported", "skipped", "failed", "cancelled"}
        return any(r.job_state is not None and r.job_state not in finished for r in self.revisions)


@dataclass(frozen=True)
class StudyRow:
    """A study with its series (no patient data)."""

    study_instance_uid: str
    study_date: str | None
    description: str | None
    received_at: float
    series: list[SeriesRow]


def studies(store: StoreIndex, *, limit: int = PAGE_SIZE, offset: int = 0) -> tuple[list[StudyRow], int]:
    """A page of studies, newest first, with their series, and how many studies there are."""
    with store.sessions() as session:
        total = int(session.scalar(select(func.count()).select_from(Study)) or 0)
        found = session.scalars(
            select(Study).order_by(Study.created_at.desc(), Study.study_instance_uid).limit(limit).offset(offset)
        ).all()
        study_uids = [s.study_instance_uid for s in found]
        series = session.scalars(
            select(Series).where(Series.study_instance_uid.in_(study_uids)).order_by(Series.series_number)
        ).all()
        series_uids = [s.series_instance_uid for s in series]
        counts = dict(
            session.execute(
                select(Instance.series_instance_uid, func.count())
                .where(Instance.series_instance_uid.in_(series_uids))
                .group_by(Instance.series_instance_uid)
            ).all()
        )
        revisions = session.execute(
            select(SeriesRevision, Job.id, Job.state)
            .outerjoin(Job, Job.revision_id == SeriesRevision.id)
            .where(SeriesRevision.series_instance_uid.in_(series_uids))
            .order_by(SeriesRevision.revision)
        ).all()
        by_series: dict[str, list[RevisionRow]] = {}
        for rev, job_id, job_state in revisions:
            row = RevisionRow(rev.revision, rev.state, rev.instance_count, rev.completed_at, job_id, job_state)
            by_series.setdefault(rev.series_instance_uid, []).append(row)
        rows = {
            s.series_instance_uid: SeriesRow(
                s.series_instance_uid,
                s.modality,
                s.series_number,
                s.series_description,
                int(counts.get(s.series_instance_uid, 0)),
                by_series.get(s.series_instance_uid, []),
            )
            for s in series
        }
        return [
            StudyRow(
                study.study_instance_uid,
                study.study_date,
                study.study_description,
                study.created_at,
                [rows[s.series_instance_uid] for s in series if s.study_instance_uid == study.study_instance_uid],
            )
            for study in found
        ], total


def _page(request: Request, page: int, notice: tuple[str, ...] | None = None, status_code: int = 200) -> HTMLResponse:
    found, total = studies(request.app.state.store, offset=(page - 1) * PAGE_SIZE)
    context = {
        "studies": found,
        "total": total,
        "page": page,
        "pages": max(1, math.ceil(total / PAGE_SIZE)),
        "notice": notice,
        "active": "studies",
        "title": "Studies",
    }
    return render(request, "studies.html", context, status_code=status_code)


@router.get("/studies")
def studies_page(
    request: Request,
    _: Reader,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> HTMLResponse:
    """A page of studies with their series."""
    return _page(request, page)


@router.post("/series/{series_uid}/reprocess")
async def reprocess(
    request: Request,
    series_uid: str,
    who: Writer,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> HTMLResponse:
    """Reprocess a series with the models registered now; the page again, with the new job."""
    gateway: Gateway = request.app.state.gateway
    try:
        job_id = await run_in_threadpool(operations.reprocess_series, gateway.store, series_uid, by=who.name)
    except JobConflict as exc:
        return _page(request, page, ("bad", exc.reason), status_code=409)
    gateway.wake_jobs()
    notice = ("ok", f"Job {job_id} reprocesses the series with the current models.", f"{UI_PREFIX}/jobs/{job_id}")
    return _page(request, page, notice)
