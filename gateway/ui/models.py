"""The models page, ``GET /ui/models``: the registry, and (``admin``) upload, enable and disable.

Each model with its versions: the active one, enabled or not, the weights' SHA-256, the dry run's outcome, the
selection rules (which series it runs on) and its recent runs, failures and inference time (p50/p95,
:func:`gateway.jobs.views.model_latency`). The buttons call the registry as ``/api/models`` does
(:mod:`gateway.api.models`): ``POST /ui/models/upload`` takes the package archive as a multipart form's file (htmx
sends it with ``hx-encoding="multipart/form-data"``), ``POST /ui/models/{name}/{version}/enable`` and ``POST
/ui/models/{name}/disable``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from gateway.api.models import get_registry
from gateway.api.redact import without_paths
from gateway.config import Settings
from gateway.errors import ModelConflict, ModelError, OutOfResources
from gateway.jobs.views import ModelLatency, model_latency
from gateway.registry.archive import archive_suffix
from gateway.registry.registry import RegisteredModel, Registry
from gateway.store.store import InstanceStore
from gateway.ui.errors import UI_PREFIX
from gateway.ui.session import Admin, Reader
from gateway.ui.templating import render

log = logging.getLogger(__name__)

router = APIRouter(prefix=f"{UI_PREFIX}/models", include_in_schema=False)

#: Room for a multipart form's boundaries and part headers beyond the archive itself.
_FORM_OVERHEAD = 64 << 10


@dataclass(frozen=True)
class ModelCard:
    """A model (by name) with its versions, newest registration first."""

    name: str
    enabled: bool
    active: RegisteredModel | None
    versions: list[RegisteredModel]
    latency: dict[str, ModelLatency]  # by ``name@version``

    @property
    def select_rules(self) -> dict[str, Any]:
        """The active version's selection rules that differ from the defaults."""
        shown = self.active or self.versions[0]
        rules: dict[str, Any] = shown.manifest.select.model_dump(mode="json", exclude_defaults=True)
        return rules


def model_cards(registry: Registry, store: InstanceStore) -> list[ModelCard]:
    """Every registered model, by name, with its versions and their recent inference record."""
    latency = model_latency(store)
    by_name: dict[str, list[RegisteredModel]] = {}
    for model in registry.list():
        by_name.setdefault(model.name, []).append(model)
    cards = []
    for name, versions in sorted(by_name.items()):
        versions.sort(key=lambda m: m.registered_at, reverse=True)
        active = next((m for m in versions if m.active), None)
        cards.append(
            ModelCard(
                name=name,
                enabled=any(m.enabled for m in versions),
                active=active,
                versions=versions,
                latency={m.ref: latency[m.ref] for m in versions if m.ref in latency},
            )
        )
    return cards


class Refused(Exception):
    """An upload refused before registration: the status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _page(request: Request, notice: tuple[str, str] | None = None, status_code: int = 200) -> HTMLResponse:
    gateway = request.app.state.gateway
    settings: Settings = request.app.state.settings
    context = {
        "models": model_cards(gateway.registry, gateway.store),
        "max_upload_bytes": settings.models.max_upload_bytes,
        "notice": notice,
        "active": "models",
        "title": "Models",
    }
    return render(request, "models.html", context, status_code=status_code)


@router.get("")
def models_page(request: Request, _: Reader) -> HTMLResponse:
    """The registry."""
    return _page(request)


@router.post("/upload")
async def upload(request: Request, who: Admin) -> HTMLResponse:
    """Register the package archive of the form's ``package`` file; the page again, with the outcome."""
    store: InstanceStore = request.app.state.store
    settings: Settings = request.app.state.settings
    archive: Path | None = None
    try:
        archive = await _receive(request, store, settings.models.max_upload_bytes)
        registry = get_registry(request)
        before = {m.ref for m in registry.list()}
        allowed_by = f"admin token {who.name!r} (web UI)"
        model = await run_in_threadpool(registry.register, archive, code_allowed_by=allowed_by)
    except Refused as exc:
        return _page(request, ("bad", exc.reason), exc.status)
    except OutOfResources as exc:
        return _page(request, ("bad", f"{exc.reason} (store.min_free_bytes)"), 507)
    except ModelConflict as exc:
        return _page(request, ("bad", without_paths(exc.reason)), 409)
    except ModelError as exc:
        log.info("model upload from the web UI refused: %s", exc.reason)
        return _page(request, ("bad", without_paths(exc.reason)), 422)
    finally:
        if archive is not None:
            archive.unlink(missing_ok=True)
    if model.ref in before:
        return _page(request, ("info", f"{model.ref} was registered already, with the same weights."))
    log.info("model %s registered from the web UI by %r", model.ref, who.name)
    return _page(request, ("ok", f"{model.ref} is registered{' and enabled' if model.enabled else ''}."), 201)


async def _receive(request: Request, store: InstanceStore, limit: int) -> Path:
    """The form's archive, copied into the store's temporary folder (named by its kind)."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        raise Refused(411, "send the package as a form with a Content-Length")
    if int(declared) > limit + _FORM_OVERHEAD:
        raise Refused(413, f"the package exceeds the limit of {limit} bytes (models.max_upload_bytes)")
    await run_in_threadpool(store.check_space, int(declared))
    async with request.form(max_files=1, max_fields=2) as form:
        package = form.get("package")
        if not isinstance(package, UploadFile) or not package.filename:
            raise Refused(400, "choose a .zip or .tar.gz model package")
        return await run_in_threadpool(_stage, package, store)


def _stage(package: UploadFile, store: InstanceStore) -> Path:
    suffix = archive_suffix(package.file.read(4))
    if suffix is None:
        raise Refused(400, "the file is not a .zip or .tar.gz archive")
    package.file.seek(0)
    part = store.temp_path()
    try:
        with part.open("wb") as out:
            shutil.copyfileobj(package.file, out, 1 << 20)
        return part.rename(part.with_suffix(suffix))
    except BaseException:
        part.unlink(missing_ok=True)
        raise


@router.post("/{name}/{version}/enable")
async def enable(request: Request, name: str, version: str, who: Admin) -> HTMLResponse:
    """Enable the model with this version active."""
    registry = get_registry(request)
    try:
        model = await run_in_threadpool(registry.enable, f"{name}@{version}")
    except ModelError as exc:
        return _page(request, ("bad", without_paths(exc.reason)), 400)
    log.info("model %s enabled from the web UI by %r", model.ref, who.name)
    return _page(request, ("ok", f"{model.ref} is enabled; new series are routed to it."))


@router.post("/{name}/disable")
async def disable(request: Request, name: str, who: Admin) -> HTMLResponse:
    """Disable the model (its versions stay registered)."""
    registry = get_registry(request)
    try:
        await run_in_threadpool(registry.disable, name)
    except ModelError as exc:
        return _page(request, ("bad", without_paths(exc.reason)), 400)
    log.info("model %s disabled from the web UI by %r", name, who.name)
    return _page(request, ("ok", f"{name} is disabled; no new job runs it."))
