"""The destinations page, ``GET /ui/destinations``: where results go, whether each answers, and its queue.

Each configured destination with its address (never a secret: a STOW-RS bearer token is shown only as "set", a
URL without its user information), the kinds of result it gets, its last reachability check (C-ECHO, or an HTTP
request for STOW-RS) and its deliveries by state. ``POST /ui/destinations/{name}/check`` (``write``) checks it
now; a destination that answers gets its given-up deliveries back in the queue
(:meth:`gateway.export.workers.ExportWorkers.check_now`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from gateway.config import DimseDestination, ExportSettings, StowDestination
from gateway.export.checks import DestinationCheck
from gateway.export.queue import depth
from gateway.runtime import Gateway
from gateway.ui.errors import UI_PREFIX
from gateway.ui.session import Reader, Writer
from gateway.ui.templating import render

log = logging.getLogger(__name__)

router = APIRouter(prefix=f"{UI_PREFIX}/destinations", include_in_schema=False)


@dataclass(frozen=True)
class DestinationRow:
    """One configured destination as the pages show it."""

    name: str
    protocol: str  # "DIMSE" or "STOW-RS"
    address: str
    tls: bool
    sends: tuple[str, ...]
    default: bool
    return_to: tuple[str, ...]  # calling AE titles whose results go here
    check: DestinationCheck | None
    queue: dict[str, int]


def _address(settings: DimseDestination | StowDestination) -> tuple[str, str]:
    if isinstance(settings, DimseDestination):
        return "DIMSE", f"{settings.ae_title} @ {settings.host}:{settings.port}"
    url = urlsplit(str(settings.stow_url))
    host = url.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if url.port is not None:
        netloc += f":{url.port}"
    token = " (bearer token set)" if getattr(settings, "token", None) is not None else ""
    return "STOW-RS", urlunsplit((url.scheme, netloc, url.path, "", "")) + token


def destination_rows(gateway: Gateway) -> list[DestinationRow]:
    """Every configured destination, with its last check and its deliveries by state."""
    settings: ExportSettings = gateway.settings.export
    checks = gateway.export.last_checks()
    queues = depth(gateway.store)
    rows = []
    for name, destination in sorted(settings.destinations.items()):
        protocol, address = _address(destination)
        rows.append(
            DestinationRow(
                name=name,
                protocol=protocol,
                address=address,
                tls=destination.tls is not None,
                sends=tuple(destination.send),
                default=name in settings.default,
                return_to=tuple(sorted(ae for ae, to in settings.return_to_sender.items() if to == name)),
                check=checks.get(name),
                queue=queues.get(name, {}),
            )
        )
    return rows


def _page(request: Request, notice: tuple[str, str] | None = None, status_code: int = 200) -> HTMLResponse:
    gateway: Gateway = request.app.state.gateway
    context = {
        "destinations": destination_rows(gateway),
        "unmapped": gateway.settings.export.unmapped,
        "notice": notice,
        "active": "destinations",
        "title": "Destinations",
    }
    return render(request, "destinations.html", context, status_code=status_code)


@router.get("")
def destinations_page(request: Request, _: Reader) -> HTMLResponse:
    """The destinations."""
    return _page(request)


@router.post("/{name}/check")
async def check(request: Request, name: str, _: Writer) -> HTMLResponse:
    """Check a destination now; the page again, with the outcome."""
    gateway: Gateway = request.app.state.gateway
    found = await run_in_threadpool(gateway.export.check_now, name)  # NotFound: 404
    if found.ok:
        notice = ("ok", f"{name} answered in {found.seconds:.2f} s: {found.detail}")
    else:
        notice = ("bad", f"{name} did not answer: {found.detail}")
    return _page(request, notice)
