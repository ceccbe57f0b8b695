"""The data folder's admin token: made on first start when no configured token can administer the gateway.

Writing (STOW-RS) and administration always need a bearer token, also from loopback. So that a fresh gateway can be
used at all, :func:`ensure_admin_token` gives its data folder an admin token on the first start: the token is
returned once (``gateway serve`` prints it), and only its SHA-256 is kept, in ``<data_dir>/admin-token.json`` (mode
0600; it holds the same entry as one of ``http.tokens``). A data folder whose configuration has its own admin token
gets none. The file's token stays valid while the file exists: delete the file to revoke it, or
:func:`reset_admin_token` (``gateway token --reset-admin``) to replace it; the running server sees either at the next
request (:class:`AdminTokenFile`).

This module needs nothing but the settings, so that :mod:`gateway.runtime` and the CLI can use it without the web
framework.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from pathlib import Path

from pydantic import ValidationError

from gateway.config import Settings, TokenSettings, hash_token
from gateway.errors import ConfigError

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin-token.json"  # noqa: S105  (a file name, not a secret)
ADMIN_TOKEN_NAME = "admin (data folder)"  # noqa: S105  (a label)
_SECRET_MODE = 0o600


def admin_token_path(data_dir: Path) -> Path:
    """Where a data folder keeps its admin token's hash."""
    return data_dir / ADMIN_TOKEN_FILE


def ensure_admin_token(settings: Settings) -> str | None:
    """Give the data folder an admin token unless it has one or a configured token has the ``admin`` scope.

    Returns
    -------
    str or None
        The new token, the only time it is ever available; ``None`` when none was made.

    Raises
    ------
    gateway.errors.ConfigError
        If the data folder's token file exists but is not a valid entry.
    """
    path = admin_token_path(settings.store.data_dir)
    if path.exists():
        read_admin_token(path)  # a damaged file is said at start, not at the first request
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others: made readable by its owner only", path.name)
            path.chmod(_SECRET_MODE)
        return None
    if any("admin" in entry.scopes for entry in settings.http.tokens):
        return None
    token, part = _stage(path)
    try:
        os.link(part, path)  # never replaces: if another process made one meanwhile, theirs stands
    except FileExistsError:
        return None
    finally:
        part.unlink()
    log.info("made an admin token for the data folder; its hash is in %s", path.name)
    return token


def reset_admin_token(data_dir: Path) -> str:
    """Replace the data folder's admin token by a new one (the old one stops working) and return the new one."""
    path = admin_token_path(data_dir)
    token, part = _stage(path)
    part.replace(path)
    log.info("made a new admin token for the data folder; its hash is in %s", path.name)
    return token


def read_admin_token(path: Path) -> TokenSettings | None:
    """The entry in a data folder's token file; ``None`` when there is no file.

    Raises
    ------
    gateway.errors.ConfigError
        If the file cannot be read or is not a valid token entry.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return TokenSettings.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(
            f"{path} is not a valid token entry: delete it, or make a new one with `gateway token --reset-admin`"
        ) from exc


def _stage(path: Path) -> tuple[str, Path]:
    """Make a token and write its entry, durably and readable by the owner only, beside ``path``; return both."""
    token = secrets.token_urlsafe(32)
    entry = TokenSettings(name=ADMIN_TOKEN_NAME, sha256=hash_token(token), scopes=["admin"])
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _SECRET_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(entry.model_dump(), out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return token, part


class AdminTokenFile:
    """The data folder's admin token as the server checks it, read again whenever the file changes.

    Parameters
    ----------
    data_dir
        The data folder.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = admin_token_path(data_dir)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._entry: TokenSettings | None = None

    def entry(self) -> TokenSettings | None:
        """The current entry; ``None`` while there is no file (or it is damaged: that is logged once)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if seen != self._seen:
                self._seen, self._entry = seen, self._read()
            return self._entry

    def _read(self) -> TokenSettings | None:
        try:
            return read_admin_token(self.path)
        except ConfigError as exc:
            log.error("the data folder's admin token is not accepted: %s", exc)
            return None
