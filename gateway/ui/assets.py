"""Files the pages load, all served by the gateway itself (no CDN, nothing fetched at run time).

- ``GET /ui/static/{name}``: the UI's stylesheet and htmx (vendored in ``gateway/ui/static``, its licence and version
  in ``static/README.md``).
- ``GET /docs``: Swagger UI over the gateway's OpenAPI schema, with the assets of the ``fastapi-offline`` package
  (``GET /docs/assets/{name}``). The page and its assets are public (they say nothing about this gateway); the
  schema, ``GET /openapi.json``, needs the ``read`` scope like every other read: a browser signed in to the UI (its
  session cookie) or an anonymous loopback reader while ``http.anonymous_read`` allows it. To try a route that
  changes something from the page, "Authorize" with a bearer token.

Only the files listed here are served: a name is looked up, never joined to a path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from gateway.api.auth import require_scope

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(str(files("gateway.ui") / "static"))
SWAGGER_DIR = Path(str(files("fastapi_offline") / "static"))

#: The UI's own files: name -> media type.
STATIC_FILES = {
    "htmx.min.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
#: Swagger UI's files from fastapi-offline.
DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}
_CACHE = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}


@router.get("/ui/static/{name}")
def static_file(name: str) -> FileResponse:
    """One of the UI's static files."""
    return _file(STATIC_DIR, STATIC_FILES, name)


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> FileResponse:
    """One of Swagger UI's files."""
    return _file(SWAGGER_DIR, DOCS_FILES, name)


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over ``/openapi.json``, with local assets only."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} · API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon.png",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the validator's host
    )


@router.get("/openapi.json", dependencies=[Depends(require_scope("read"))])
def openapi_schema(request: Request) -> JSONResponse:
    """The OpenAPI schema (``read`` scope)."""
    schema: dict[str, Any] = request.app.openapi()
    return JSONResponse(schema)


def _file(folder: Path, listed: dict[str, str], name: str) -> FileResponse:
    if name not in listed:
        raise HTTPException(404, detail=f"no file {name!r}")
    return FileResponse(folder / name, media_type=listed[name], headers=_CACHE)
