"""The FastAPI application factory: DICOMweb (STOW/QIDO/WADO) and the JSON API."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gateway import __version__
from gateway.api import health, jobs, models, qido, stow, wado
from gateway.config import Settings
from gateway.errors import NotFound
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
    """

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

    # The OpenAPI schema and its viewers are served only while the server is open anyway (loopback, no
    # tokens): once tokens are configured every route requires one, and a browser on /docs cannot send it.
    public_docs = not settings.http.tokens
    app = FastAPI(
        title="DICOM AI gateway",
        version=__version__,
        lifespan=lifespan,
        openapi_url="/openapi.json" if public_docs else None,
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
    )
    app.state.settings = settings
    for module in (stow, qido, wado, jobs, models, health):
        app.include_router(module.router)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(RequestValidationError, _bad_request)
    return app


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    reasons = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors]
    return JSONResponse({"detail": "; ".join(reasons) or "bad request"}, status_code=400)
