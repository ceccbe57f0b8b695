"""The model registry over HTTP: ``/api/models``.

Reading (``GET``) needs the ``read`` scope; uploading, enabling, disabling and removing need ``admin``. A package is
uploaded as the request body, a ``.zip`` or ``.tar.gz`` archive with an archive media type as its ``Content-Type``
(:data:`ARCHIVE_MEDIA_TYPES`; anything else is 415, so that no cross-site "simple request" can carry one), no larger
than ``models.max_upload_bytes`` (413), while the store's free space stays above ``store.min_free_bytes`` (507).
Statuses: 400 for a body that is not such an archive, 422 for a package that cannot be registered (unsafe archive,
bad manifest, missing weights, failed dry run: the reason is in ``detail``, without the server's paths), 409 for a
``name@version`` already registered with other weights, 404 for an unknown model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from gateway.api.auth import caller_name, require_scope
from gateway.api.deps import get_settings_dep, get_store
from gateway.api.redact import without_paths
from gateway.config import Settings
from gateway.errors import ModelConflict, ModelError, OutOfResources
from gateway.registry.archive import archive_suffix
from gateway.registry.registry import RegisteredModel, Registry
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/models", tags=["models"])

# A read token is told it may not write (as on every other non-GET route), a write token that it needs admin.
_READ = [Depends(require_scope("read"))]
_ADMIN = [Depends(require_scope("write")), Depends(require_scope("admin"))]


#: Media types an uploaded package may be sent as (the archive's kind is then told by its first bytes).
ARCHIVE_MEDIA_TYPES = frozenset(
    {
        "application/zip",
        "application/x-zip-compressed",
        "application/gzip",
        "application/x-gzip",
        "application/x-tar+gzip",
    }
)
#: While a body arrives, the free space is checked again after this many bytes.
_SPACE_CHECK_BYTES = 64 << 20


def get_registry(request: Request) -> Registry:
    """The model registry of the running gateway."""
    registry: Registry = request.app.state.gateway.registry
    return registry


class UploadRefused(Exception):
    """The upload is refused before registration: an HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@router.get("", dependencies=_READ)
def list_models(registry: Registry = Depends(get_registry)) -> list[dict[str, Any]]:
    """Every registered version, by name (the ``active`` one is what routing uses when the model is enabled)."""
    return [model.summary() for model in registry.list()]


@router.get("/{name}", dependencies=_READ)
def get_model(name: str, registry: Registry = Depends(get_registry)) -> dict[str, Any]:
    """The model's active version in full, and the summary of every version."""
    active = registry.get(name)
    return {**active.as_dict(), "versions": [m.summary() for m in registry.versions(active.name)]}


@router.get("/{name}/{version}", dependencies=_READ)
def get_version(name: str, version: str, registry: Registry = Depends(get_registry)) -> dict[str, Any]:
    """One version in full: manifest, weights digest, dry-run report."""
    return registry.get(f"{name}@{version}").as_dict()


@router.post("", dependencies=_ADMIN, status_code=201)
async def upload_model(
    request: Request,
    registry: Registry = Depends(get_registry),
    store: InstanceStore = Depends(get_store),
    settings: Settings = Depends(get_settings_dep),
) -> Response:
    """Register the package archive in the request body; 201 with the version (200 if it was already registered)."""
    archive: Path | None = None
    try:
        archive = await _receive(request, store, settings.models.max_upload_bytes)
        allowed_by = f"admin token {request.state.token_name!r}"  # the route needs the admin scope
        model, new = await run_in_threadpool(_register, registry, archive, allowed_by)
    except UploadRefused as exc:
        log.info("model upload refused with %d: %s", exc.status, exc.reason)
        return _error(exc.status, exc.reason)
    except ClientDisconnect:
        return _error(400, "client disconnected before the end of the body")
    except OutOfResources as exc:
        log.warning("model upload refused: %s", exc.reason)
        return _error(507, f"{exc.reason} (store.min_free_bytes)")
    except ModelConflict as exc:
        return _error(409, without_paths(exc.reason))
    except ModelError as exc:
        log.info("model upload refused: %s", exc.reason)
        return _error(422, without_paths(exc.reason))
    finally:
        if archive is not None:
            archive.unlink(missing_ok=True)
    return JSONResponse(model.as_dict(), status_code=201 if new else 200)


def _register(registry: Registry, archive: Path, allowed_by: str) -> tuple[RegisteredModel, bool]:
    """Register ``archive`` (an admin uploads it: a ``trust_code`` bundle may run its code, recorded as allowed by
    ``allowed_by``); also say whether it is a new version (not one registered before)."""
    before = {m.ref for m in registry.list()}
    model = registry.register(archive, code_allowed_by=allowed_by, by=allowed_by)
    return model, model.ref not in before


@router.post("/{name}/{version}/enable", dependencies=_ADMIN)
def enable_model(name: str, version: str, request: Request, registry: Registry = Depends(get_registry)) -> Response:
    """Enable the model and make this version its active one."""
    return _change(lambda: registry.enable(f"{name}@{version}", by=caller_name(request)).as_dict())


@router.post("/{name}/disable", dependencies=_ADMIN)
def disable_model(name: str, request: Request, registry: Registry = Depends(get_registry)) -> Response:
    """Disable the model (its versions stay registered); returns its versions."""
    return _change(lambda: [m.summary() for m in registry.disable(name, by=caller_name(request))])


@router.delete("/{name}/{version}", dependencies=_ADMIN)
def remove_model(name: str, version: str, request: Request, registry: Registry = Depends(get_registry)) -> Response:
    """Remove the version and its package; returns what was removed."""
    return _change(lambda: registry.remove(f"{name}@{version}", by=caller_name(request)).summary())


def _change(action: Callable[[], Any]) -> Response:
    """Run a registry change; a refused one (bad reference) is 400, an unknown model 404 (the app's handler)."""
    try:
        return JSONResponse(action())
    except ModelError as exc:
        return _error(400, without_paths(exc.reason))


async def _receive(request: Request, store: InstanceStore, limit: int) -> Path:
    """Stream the body into a file in the store's temporary folder, counting it against ``limit`` and the store's
    free-space watermark."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadRefused(413, f"request body exceeds the limit of {limit} bytes")
    _check_media_type(request.headers.get("content-type"))
    await run_in_threadpool(store.check_space, int(declared) if declared is not None and declared.isdigit() else 0)
    part = store.temp_path()
    try:
        size = await _copy_body(request, part, limit, store)
        if size == 0:
            raise UploadRefused(400, "empty body: send a .zip or .tar.gz model package")
        await run_in_threadpool(store.check_space, size)  # room to unpack it, roughly
        return part.rename(part.with_suffix(_kind(part)))
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _check_media_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in ARCHIVE_MEDIA_TYPES:
        raise UploadRefused(415, "send the package archive itself as the body, as application/zip or application/gzip")


async def _copy_body(request: Request, target: Path, limit: int, store: InstanceStore) -> int:
    size = checked = 0
    with target.open("wb") as out:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise UploadRefused(413, f"request body exceeds the limit of {limit} bytes")
            if size - checked >= _SPACE_CHECK_BYTES:
                await run_in_threadpool(store.check_space, _SPACE_CHECK_BYTES)
                checked = size
            await run_in_threadpool(out.write, chunk)
    return size


def _kind(path: Path) -> str:
    with path.open("rb") as f:
        suffix = archive_suffix(f.read(4))
    if suffix is None:
        raise UploadRefused(400, "the body is not a .zip or .tar.gz archive")
    return suffix


def _error(status: int, reason: str) -> Response:
    return JSONResponse({"detail": reason}, status_code=status)
