"""The FastAPI application factory: DICOMweb (STOW/QIDO/WADO) and the JSON API.

Every request passes, in this order: the ``Host`` check (:mod:`gateway.api.hosts`), the guard that refuses a change
without an ``Authorization`` header (:class:`gateway.api.auth.ChangesNeedAuthorization`), the body timeout
(:mod:`gateway.api.limits`), then its route, whose dependencies check the token's scope (:mod:`gateway.api.auth`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gateway import __version__
from gateway.admin_token import AdminTokenFile
from gateway.api import health, jobs, models, qido, stow, wado
from gateway.api.auth import Authenticator, ChangesNeedAuthorization, anonymous_read_allowed
from gateway.api.hosts import HostCheck, allowed_hosts
from gateway.api.limits import BodyTimeout, RequestBodyTimeout, body_timed_out
from gateway.api.redact import without_paths
from gateway.api.refusals import RefusalLog
from gateway.config import Settings
from gateway.errors import ConfigError, NotFound
from gateway.runtime import Gateway

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, start_dimse: bool = True) -> FastAPI:
    """Create the app; the gateway's stages start in its lifespan, not here.

    Parameters
    ----------
    settings
        The gateway settings.
    start_dimse
        Whether the lifespan also starts the DICOM listener.

    Raises
    ------
    gateway.errors.ConfigError
        If a name in ``http.allowed_hosts`` is not a host name or IP address.
    """
    try:
        hosts = allowed_hosts(settings.http)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(settings, dimse=start_dimse)
        gateway.start()
        app.state.gateway = gateway
        app.state.store = gateway.store
        try:
            yield
        finally:
            gateway.stop()

    # The OpenAPI schema and its viewers are served only while reading is open anyway (anonymous reads from
    # loopback): otherwise every route requires a token, and a browser on /docs cannot send it.
    public_docs = anonymous_read_allowed(settings.http)
    app = FastAPI(
        title="DICOM AI gateway",
        version=__version__,
        lifespan=lifespan,
        openapi_url="/openapi.json" if public_docs else None,
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
    )
    app.state.settings = settings
    refusals = RefusalLog(logging.getLogger("gateway.api.refusals"))
    app.state.authenticator = Authenticator(settings.http, AdminTokenFile(settings.store.data_dir), refusals)
    for module in (stow, qido, wado, jobs, models, health):
        app.include_router(module.router)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(RequestBodyTimeout, body_timed_out)
    # Added innermost first: the Host check runs first, then the guard, then the body timeout.
    app.add_middleware(BodyTimeout, timeout_s=settings.http.body_timeout_s, refusals=refusals)
    app.add_middleware(ChangesNeedAuthorization, refusals=refusals)
    app.add_middleware(HostCheck, allowed=hosts, refusals=refusals)
    return app


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": without_paths(str(exc))}, status_code=404)


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    reasons = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors]
    return JSONResponse({"detail": "; ".join(reasons) or "bad request"}, status_code=400)
