"""Sign-in and sign-out: ``GET``/``POST /ui/login`` and ``POST /ui/logout``.

The sign-in form is sent by htmx, so it carries the page's CSRF token like every other form (a page of another site
cannot sign a browser in under its own token). A good token gets the session cookie (:func:`gateway.ui.session.sign_in`)
and the browser is sent on to the page it came for; a bad one the form again, with 401.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from gateway.api.auth import Authenticator
from gateway.config import Settings
from gateway.ui.errors import UI_PREFIX, is_safe_next
from gateway.ui.session import sign_in, sign_out
from gateway.ui.templating import render

log = logging.getLogger(__name__)

router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)


@router.get("/login")
def login_page(request: Request, next: str = UI_PREFIX) -> Response:
    """The sign-in form."""
    return render(request, "login.html", {"next": _next(next), "message": None, "title": "Sign in"})


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the token of the form; on success, the session cookie and on to ``next``."""
    form = await request.form(max_files=0, max_fields=4, max_part_size=4096)
    token = str(form.get("token") or "").strip()
    target = _next(str(form.get("next") or UI_PREFIX))
    authenticator: Authenticator = request.app.state.authenticator
    entry = authenticator.entry_for(token) if token else None
    if entry is None:
        authenticator.refusals.refused("refused sign-in to the web UI: unknown token")
        context = {"next": target, "message": "That token is not known to this gateway.", "title": "Sign in"}
        return render(request, "login.html", context, status_code=401)
    settings: Settings = request.app.state.settings
    response = _go(request, target)
    sign_in(request, response, entry, settings.ui.session_hours)
    log.info("web UI: signed in with token %r", entry.name)
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """End the session; back to the sign-in form."""
    response = _go(request, f"{UI_PREFIX}/login")
    sign_out(request, response)
    return response


def _go(request: Request, target: str) -> Response:
    """Send the browser to ``target``: htmx follows ``HX-Redirect``, a plain form a 303."""
    if request.headers.get("HX-Request") == "true":
        return Response(status_code=200, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def _next(value: str) -> str:
    return value if is_safe_next(value) else UI_PREFIX
