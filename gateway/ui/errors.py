"""Errors on the UI's pages as pages: the app's JSON error handlers, wrapped so that a request for a page under
``/ui`` gets an HTML answer with the same status and reason.

A 401 shows the sign-in form (an htmx request, e.g. the overview's polling after the session ended, is sent there
with ``HX-Redirect``); any other status a short page with the reason and a way back.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import quote

from fastapi import Request
from starlette.responses import Response

from gateway.ui.templating import render

Handler = Callable[[Request, Exception], Awaitable[Response]]

UI_PREFIX = "/ui"
_STATIC_PREFIX = "/ui/static/"


def is_page(request: Request) -> bool:
    """Whether the request is for one of the UI's pages (or fragments), which answer in HTML."""
    path = request.url.path
    return (path == UI_PREFIX or path.startswith(f"{UI_PREFIX}/")) and not path.startswith(_STATIC_PREFIX)


def pages_too(handler: Handler) -> Handler:
    """Wrap a JSON error handler: for a UI page, the same status and ``detail`` rendered as a page."""

    async def handle(request: Request, exc: Exception) -> Response:
        response = await handler(request, exc)
        if not is_page(request):
            return response
        return error_page(request, response.status_code, _detail(response))

    return handle


def error_page(request: Request, status: int, reason: str) -> Response:
    """The page for an error: the sign-in form for 401, otherwise the status, the reason and a way back."""
    if status == 401:
        target = sign_in_url(request)
        headers = {"WWW-Authenticate": "Bearer"}
        if request.headers.get("HX-Request") == "true":
            headers["HX-Redirect"] = target
        form = {"next": _here(request), "message": "Sign in to see this page.", "title": "Sign in"}
        return render(request, "login.html", form, status_code=401, headers=headers)
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    context: dict[str, object] = {"status": status, "title": title, "reason": reason}
    return render(request, "error.html", context, status_code=status)


def sign_in_url(request: Request) -> str:
    """The sign-in page, coming back to the page that asked (or, for a fragment, the page that showed it)."""
    return f"{UI_PREFIX}/login?next={quote(_here(request), safe='/')}"


def _here(request: Request) -> str:
    current = request.headers.get("HX-Current-URL")
    if current and request.headers.get("HX-Request") == "true":
        _, _, rest = current.partition("://")
        path = "/" + rest.partition("/")[2]
        return path if is_safe_next(path) else UI_PREFIX
    if request.method != "GET":
        return UI_PREFIX
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{request.url.path}{query}"


def is_safe_next(path: str) -> bool:
    """Whether ``path`` may be where the sign-in goes next: a UI page of this gateway (no other host)."""
    return (path == UI_PREFIX or path.startswith(f"{UI_PREFIX}/") or path.startswith(f"{UI_PREFIX}?")) and not any(
        c in path for c in ("\\", "\r", "\n", "//")
    )


def _detail(response: Response) -> str:
    try:
        body = json.loads(bytes(response.body))
    except ValueError:
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return detail if isinstance(detail, str) else json.dumps(detail) if detail is not None else ""
