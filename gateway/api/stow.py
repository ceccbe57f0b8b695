"""STOW-RS routes (PS3.18 10.5): ``POST /dicomweb/studies[/{StudyInstanceUID}]``."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from gateway.api.auth import audit_of, client_host, require_scope
from gateway.api.deps import get_settings_dep, get_store
from gateway.api.metrics import metrics_of
from gateway.audit.trail import StudyTally
from gateway.config import Settings
from gateway.errors import OutOfResources
from gateway.ingest.instance import is_valid_uid
from gateway.ingest.stow import StowItem, StowReceiver, StowRequestError, StowResult, boundary_of
from gateway.metrics import GatewayMetrics
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require_scope("write"))])

_DICOM_JSON = "application/dicom+json"
_OUT_OF_RESOURCES = OutOfResources.default_status & 0xFF00


@router.post("/studies")
async def store_instances(
    request: Request,
    store: InstanceStore = Depends(get_store),
    settings: Settings = Depends(get_settings_dep),
) -> Response:
    """Store the instances of a multipart/related body, whatever their study."""
    return await _stow(request, store, settings, None)


@router.post("/studies/{study_instance_uid}")
async def store_study_instances(
    study_instance_uid: str,
    request: Request,
    store: InstanceStore = Depends(get_store),
    settings: Settings = Depends(get_settings_dep),
) -> Response:
    """Store instances that must all belong to ``study_instance_uid`` (others fail with 0xA900)."""
    if not is_valid_uid(study_instance_uid):
        return _error(400, "StudyInstanceUID in the URL is not a valid UID")
    return await _stow(request, store, settings, study_instance_uid)


async def _stow(request: Request, store: InstanceStore, settings: Settings, study: str | None) -> Response:
    limit = settings.ingest.stow_max_bytes
    try:
        boundary = boundary_of(request.headers.get("content-type"))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise StowRequestError(413, f"request body exceeds the limit of {limit} bytes")
        receiver = StowReceiver(store, boundary, limit, study)
        result = await _receive(request, receiver)
    except StowRequestError as exc:
        log.info("STOW-RS request refused with %d: %s", exc.http_status, exc.reason)
        return _error(exc.http_status, exc.reason)
    except ClientDisconnect:
        log.info("STOW-RS client disconnected before the end of the body; nothing stored")
        return _error(400, "client disconnected before the end of the body")
    _count(metrics_of(request), result)
    _audit(request, result)
    base = str(request.base_url).rstrip("/") + "/dicomweb"
    body = result.to_dataset(base, study).to_json_dict()
    return JSONResponse(body, status_code=result.http_status, media_type=_DICOM_JSON)


async def _receive(request: Request, receiver: StowReceiver) -> StowResult:
    try:
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(receiver.feed, chunk)
    except BaseException:
        receiver.abort()
        raise
    return await run_in_threadpool(receiver.finish)


def _count(metrics: GatewayMetrics | None, result: StowResult) -> None:
    """Count each part's outcome (the time to store is measured per C-STORE only: here parts are stored as a
    batch once the body has arrived)."""
    if metrics is not None:
        for item in result.items:
            metrics.instance_received("stow", _outcome(item))


def _audit(request: Request, result: StowResult) -> None:
    """One DICOM Instances Transferred per study of which this request stored instances."""
    tally = StudyTally()
    for item in result.items:
        if item.failure_reason is None and item.study_instance_uid and item.sop_class_uid:
            tally.add(item.study_instance_uid, item.patient_id, item.sop_class_uid)
    user = getattr(request.state, "token_name", None) or "unknown"
    audit_of(request).received(user, client_host(request), tally)


def _outcome(item: StowItem) -> str:
    if item.failure_reason is None:
        return "duplicate" if item.duplicate else "stored"
    return "refused" if item.failure_reason & 0xFF00 == _OUT_OF_RESOURCES else "invalid"  # A7xx: out of resources


def _error(status: int, reason: str) -> Response:
    return JSONResponse({"detail": reason}, status_code=status)
