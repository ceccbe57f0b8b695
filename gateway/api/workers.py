"""``GET /api/workers`` (``read`` scope): the gateway processes that share this index, alive and recently gone.

Each as it reported itself in the ``workers`` table (:mod:`gateway.jobs.presence`): owner name (``host/pid/token``),
host, pid, roles, inference device, models, version, when it started and how old its last heartbeat is, the jobs
it holds under a lease and the deliveries it is sending, and whether it is alive: heard from within three
heartbeats (``cluster.heartbeat_s``) and not stopped. A process gone (stopped, or silent: a crash) stays listed
for an hour, ``alive: false``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.api.auth import require_scope
from gateway.api.deps import get_settings_dep, get_store
from gateway.config import Settings
from gateway.jobs.presence import WorkerView, live_workers
from gateway.store.store import InstanceStore

router = APIRouter(prefix="/api", tags=["workers"], dependencies=[Depends(require_scope("read"))])

#: Heartbeats a process may miss before it is listed gone.
STALE_BEATS = 3


def workers_of(store: InstanceStore, settings: Settings) -> list[WorkerView]:
    """The processes :func:`gateway.jobs.presence.live_workers` lists, gone after :data:`STALE_BEATS` heartbeats."""
    return live_workers(store, stale_after_s=STALE_BEATS * settings.cluster.heartbeat_s)


@router.get("/workers")
def list_workers(
    store: InstanceStore = Depends(get_store), settings: Settings = Depends(get_settings_dep)
) -> list[dict[str, object]]:
    """The gateway processes: alive first, then those gone within the hour."""
    return [view.as_dict() for view in workers_of(store, settings)]
