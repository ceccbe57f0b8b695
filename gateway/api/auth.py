"""Bearer-token and browser-session authentication with scopes (``read``, ``write``, ``admin``), and the guard
against cross-site changes.

Tokens are kept as SHA-256 hashes: those configured under ``http.tokens`` (``gateway token`` makes one) and the data
folder's admin token (:mod:`gateway.admin_token`). Writing (STOW-RS) and administration always need a token, also
from loopback. Reading (QIDO-RS, WADO-RS, ``GET /api``) needs one too, except from a loopback client while
``http.anonymous_read`` allows it (by default: while ``http.tokens`` is empty; the data folder's token does not
count). A missing or unknown token gets 401, a token without the needed scope 403. Tokens are never logged, only
their names; refusals are logged with a rate limit (:class:`~gateway.api.refusals.RefusalLog`), and each is a User
Authentication failure in the audit trail (:func:`audit_of`, not rate limited).

A browser signs in once at ``/ui/login`` with a token (:mod:`gateway.ui.session`) and then sends the session cookie
(:data:`SESSION_COOKIE`) instead of the header. The cookie holds no token: it names the token's entry, a fingerprint
of the entry's hash and an expiry, signed with the data folder's session key (:class:`SessionSigner`). It counts only
while that entry still exists with the same hash: resetting or removing a token ends its sessions.

A web page the operator opens can make the browser send a "simple request" to the gateway without asking it first
(no CORS preflight): a ``POST`` of ``text/plain`` or a form. It cannot add an ``Authorization`` header to one, so
:class:`ChangesNeedAuthorization` refuses every state-changing request without that header before any route sees
it, including routes added later. A browser session's cookie *is* sent on cross-site requests (SameSite=Strict
keeps it off most, not all of them: another site on the same registrable domain is "same-site"), so it counts for a
change only together with the double-submitted CSRF token: an ``X-CSRF-Token`` header equal to the
:data:`CSRF_COOKIE` cookie, which a page of another origin can neither read nor send (a custom header needs a CORS
preflight, which the gateway never grants). :func:`presents_change_credentials` is the one place that says what
counts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admin_token import AdminTokenFile
from gateway.api.refusals import RefusalLog
from gateway.audit.trail import AuditTrail
from gateway.config import HttpSettings, TokenSettings, hash_token
from gateway.config import Scope as TokenScope

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False)

#: The browser session's cookie (:class:`SessionSigner`) and the double-submitted CSRF token's cookie and header.
SESSION_COOKIE = "gw_session"
CSRF_COOKIE = "gw_csrf"
CSRF_HEADER = "X-CSRF-Token"
#: Shortest CSRF token accepted (the UI makes 43-character ones).
_CSRF_MIN_LENGTH = 32

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
    return None if entry is None else entry_scopes(entry)


def anonymous_read_allowed(settings: HttpSettings) -> bool:
    """Whether ``settings`` let a loopback client read without a token (``http.anonymous_read``, by default: while no
    token is configured)."""
    return not settings.tokens if settings.anonymous_read is None else settings.anonymous_read


def presents_change_credentials(headers: Headers) -> bool:
    """Whether a state-changing request carries credentials that a cross-site page cannot make the browser send.

    That is an ``Authorization: Bearer`` header (a browser adds ``Authorization`` on its own only for the Basic and
    Digest schemes it has cached), or a CSRF token: an ``X-CSRF-Token`` header equal to the ``gw_csrf`` cookie (the
    double-submit pattern; the page the gateway rendered carries the token). Either way, who may do what is decided
    afterwards by the route (a bearer token or the session cookie, :meth:`Authenticator.authorise`); the sign-in form
    needs the CSRF token too, so that no other site can sign a browser in under its own token.
    """
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return True
    sent = headers.get(CSRF_HEADER, "")
    expected = cookie_parser(headers.get("cookie", "")).get(CSRF_COOKIE, "")
    return len(expected) >= _CSRF_MIN_LENGTH and hmac.compare_digest(sent.encode(), expected.encode())


def _match(entries: Sequence[TokenSettings], token: str | None) -> TokenSettings | None:
    if token is None:
        return None
    digest = hash_token(token)
    found = None
    for entry in entries:  # every entry is compared, in constant time, whichever matches
        if hmac.compare_digest(digest, entry.sha256) and found is None:
            found = entry
    return found


def entry_scopes(entry: TokenSettings) -> frozenset[TokenScope]:
    """The scopes a token entry grants, implied ones included (``admin`` grants ``write`` and ``read``)."""
    return frozenset(s for scope in entry.scopes for s in _IMPLIED[scope])


def audit_of(request: Request) -> AuditTrail:
    """The running gateway's audit trail (``app.state.gateway.audit``); a disabled one in an app without it."""
    return _audit_in(request.app)


def _audit_in(app: object) -> AuditTrail:
    trail = getattr(getattr(getattr(app, "state", None), "gateway", None), "audit", None)
    return trail if isinstance(trail, AuditTrail) else AuditTrail.disabled()


def caller_name(request: Request) -> str | None:
    """The name of the token (or signed-in session) that made the request, for records and the audit trail."""
    name = getattr(request.state, "token_name", None)
    return name if isinstance(name, str) else None


def client_host(request: Request) -> str | None:
    """The address the request came from (``None`` if unknown)."""
    return request.client.host if request.client is not None else None


def _is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@dataclass(frozen=True)
class SessionClaims:
    """What a session cookie says: the token entry's name, the fingerprint of its hash, and when it expires."""

    name: str
    fingerprint: str
    expires: float


class SessionSigner:
    """Makes and reads session cookies: ``base64url(JSON claims).base64url(HMAC-SHA256)`` under a secret key.

    Parameters
    ----------
    key
        Returns the secret key (the data folder's, :class:`gateway.ui.session.SessionKeyFile`); called when a cookie
        is first made or read, not at construction.
    """

    def __init__(self, key: Callable[[], bytes]) -> None:
        self._key = key

    def fingerprint(self, entry: TokenSettings) -> str:
        """A keyed fingerprint of the entry's token hash: it changes when the token is reset."""
        return hmac.new(self._key(), b"session-entry:" + entry.sha256.encode(), hashlib.sha256).hexdigest()[:32]

    def sign(self, entry: TokenSettings, *, hours: float, now: float | None = None) -> str:
        """A cookie value for a session of ``entry`` lasting ``hours``."""
        expires = (time.time() if now is None else now) + hours * 3600
        claims = {"n": entry.name, "f": self.fingerprint(entry), "e": round(expires)}
        payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        return f"{payload}.{_b64(self._mac(payload))}"

    def read(self, value: str | None, *, now: float | None = None) -> SessionClaims | None:
        """The claims of a cookie value; ``None`` if it is missing, forged, malformed or expired."""
        payload, _, mac = (value or "").partition(".")
        if not payload or not mac:
            return None
        try:
            if not hmac.compare_digest(_unb64(mac), self._mac(payload)):
                return None
            claims = json.loads(_unb64(payload))
            found = SessionClaims(str(claims["n"]), str(claims["f"]), float(claims["e"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        return found if found.expires > (time.time() if now is None else now) else None

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key(), b"session:" + payload.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode("ascii") + b"=" * (-len(text) % 4))


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
    sessions
        Reads browser sessions' cookies; ``None``: only bearer tokens count.
    """

    def __init__(
        self,
        settings: HttpSettings,
        admin_token: AdminTokenFile,
        refusals: RefusalLog,
        sessions: SessionSigner | None = None,
    ) -> None:
        self.settings = settings
        self.admin_token = admin_token
        self.refusals = refusals
        self.sessions = sessions
        self.anonymous_read = anonymous_read_allowed(settings)

    def entries(self) -> list[TokenSettings]:
        """Every token entry now valid: the configured ones and the data folder's."""
        from_file = self.admin_token.entry()
        return [*self.settings.tokens, *([] if from_file is None else [from_file])]

    def entry_for(self, token: str | None) -> TokenSettings | None:
        """The token entry ``token`` matches: a configured one or the data folder's; ``None`` if none."""
        return _match(self.entries(), token)

    def session_entry(self, request: Request) -> TokenSettings | None:
        """The token entry of the request's session cookie, while it is valid and the entry unchanged."""
        if self.sessions is None or SESSION_COOKIE not in request.cookies:
            return None
        claims = self.sessions.read(request.cookies[SESSION_COOKIE])
        if claims is None:
            return None
        found = None
        for entry in self.entries():  # the fingerprint changes when the entry's token is reset
            same = hmac.compare_digest(self.sessions.fingerprint(entry), claims.fingerprint)
            if same and entry.name == claims.name and found is None:
                found = entry
        return found

    def authorise(self, request: Request, scope: TokenScope, token: str | None) -> TokenSettings | None:
        """Return the request's token entry if it may go on (``None``: an anonymous read); raise 401 or 403 otherwise.

        Without a bearer ``token`` the session cookie counts. The entry's name and scopes are kept in
        ``request.state`` (``token_name``, ``scopes``) for what the route records and shows.

        Raises
        ------
        fastapi.HTTPException
            401 for a missing or unknown token (or session), 403 for a token without ``scope``.
        """
        route = f"{request.method} {request.url.path}"
        entry = self.entry_for(token) if token is not None else self.session_entry(request)
        # Who it is, for what the gateway records (never the token) and what a page shows, also when refused.
        request.state.token_name = None if entry is None else entry.name
        request.state.scopes = frozenset() if entry is None else entry_scopes(entry)
        if entry is None and token is None and scope == "read" and self.anonymous_read and self._from_loopback(request):
            log.debug("%s allowed without a token from loopback (http.anonymous_read)", route)
            return None
        if entry is None:
            self.refusals.refused("refused %s: missing or unknown bearer token", route)
            audit_of(request).authentication_failed(None, client_host(request))
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scope not in entry_scopes(entry):
            self.refusals.refused("refused %s: token %r lacks the '%s' scope", route, entry.name, scope)
            audit_of(request).authentication_failed(entry.name, client_host(request))
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"token lacks the '{scope}' scope")
        log.debug("%s authorised for token %r", route, entry.name)
        return entry

    @staticmethod
    def _from_loopback(request: Request) -> bool:
        return request.client is not None and _is_loopback(request.client.host)


def require_scope(scope: TokenScope) -> Callable[..., None]:
    """A FastAPI dependency that lets a request through only with a token (or a signed-in session) granting
    ``scope`` (or, for ``read``, an anonymous loopback client where ``http.anonymous_read`` allows it)."""

    def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        authenticator: Authenticator = request.app.state.authenticator
        authenticator.authorise(request, scope, credentials.credentials if credentials is not None else None)

    return check


class ChangesNeedAuthorization:
    """ASGI middleware: a request with a method other than GET, HEAD or OPTIONS and without credentials that a
    cross-site page cannot forge (:func:`presents_change_credentials`: a bearer token, or a page's CSRF token) gets
    401 before any route sees it.

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
        self.refusals.refused(
            "refused %s %s: a change without an Authorization header or CSRF token", scope["method"], scope["path"]
        )
        client = scope.get("client")
        _audit_in(scope.get("app")).authentication_failed(None, str(client[0]) if client else None)
        response = JSONResponse(
            {
                "detail": "a request that changes something needs an 'Authorization: Bearer <token>' header "
                "(or, from the web UI, its page's CSRF token: reload the page)"
            },
            status_code=status.HTTP_401_UNAUTHORIZED,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
