"""The ``Host`` check: a request must name this server by one of its allowed names (against DNS rebinding).

A web page the operator opens can point a name its author controls at 127.0.0.1 (DNS rebinding); the browser then
sends that page's requests to the gateway and lets the page read the answers, since to the browser they come from
the page's own origin. Those requests carry the page's name in ``Host``, so a gateway that answers only to its own
names cannot be read that way. The allowed names are ``localhost``, ``127.0.0.1`` and ``[::1]``, the address
``http.host`` binds to (unless it is a wildcard), and ``http.allowed_hosts`` (the names the PACS and users reach
the gateway by); any port is accepted with them. Anything else, a malformed or a missing ``Host`` included, is
answered 400 before any route runs, so it also never reaches a ``RetrieveURL``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.refusals import RefusalLog
from gateway.config import HttpSettings

log = logging.getLogger(__name__)

#: Names every gateway answers to.
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104  (recognised, not bound to)
_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?$")
_LONGEST_LOGGED = 80


def host_name(value: str) -> str | None:
    """The name in a ``Host`` header value (RFC 9110 7.2): without its port, lower case, an IPv6 literal in brackets
    and compressed; ``None`` if the value is malformed.

    Examples: ``"LocalHost:8080"`` -> ``"localhost"``, ``"[0:0::1]:80"`` -> ``"[::1]"``, ``"a b"`` -> ``None``.
    """
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, port = _ipv6_literal(value[1:end]), value[end + 1 :]
    else:
        bare = value.partition(":")[0]
        name, port = bare.rstrip("."), value[len(bare) :]
        if not _NAME.match(name):
            return None
    if port and not (port.startswith(":") and port[1:].isdigit() and len(port) <= 6):
        return None
    return name


def _ipv6_literal(text: str) -> str | None:
    try:
        return f"[{ipaddress.IPv6Address(text).compressed}]"
    except ValueError:
        return None


def allowed_name(entry: str) -> str:
    """The normalised form of one configured name (``gateway.example.org``, ``10.0.0.5``, ``fe80::1``, with or without
    a port).

    Raises
    ------
    ValueError
        If ``entry`` is not a host name or an IP address.
    """
    try:
        address = ipaddress.ip_address(entry.strip())
    except ValueError:
        name = host_name(entry)
    else:
        name = f"[{address.compressed}]" if address.version == 6 else address.compressed
    if name is None:
        raise ValueError(f"http.allowed_hosts: {entry!r} is not a host name or IP address")
    return name


def allowed_hosts(http: HttpSettings) -> frozenset[str]:
    """Every name the server answers to: the defaults, ``http.host`` unless it is a wildcard, ``http.allowed_hosts``.

    Raises
    ------
    ValueError
        If a configured name is malformed (the message names it).
    """
    names = set(DEFAULT_ALLOWED_HOSTS)
    if http.host not in _WILDCARD_BINDS:
        names.add(allowed_name(http.host))
    names.update(allowed_name(entry) for entry in http.allowed_hosts)
    return frozenset(names)


class HostCheck:
    """ASGI middleware: answer 400 to a request whose ``Host`` names none of ``allowed`` (see the module docstring).

    Parameters
    ----------
    app
        The application behind it.
    allowed
        Allowed names, normalised as :func:`host_name` returns them.
    refusals
        Where refused hosts are logged (rate limited).
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str], refusals: RefusalLog) -> None:
        self.app = app
        self.allowed = frozenset(allowed)
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host")
        if host is not None and host_name(host) in self.allowed:
            await self.app(scope, receive, send)
            return
        self.refusals.refused(
            "refused a request for Host %r: not localhost, 127.0.0.1, [::1] or in http.allowed_hosts",
            None if host is None else host[:_LONGEST_LOGGED],
        )
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        detail = "the Host header names no host this gateway answers to (see http.allowed_hosts)"
        await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
