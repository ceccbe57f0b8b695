"""Signing in to the web UI: the session key file, the session and CSRF cookies, and the pages' access check.

A browser signs in at ``/ui/login`` with a token (:mod:`gateway.ui.login`); the gateway answers with two cookies:

- ``gw_session`` (HttpOnly, SameSite=Strict, Path=/, Secure over https): the token entry's name, a fingerprint of
  its hash and an expiry (``ui.session_hours``), signed with the data folder's session key
  (:class:`~gateway.api.auth.SessionSigner`). It holds no token. It ends when it expires, at sign-out, when the
  token is reset or removed, and for every session at once when ``ui-session.key`` is deleted (and the gateway
  restarted).
- ``gw_csrf`` (HttpOnly, SameSite=Strict, Path=/): a random token that every page also carries; htmx sends it back
  as the ``X-CSRF-Token`` header of every request (``hx-headers`` on ``<body>``), and a change is accepted only when
  the two match (:func:`gateway.api.auth.presents_change_credentials`).

Pages need the ``read`` scope, their buttons ``write``, model changes ``admin`` (:func:`require_ui`); a bearer
token in an ``Authorization`` header counts as well (scripts and tests), and so does an anonymous loopback reader
while ``http.anonymous_read`` allows it.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.api.auth import CSRF_COOKIE, SESSION_COOKIE, Authenticator, entry_scopes
from gateway.config import Scope, TokenSettings
from gateway.errors import ConfigError
from gateway.store.files import create_secret_file, keep_private

log = logging.getLogger(__name__)

SESSION_KEY_FILE = "ui-session.key"
_KEY_BYTES = 32

_bearer = HTTPBearer(auto_error=False)


class SessionKeyFile:
    """The data folder's secret key for session cookies: made on first use (mode 0600), then read once.

    Parameters
    ----------
    data_dir
        The data folder.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / SESSION_KEY_FILE
        self._lock = threading.Lock()
        self._key: bytes | None = None

    def key(self) -> bytes:
        """The key; made if the folder has none.

        Raises
        ------
        gateway.errors.ConfigError
            If the file exists but does not hold a key.
        """
        with self._lock:
            if self._key is None:
                self._key = self._read() or self._make()
            return self._key

    def _read(self) -> bytes | None:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the UI session key {self.path}: {exc}") from exc
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) < _KEY_BYTES:
            raise ConfigError(f"{self.path} does not hold a session key: delete it, and a new one is made")
        if keep_private(self.path):
            log.warning("%s was readable by others: made readable by its owner only", self.path.name)
        return key

    def _make(self) -> bytes:
        """Write a new key durably, readable by the owner only; if another process made one meanwhile, use that."""
        if create_secret_file(self.path, secrets.token_hex(_KEY_BYTES) + "\n"):
            log.info("made the web UI's session key %s", self.path.name)
        key = self._read()
        assert key is not None  # just written or found
        return key


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page: the token entry's name (``None`` for an anonymous loopback reader) and scopes."""

    name: str | None
    scopes: frozenset[str]

    @property
    def can_write(self) -> bool:
        """Whether the page's buttons (retry, re-run, cancel, reprocess, test) may be shown."""
        return "write" in self.scopes

    @property
    def can_admin(self) -> bool:
        """Whether model changes (upload, enable, disable) may be shown."""
        return "admin" in self.scopes


def viewer(request: Request) -> Viewer:
    """The request's viewer as :func:`require_ui` found it; for a route without that check (the sign-in form, an
    error page), the browser's session if it has a valid one."""
    if not hasattr(request.state, "token_name"):
        authenticator: Authenticator | None = getattr(request.app.state, "authenticator", None)
        entry = authenticator.session_entry(request) if authenticator is not None else None
        request.state.token_name = entry.name if entry is not None else None
        request.state.scopes = entry_scopes(entry) if entry is not None else frozenset()
    return Viewer(request.state.token_name, frozenset(request.state.scopes))


def require_ui(scope: Scope) -> Callable[..., Viewer]:
    """A FastAPI dependency for a UI route: the viewer, if a bearer token or the session grants ``scope``.

    A missing or expired session is 401 (the UI's error handler shows the sign-in form), a lacking scope 403 (a
    read token is told that it may not write, as on the API, also where ``admin`` is needed).
    """
    needed: tuple[Scope, ...] = ("write", "admin") if scope == "admin" else (scope,)

    def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Viewer:
        authenticator: Authenticator = request.app.state.authenticator
        token = credentials.credentials if credentials is not None else None
        for each in needed:
            entry = authenticator.authorise(request, each, token)
        if entry is None:  # an anonymous loopback reader
            return Viewer(None, frozenset({"read"}))
        return viewer(request)

    return check


#: The viewer of a page (``read``), of a button (``write``), of a model change (``admin``), for route signatures.
Reader = Annotated[Viewer, Depends(require_ui("read"))]
Writer = Annotated[Viewer, Depends(require_ui("write"))]
Admin = Annotated[Viewer, Depends(require_ui("admin"))]


# --- cookies ------------------------------------------------------------------------------------------------------

_CSRF_LENGTH = 43  # secrets.token_urlsafe(32)


def csrf_token(request: Request) -> str:
    """The page's CSRF token: the browser's ``gw_csrf`` cookie if it has a good one, else a new one that
    :func:`set_csrf_cookie` sends (kept in ``request.state`` so that one response uses one token)."""
    token = getattr(request.state, "csrf_token", None)
    if isinstance(token, str):
        return token
    sent = request.cookies.get(CSRF_COOKIE, "")
    token = sent if len(sent) == _CSRF_LENGTH and sent.replace("-", "").replace("_", "").isalnum() else None
    if token is None:
        token = secrets.token_urlsafe(32)
        request.state.csrf_new = True
    request.state.csrf_token = token
    return token


def new_csrf_token(request: Request) -> str:
    """Replace the page's CSRF token (at sign-in and sign-out)."""
    request.state.csrf_token = secrets.token_urlsafe(32)
    request.state.csrf_new = True
    return str(request.state.csrf_token)


def set_csrf_cookie(request: Request, response: Response) -> None:
    """Send the ``gw_csrf`` cookie if :func:`csrf_token` made a new token for this request."""
    if getattr(request.state, "csrf_new", False):
        _set(request, response, CSRF_COOKIE, str(request.state.csrf_token), max_age=None)


def sign_in(request: Request, response: Response, entry: TokenSettings, hours: float) -> None:
    """Give the browser a session of ``entry`` lasting ``hours``, and a new CSRF token."""
    authenticator: Authenticator = request.app.state.authenticator
    assert authenticator.sessions is not None  # the app made it
    value = authenticator.sessions.sign(entry, hours=hours)
    _set(request, response, SESSION_COOKIE, value, max_age=round(hours * 3600))
    new_csrf_token(request)
    set_csrf_cookie(request, response)


def sign_out(request: Request, response: Response) -> None:
    """End the browser's session (its cookie is deleted) and replace its CSRF token."""
    response.delete_cookie(SESSION_COOKIE, path="/", secure=_https(request), httponly=True, samesite="strict")
    new_csrf_token(request)
    set_csrf_cookie(request, response)


def _set(request: Request, response: Response, name: str, value: str, *, max_age: int | None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=_https(request), httponly=True, samesite="strict"
    )


def _https(request: Request) -> bool:
    return request.url.scheme == "https"
