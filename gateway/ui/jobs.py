"""The jobs list, ``GET /ui/jobs``: newest first, 50 a page, filtered by state, modality or "problems only".

Each row shows the state, the series (description and modality: no patient data), the models that ran and a bar
of the time spent in each stage (completion → assemble → queue → infer → encode → export,
:mod:`gateway.jobs.views`). A failed job, and one whose results reached no destination, stand out: coloured, and
with the word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from gateway.jobs.states import JobState
from gateway.jobs.views import STAGES, JobSummary, job_summaries
from gateway.store.index import Series
from gateway.store.store import StoreIndex
from gateway.ui.errors import UI_PREFIX
from gateway.ui.session import require_ui
from gateway.ui.templating import render

router = APIRouter(prefix=f"{UI_PREFIX}/jobs", include_in_schema=False, dependencies=[Depends(require_ui("read"))])

PAGE_SIZE = 50
_MODALITY_MAX = 16  # the VR CS's length


@dataclass(frozen=True)
class Segment:
    """One stage's part of a job's time bar."""

    stage: str
    seconds: float
    percent: float


@dataclass(frozen=True)
class JobFilter:
    """The list's filter, as the query string gives it (validated)."""

    state: str | None
    modality: str | None
    problems: bool
    page: int

    def query(self, **changes: object) -> str:
        """The query string of this filter with ``changes`` (e.g. another page)."""
        values: dict[str, object] = {
            "state": self.state,
            "modality": self.modality,
            "problems": self.problems,
            "page": self.page,
        }
        values.update(changes)
        kept: dict[str, object] = {}
        for key, value in values.items():
            if value is None or value is False or value == "" or (key == "page" and value == 1):
                continue
            kept[key] = "1" if value is True else value
        return urlencode(kept)


def time_bar(summary: JobSummary) -> list[Segment]:
    """The stages the job has a time for, with their share of its total (the bar's widths)."""
    times = summary.stages.as_dict()
    total = summary.stages.total
    return [
        Segment(stage, value, 100.0 * value / total if total > 0 else 0.0)
        for stage, value in times.items()
        if value is not None
    ]


def modalities(store: StoreIndex) -> list[str]:
    """The modalities of the series held (for the filter)."""
    with store.sessions() as session:
        found = session.scalars(select(Series.modality).where(Series.modality.is_not(None)).distinct()).all()
    return sorted(str(m) for m in found)


def parse_filter(state: str | None, modality: str | None, problems: str | None, page: int) -> JobFilter:
    """Check the query's values.

    Raises
    ------
    fastapi.HTTPException
        400 for an unknown state or a malformed modality.
    """
    state = state or None
    if state is not None and state not in {s.value for s in JobState}:
        raise HTTPException(400, detail=f"no job state {state!r}: one of {', '.join(s.value for s in JobState)}")
    modality = (modality or "").strip().upper() or None
    if modality is not None and (len(modality) > _MODALITY_MAX or not modality.replace("_", "").isalnum()):
        raise HTTPException(400, detail="a modality is a DICOM code string such as CT or MR")
    return JobFilter(state, modality, problems not in (None, "", "0", "false", "off"), page)


@router.get("")
def jobs_page(
    request: Request,
    state: str | None = None,
    modality: str | None = None,
    problems: str | None = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> HTMLResponse:
    """A page of jobs, newest first."""
    found = parse_filter(state, modality, problems, page)
    store: StoreIndex = request.app.state.store
    jobs, total = job_summaries(
        store,
        state=found.state,
        modality=found.modality,
        problems=found.problems,
        limit=PAGE_SIZE,
        offset=(found.page - 1) * PAGE_SIZE,
    )
    context = {
        "jobs": [(job, time_bar(job)) for job in jobs],
        "total": total,
        "first": (found.page - 1) * PAGE_SIZE + 1 if jobs else 0,
        "last": (found.page - 1) * PAGE_SIZE + len(jobs),
        "pages": max(1, math.ceil(total / PAGE_SIZE)),
        "filter": found,
        "states": [s.value for s in JobState],
        "modalities": modalities(store),
        "stages": STAGES,
        "active": "jobs",
        "title": "Jobs",
    }
    return render(request, "jobs.html", context)
