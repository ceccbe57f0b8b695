"""Durable files: stage in the store's temporary folder, fdatasync, link into place, fsync the folder.

Paths never come from received text: an instance lives at
``instances/<2 hex>/<sha256 of its Series Instance UID>/<sha256 of its SOP Instance UID>.dcm``, so no UID, however
crafted, can name a path outside the store. The instances of one series share a folder, so one folder fsync
covers a whole batch of them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

from gateway.errors import OutOfResources

_COPY_CHUNK = 1 << 20


def _digest(uid: str) -> str:
    return hashlib.sha256(uid.encode("ascii")).hexdigest()


def instance_relpath(series_instance_uid: str, sop_instance_uid: str) -> str:
    """Return the store-relative path of an instance, derived only from hashes of its UIDs."""
    series = _digest(series_instance_uid)
    return f"instances/{series[:2]}/{series}/{_digest(sop_instance_uid)}.dcm"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file inside it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(path: Path) -> None:
    """Create ``path`` and missing parents, fsyncing each new folder's parent so the entry survives a crash."""
    if path.is_dir():
        return
    make_dirs_durably(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
        fsync_dir(path.parent)


#: Tells this process's temporary files from those of an earlier process with the same pid (a container's pid 1).
_TOKEN = uuid.uuid4().hex[:8]
#: A partial file of another host's process (or of an older gateway) untouched this long is abandoned.
ABANDONED_AFTER_S = 3600.0


def host_name() -> str:
    """This host's name as process names carry it (temporary files here, job leases and delivery claims)."""
    return socket.gethostname()[:40]


def pid_running(pid: int) -> bool:
    """Whether a process with ``pid`` runs on this host (one of another user counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_prefix() -> str:
    """The name prefix of this process's temporary files: ``<pid>-<token>-<host>-`` (several processes may share
    the folder; :func:`clear_directory` removes only what a gone process left)."""
    return f"{os.getpid()}-{_TOKEN}-{host_name()}-"


def new_temp_path(tmp_dir: Path, suffix: str = ".part") -> Path:
    """Create an empty, uniquely named file in ``tmp_dir`` (named by :func:`temp_prefix`) and return its path."""
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=temp_prefix(), suffix=suffix)
    os.close(fd)
    return Path(name)


def _abandoned(entry: Path, now: float, stale_after_s: float) -> bool:
    """Whether a temporary file was left by a process that is gone: one of this host whose pid is not running (or
    this process's pid, from an earlier life), or, for another host's or an unprefixed file, one untouched for
    ``stale_after_s``."""
    pid, token, rest = [*entry.name.split("-", 2), "", ""][:3]
    if pid.isdigit() and rest.startswith(f"{host_name()}-"):
        if int(pid) == os.getpid():
            return token != _TOKEN
        return not pid_running(int(pid))
    try:
        return entry.stat().st_mtime < now - stale_after_s
    except FileNotFoundError:
        return False


def stage(src: Path, tmp_dir: Path) -> Path:
    """Bring ``src`` into ``tmp_dir`` (rename, or copy across file systems) and flush its bytes to disk.

    Raises
    ------
    OutOfResources
        The disk filled up while copying; nothing is left behind.
    """
    staged = src if src.parent == tmp_dir else _move_into(src, tmp_dir)
    try:
        fd = os.open(staged, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def link_into_place(staged: Path, dest: Path) -> bool:
    """Give the staged file its final name unless ``dest`` exists; ``False`` if it did (``staged`` is kept).

    The caller fsyncs ``dest.parent`` (see :func:`fsync_dir`) before relying on the new name.
    """
    make_dirs_durably(dest.parent)
    try:
        os.link(staged, dest)
    except FileExistsError:
        return False
    staged.unlink()
    return True


def replace_into_place(staged: Path, dest: Path) -> None:
    """Give the staged file its final name, replacing what is there (an orphan left by a crash)."""
    make_dirs_durably(dest.parent)
    staged.replace(dest)


def _move_into(src: Path, tmp_dir: Path) -> Path:
    staged = new_temp_path(tmp_dir)
    try:
        src.replace(staged)
        return staged
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            staged.unlink(missing_ok=True)
            raise
    try:
        with src.open("rb") as fin, staged.open("wb") as fout:
            shutil.copyfileobj(fin, fout, _COPY_CHUNK)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise OutOfResources("disk full while storing") from exc
        raise
    with contextlib.suppress(OSError):
        src.unlink()
    return staged


def clear_directory(path: Path, *, stale_after_s: float = ABANDONED_AFTER_S, now: float | None = None) -> int:
    """Remove the partial files in ``path`` that a gone process left (a crash); return how many.

    Several gateway processes may share the folder: a file of a live process (this host's, by its pid) is left
    alone; another host's is removed once untouched for ``stale_after_s``.
    """
    now = time.time() if now is None else now
    removed = 0
    for entry in path.iterdir():
        if entry.is_file() and _abandoned(entry, now, stale_after_s):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


#: Secrets in the data folder (a session key, a pseudonym key) are readable by the gateway's account only.
SECRET_MODE = 0o600


def create_secret_file(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` durably and readable by its owner only, unless ``path`` exists: whether this
    call made it. A file another process made meanwhile stands (it is linked into place, never replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.link(part, path)
        return True
    except FileExistsError:
        return False
    finally:
        part.unlink(missing_ok=True)


def keep_private(path: Path) -> bool:
    """Make ``path`` readable by its owner only if it was readable by others; whether it had to be."""
    if not path.stat().st_mode & 0o077:
        return False
    path.chmod(SECRET_MODE)
    return True
