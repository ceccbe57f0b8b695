"""The workers page, ``GET /ui/workers``: the gateway processes that share this index, alive and recently gone.

The same list as ``GET /api/workers`` (:func:`gateway.api.workers.workers_of`): each process's host and pid, roles,
inference device and models, version, when it started, its last heartbeat, the jobs it holds and the deliveries
it is sending. A process gone (stopped, or silent: a crash) stays listed for an hour, marked. The table refreshes
itself every :data:`POLL_S` seconds.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from gateway.api.workers import STALE_BEATS, workers_of
from gateway.config import Settings
from gateway.store.store import InstanceStore
from gateway.ui.errors import UI_PREFIX
from gateway.ui.session import Reader
from gateway.ui.templating import render

router = APIRouter(prefix=f"{UI_PREFIX}/workers", include_in_schema=False)

#: How often the page refreshes its table.
POLL_S = 10


@router.get("")
def workers_page(request: Request, _: Reader) -> HTMLResponse:
    """The gateway processes."""
    store: InstanceStore = request.app.state.store
    settings: Settings = request.app.state.settings
    views = workers_of(store, settings)
    context = {
        "workers": views,
        "alive": sum(view.alive for view in views),
        "stale_s": STALE_BEATS * settings.cluster.heartbeat_s,
        "poll_s": POLL_S,
        "active": "workers",
        "title": "Workers",
    }
    return render(request, "workers.html", context)
