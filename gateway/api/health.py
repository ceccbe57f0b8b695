"""Liveness, readiness and storage: ``GET /healthz`` and ``GET /api/storage``.

Both show the data folder's file system (total, used, free), the retention watermarks and the ingest floor
(``store.min_free_bytes``), and whether ingest is accepting or refusing instances for want of space.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from gateway import __version__
from gateway.api.auth import require_scope
from gateway.api.deps import get_settings_dep, get_store
from gateway.config import Settings
from gateway.runtime import Gateway
from gateway.store.index import Instance
from gateway.store.retention import DiskUsage, RetentionWorker
from gateway.store.store import InstanceStore

router = APIRouter(tags=["health"], dependencies=[Depends(require_scope("read"))])


def _disk(store: InstanceStore, settings: Settings) -> DiskUsage:
    return DiskUsage.measure(store.data_dir, settings.retention, store.settings.min_free_bytes)


def _worker(request: Request) -> RetentionWorker | None:
    """The running gateway's retention worker, if the app has a gateway."""
    gateway = getattr(request.app.state, "gateway", None)
    worker = getattr(gateway, "retention", None)
    return worker if isinstance(worker, RetentionWorker) else None


@router.get("/healthz", response_model=None)
def healthz(
    request: Request, store: InstanceStore = Depends(get_store), settings: Settings = Depends(get_settings_dep)
) -> dict[str, object] | JSONResponse:
    """Version, and disk use against the watermarks; ``accepting`` is false while ingest refuses for space.

    503 with the ``reasons`` when the gateway cannot do its work: ingest refused for want of space, a stage's
    workers dead, the DICOM listener down (a load balancer or a container's health check then sees it).
    """
    disk = _disk(store, settings)
    reasons = [] if disk.accepting else [_refusing(disk)]
    gateway = getattr(request.app.state, "gateway", None)
    if isinstance(gateway, Gateway):
        reasons.extend(gateway.problems())
    body: dict[str, object] = {
        "status": "unavailable" if reasons else "ok",
        "version": __version__,
        "free_bytes": disk.free_bytes,
        "accepting": disk.accepting,
        "disk": disk.as_dict(),
    }
    if reasons:
        body["reasons"] = reasons
        return JSONResponse(body, status_code=503)
    return body


def _refusing(disk: DiskUsage) -> str:
    return (
        f"low disk: {disk.free_bytes} bytes free, below store.min_free_bytes {disk.min_free_bytes}; "
        "instances get 0xA700 unless retention can purge enough"
    )


@router.get("/api/storage")
def storage(
    request: Request, store: InstanceStore = Depends(get_store), settings: Settings = Depends(get_settings_dep)
) -> dict[str, Any]:
    """Disk use, what the index holds, the retention settings and the last background purge's report."""
    with store.sessions() as session:
        count, size = session.execute(select(func.count(), func.coalesce(func.sum(Instance.size), 0))).one()
    worker = _worker(request)
    last = None if worker is None or worker.last_report is None else worker.last_report.as_dict()
    return {
        "disk": _disk(store, settings).as_dict(),
        "held": {"instances": int(count), "instance_bytes": int(size)},
        "retention": settings.retention.model_dump(),
        "last_purge": last,
    }
