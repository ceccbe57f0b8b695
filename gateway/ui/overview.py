"""The overview page, ``GET /ui``: is the gateway doing its work?

Instances received and refused in the last hour and day, jobs by state and the oldest waiting one, disk free
against the watermarks, each destination's reachability (its last check), and each model's inference time. The
figures sit in a fragment (``GET /ui/overview/live``) that the page polls every 5 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from gateway.jobs.views import JobSummary, ModelLatency, job_summaries, model_latency, oldest_waiting, states_count
from gateway.metrics import RecentIngest
from gateway.runtime import Gateway
from gateway.store.retention import DiskUsage
from gateway.ui.destinations import DestinationRow, destination_rows
from gateway.ui.errors import UI_PREFIX
from gateway.ui.session import require_ui
from gateway.ui.templating import render

router = APIRouter(prefix=UI_PREFIX, include_in_schema=False, dependencies=[Depends(require_ui("read"))])

#: How often the page asks for fresh figures.
POLL_S = 5


@dataclass(frozen=True)
class ModelRow:
    """An enabled model's active version and its recent inference record."""

    ref: str
    description: str
    latency: ModelLatency | None


@dataclass(frozen=True)
class Overview:
    """What the overview shows (no patient data: counts, states, UIDs only)."""

    ingest: RecentIngest
    states: dict[str, int]
    needing_a_look: int  # failed, or results delivered nowhere
    oldest: JobSummary | None
    disk: DiskUsage
    problems: list[str]
    destinations: list[DestinationRow]
    models: list[ModelRow]
    at: float


def overview(gateway: Gateway, *, now: float | None = None) -> Overview:
    """Gather the overview's figures from a running gateway."""
    now = time.time() if now is None else now
    latency = model_latency(gateway.store)
    models = [
        ModelRow(m.ref, m.manifest.description or "", latency.get(m.ref))
        for m in gateway.registry.list()
        if m.enabled and m.active
    ]
    return Overview(
        ingest=gateway.metrics.recent_ingest(now),
        states=states_count(gateway.store),
        needing_a_look=job_summaries(gateway.store, problems=True, limit=0)[1],
        oldest=oldest_waiting(gateway.store, now=now),
        disk=gateway.disk_usage(),
        problems=gateway.problems(),
        destinations=destination_rows(gateway),
        models=models,
        at=now,
    )


def _context(request: Request) -> dict[str, Any]:
    data = overview(request.app.state.gateway)
    return {"o": data, "poll_s": POLL_S, "active": "overview", "title": "Overview"}


@router.get("")
def overview_page(request: Request) -> HTMLResponse:
    """The overview."""
    return render(request, "overview.html", _context(request))


@router.get("/overview/live")
def overview_live(request: Request) -> HTMLResponse:
    """The overview's figures alone, for the page's polling."""
    return render(request, "_overview_live.html", _context(request))
