"""Bearer-token authentication with scopes (``read``, ``write``, ``admin``), and the guard against cross-site changes.

Tokens are kept as SHA-256 hashes: those configured under ``http.tokens`` (``gateway token`` makes one) and the data
folder's admin token (:mod:`gateway.admin_token`). Writing (STOW-RS) and administration always need a token, also
from loopback. Reading (QIDO-RS, WADO-RS, ``GET /api``) needs one too, except from a loopback client while
``http.anonymous_read`` allows it (by default: while ``http.tokens`` is empty; the data folder's token does not
count). A missing or unknown token gets 401, a token without the needed scope 403. Tokens are never logged, only
their names; refusals are logged with a rate limit (:class:`~gateway.api.refusals.RefusalLog`).

A web page the operator opens can make the browser send a "simple request" to the gateway without asking it first
(no CORS preflight): a ``POST`` of ``text/plain`` or a form. It cannot add an ``Authorization`` header to one, so
:class:`ChangesNeedAuthorization` refuses every state-changing request without that header before any route sees
it, including routes added later. :func:`presents_change_credentials` is the one place that says what counts.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable, Sequence

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admin_token import AdminTokenFile
from gateway.api.refusals import RefusalLog
from gateway.config import HttpSettings, TokenSettings, hash_token
from gateway.config import Scope as TokenScope

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False)

#: Methods that change nothing (RFC 9110 9.2.1): the only ones a request without credentials may use.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: Scopes implied by each scope: admin can do everything, write can also read.
_IMPLIED: dict[TokenScope, frozenset[TokenScope]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"read", "write"}),
    "admin": frozenset({"read", "write", "admin"}),
}


def granted_scopes(
    settings: HttpSettings, token: str | None, extra: Sequence[TokenSettings] = ()
) -> frozenset[TokenScope] | None:
    """Return the scopes a token grants, or ``None`` if it matches no token of ``settings`` or ``extra``."""
    entry = _match([*settings.tokens, *extra], token)
    return None if entry is None else _scopes(entry)


def anonymous_read_allowed(settings: HttpSettings) -> bool:
    """Whether ``settings`` let a loopback client read without a token (``http.anonymous_read``, by default: while no
    token is configured)."""
    return not settings.tokens if settings.anonymous_read is None else settings.anonymous_read


def presents_change_credentials(headers: Headers) -> bool:
    """Whether a state-changing request carries credentials that a cross-site page cannot make the browser send.

    Today that is an ``Authorization: Bearer`` header (a browser adds ``Authorization`` on its own only for the
    Basic and Digest schemes it has cached). A browser session (a later issue) belongs here as well: its cookie is
    sent on cross-site requests too, so it must count only together with a CSRF token header that matches it.
    """
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def _match(entries: Sequence[TokenSettings], token: str | None) -> TokenSettings | None:
    if token is None:
        return None
    digest = hash_token(token)
    found = None
    for entry in entries:  # every entry is compared, in constant time, whichever matches
        if hmac.compare_digest(digest, entry.sha256) and found is None:
            found = entry
    return found


def _scopes(entry: TokenSettings) -> frozenset[TokenScope]:
    return frozenset(s for scope in entry.scopes for s in _IMPLIED[scope])


def _is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Authenticator:
    """Decides whether a request may use a route needing a scope; kept in the app's state.

    Parameters
    ----------
    settings
        The HTTP settings (configured tokens, ``anonymous_read``).
    admin_token
        The data folder's admin token.
    refusals
        Where refusals are logged (rate limited).
    """

    def __init__(self, settings: HttpSettings, admin_token: AdminTokenFile, refusals: RefusalLog) -> None:
        self.settings = settings
        self.admin_token = admin_token
        self.refusals = refusals
        self.anonymous_read = anonymous_read_allowed(settings)

    def entry_for(self, token: str | None) -> TokenSettings | None:
        """The token entry ``token`` matches: a configured one or the data folder's; ``None`` if none."""
        from_file = self.admin_token.entry()
        return _match([*self.settings.tokens, *([] if from_file is None else [from_file])], token)

    def authorise(self, request: Request, scope: TokenScope, token: str | None) -> None:
        """Return if the request may go on; raise 401 or 403 otherwise.

        Raises
        ------
        fastapi.HTTPException
            401 for a missing or unknown token, 403 for a token without ``scope``.
        """
        route = f"{request.method} {request.url.path}"
        if token is None and scope == "read" and self.anonymous_read and self._from_loopback(request):
            log.debug("%s allowed without a token from loopback (http.anonymous_read)", route)
            return
        entry = self.entry_for(token)
        if entry is None:
            self.refusals.refused("refused %s: missing or unknown bearer token", route)
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scope not in _scopes(entry):
            self.refusals.refused("refused %s: token %r lacks the '%s' scope", route, entry.name, scope)
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"token lacks the '{scope}' scope")
        request.state.token_name = entry.name  # who did it, for what the gateway records (never the token)
        log.debug("%s authorised for token %r", route, entry.name)

    @staticmethod
    def _from_loopback(request: Request) -> bool:
        return request.client is not None and _is_loopback(request.client.host)


def require_scope(scope: TokenScope) -> Callable[..., None]:
    """A FastAPI dependency that lets a request through only with a token granting ``scope`` (or, for ``read``, an
    anonymous loopback client where ``http.anonymous_read`` allows it)."""

    def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        authenticator: Authenticator = request.app.state.authenticator
        authenticator.authorise(request, scope, credentials.credentials if credentials is not None else None)

    return check


class ChangesNeedAuthorization:
    """ASGI middleware: a request with a method other than GET, HEAD or OPTIONS and without credentials that a
    cross-site page cannot forge (:func:`presents_change_credentials`) gets 401 before any route sees it.

    Parameters
    ----------
    app
        The application behind it.
    refusals
        Where refusals are logged (rate limited).
    """

    def __init__(self, app: ASGIApp, refusals: RefusalLog) -> None:
        self.app = app
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        if presents_change_credentials(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        self.refusals.refused("refused %s %s: a change without an Authorization header", scope["method"], scope["path"])
        response = JSONResponse(
            {"detail": "a request that changes something needs an 'Authorization: Bearer <token>' header"},
            status_code=status.HTTP_401_UNAUTHORIZED,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
