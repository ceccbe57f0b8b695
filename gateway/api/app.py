"""The FastAPI application factory: DICOMweb (STOW/QIDO/WADO), the JSON API, metrics, and the web UI at ``/ui``.

A process without the ``ingest`` role (``gateway serve --role worker``, ``--role export``) serves only
``/healthz``, ``/api/storage``, ``/metrics`` (and the workers list): its port is for load balancers and scrapers.

Every request passes, in this order: the ``Host`` check (:mod:`gateway.api.hosts`), the guard that refuses a change
without an ``Authorization`` header or a page's CSRF token (:class:`gateway.api.auth.ChangesNeedAuthorization`), the
body timeout (:mod:`gateway.api.limits`), then its route, whose dependencies check the token's (or the browser
session's) scope (:mod:`gateway.api.auth`, :mod:`gateway.ui.session`).

The OpenAPI docs (``/docs``, Swagger UI from local assets) are always served; the schema they show,
``/openapi.json``, needs the ``read`` scope like every read (:mod:`gateway.ui.assets`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway import __version__
from gateway.admin_token import AdminTokenFile
from gateway.api import health, jobs, metrics, models, qido, stow, wado, workers
from gateway.api.auth import Authenticator, ChangesNeedAuthorization, SessionSigner
from gateway.api.hosts import HostCheck, allowed_hosts
from gateway.api.limits import BodyTimeout, RequestBodyTimeout, body_timed_out
from gateway.api.redact import without_paths
from gateway.api.refusals import RefusalLog
from gateway.config import Settings
from gateway.errors import ConfigError, NotFound
from gateway.runtime import Gateway
from gateway.ui.errors import pages_too
from gateway.ui.routes import include_ui
from gateway.ui.session import SessionKeyFile

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

    session_key = SessionKeyFile(settings.store.data_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(settings, dimse=start_dimse)
        gateway.start()
        app.state.gateway = gateway
        app.state.store = gateway.store
        try:
            session_key.key()  # made now if new; a damaged file is said at start, not at a browser's request
            yield
        finally:
            gateway.stop()

    # FastAPI's own docs routes are off: gateway.ui.assets serves /docs from local files, and /openapi.json with
    # the read scope (a browser signed in to the UI sends its session cookie).
    app = FastAPI(
        title="DICOM AI gateway",
        version=__version__,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    refusals = RefusalLog(logging.getLogger("gateway.api.refusals"))
    sessions = SessionSigner(session_key.key)
    app.state.authenticator = Authenticator(settings.http, AdminTokenFile(settings.store.data_dir), refusals, sessions)
    # Every process serves its health and metrics; the DICOMweb, JSON API and UI faces are the ingest role's.
    ingest = "ingest" in settings.cluster.roles
    faces = (stow, qido, wado, jobs, models, workers, health, metrics) if ingest else (workers, health, metrics)
    for module in faces:
        app.include_router(module.router)
    if ingest:
        include_ui(app)
    # A page under /ui gets its error as a page (the sign-in form for 401); the API its JSON.
    app.add_exception_handler(StarletteHTTPException, pages_too(_http_error))
    app.add_exception_handler(NotFound, pages_too(_not_found))
    app.add_exception_handler(RequestValidationError, pages_too(_bad_request))
    app.add_exception_handler(RequestBodyTimeout, body_timed_out)
    # Added innermost first: the Host check runs first, then the guard, then the body timeout.
    app.add_middleware(BodyTimeout, timeout_s=settings.http.body_timeout_s, refusals=refusals)
    app.add_middleware(ChangesNeedAuthorization, refusals=refusals)
    app.add_middleware(HostCheck, allowed=hosts, refusals=refusals)
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return await http_exception_handler(request, exc)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": without_paths(str(exc))}, status_code=404)


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    reasons = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors]
    return JSONResponse({"detail": "; ".join(reasons) or "bad request"}, status_code=400)
