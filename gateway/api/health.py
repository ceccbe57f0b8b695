"""Liveness and readiness."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Depends

from gateway import __version__
from gateway.api.auth import require_scope
from gateway.api.deps import get_store
from gateway.store.store import InstanceStore

router = APIRouter(tags=["health"])


@router.get("/healthz", dependencies=[Depends(require_scope("read"))])
def healthz(store: InstanceStore = Depends(get_store)) -> dict[str, object]:
    """Version and free disk space against the watermark."""
    free = shutil.disk_usage(store.data_dir).free
    return {
        "status": "ok",
        "version": __version__,
        "free_bytes": free,
        "accepting": free >= store.settings.min_free_bytes,
    }
