"""Bearer-token authentication with scopes (``read``, ``write``, ``admin``).

Tokens are configured as SHA-256 hashes (``gateway token`` makes one). With no token configured the server
only runs on loopback (the settings refuse anything else) and every request is allowed. A missing or unknown
token gets 401, a token without the needed scope 403. Tokens are never logged: only the token's configured
name is.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.config import HttpSettings, Scope, TokenSettings, hash_token

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False)

#: Scopes implied by each scope: admin can do everything, write can also read.
_IMPLIED: dict[Scope, frozenset[Scope]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"read", "write"}),
    "admin": frozenset({"read", "write", "admin"}),
}


def granted_scopes(settings: HttpSettings, token: str | None) -> frozenset[Scope] | None:
    """Return the scopes a token grants, or ``None`` if it matches no configured token."""
    entry = _configured(settings, token)
    return None if entry is None else _scopes(entry)


def _configured(settings: HttpSettings, token: str | None) -> TokenSettings | None:
    if token is None:
        return None
    digest = hash_token(token)
    for entry in settings.tokens:
        if hmac.compare_digest(digest, entry.sha256):
            return entry
    return None


def _scopes(entry: TokenSettings) -> frozenset[Scope]:
    return frozenset(s for scope in entry.scopes for s in _IMPLIED[scope])


def require_scope(scope: Scope) -> Callable[..., None]:
    """A FastAPI dependency that lets a request through only with a token granting ``scope``."""

    def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        settings: HttpSettings = request.app.state.settings.http
        if not settings.tokens:
            return
        entry = _configured(settings, credentials.credentials if credentials is not None else None)
        route = f"{request.method} {request.url.path}"
        if entry is None:
            log.info("refused %s: missing or unknown bearer token", route)
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scope not in _scopes(entry):
            log.info("refused %s: token %r lacks the '%s' scope", route, entry.name, scope)
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"token lacks the '{scope}' scope")
        log.debug("%s authorised for token %r", route, entry.name)

    return check
