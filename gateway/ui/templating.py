"""Rendering the UI's pages: the Jinja2 environment (autoescaped), its filters, and :func:`render`.

Every page extends ``templates/base.html``; :func:`render` adds what the base needs (the CSRF token, who is signed
in, what they may do) and the response headers every page gets: no caching, no framing by another site, and a
Content-Security-Policy that lets only the gateway's own scripts run (no inline script, no external host).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from gateway import __version__
from gateway.ui.session import csrf_token, set_csrf_cookie, viewer

TEMPLATES_DIR = Path(str(files("gateway.ui") / "templates"))

#: Headers of every page. Inline styles stay allowed (a bar's width); scripts come only from /ui/static.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


#: What a value that is not known shows.
UNKNOWN = "\N{EN DASH}"


def _number(value: object) -> float | None:
    """A template's value as a number; ``None`` for anything else (``None``, a key a job's detail lacks, ...)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def seconds(value: object) -> str:
    """A duration for people: ``"0.42 s"``, ``"12 s"``, ``"3 min 5 s"``, ``"2 h 10 min"``; an en dash when unknown."""
    value = _number(value)
    if value is None:
        return UNKNOWN
    if value < 10:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.0f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60)} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60)} min"


def when(value: object) -> str:
    """A time stamp (seconds since the epoch) in the server's local time, ``"2025-12-06 11:03:12"``."""
    value = _number(value)
    if value is None:
        return UNKNOWN
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def ago(value: object, now: float | None = None) -> str:
    """How long ago a time stamp was: ``"5 s ago"``, ``"3 min 5 s ago"``."""
    value = _number(value)
    if value is None:
        return UNKNOWN
    return f"{seconds(max(0.0, (time.time() if now is None else now) - value))} ago"


def size(value: object) -> str:
    """A number of bytes in binary units: ``"12.3 GiB"``."""
    amount = _number(value)
    if amount is None:
        return UNKNOWN
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every value is escaped unless a template says otherwise (none does)
        undefined=jinja2.ChainableUndefined,  # a job detail of an older run may lack a key: shown empty
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(seconds=seconds, when=when, ago=ago, size=size)
    return env


templates = Jinja2Templates(env=_environment())


def render(
    request: Request,
    name: str,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """Render the template ``name`` as a page.

    Adds to the context ``csrf_token``, ``who`` (the token entry's name, or ``None``), ``can_write``, ``can_admin``
    and ``version``; sends the ``gw_csrf`` cookie when the browser had none.

    Parameters
    ----------
    request
        The request (its ``state`` says who passed :func:`gateway.ui.session.require_ui`).
    name
        The template, relative to ``gateway/ui/templates``.
    context
        The template's values.
    status_code
        The response's status.
    headers
        Extra response headers (e.g. ``HX-Redirect``).
    """
    who = viewer(request)
    values = {
        "csrf_token": csrf_token(request),
        "who": who.name,
        "can_write": who.can_write,
        "can_admin": who.can_admin,
        "version": __version__,
        **(context or {}),
    }
    response = templates.TemplateResponse(
        request, name, values, status_code=status_code, headers={**PAGE_HEADERS, **(headers or {})}
    )
    set_csrf_cookie(request, response)
    return response
