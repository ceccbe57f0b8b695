"""Durable files: write to a temporary file, fsync, rename atomically, fsync the directory.

Paths never come from received text: an instance lives at ``instances/ab/cd/<sha256 of its SOP Instance
UID>.dcm``, so no UID, however crafted, can name a path outside the store.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from gateway.errors import OutOfResources

_COPY_CHUNK = 1 << 20


def instance_relpath(sop_instance_uid: str) -> str:
    """Return the store-relative path of an instance, derived only from a hash of its UID."""
    digest = hashlib.sha256(sop_instance_uid.encode("ascii")).hexdigest()
    return f"instances/{digest[:2]}/{digest[2:4]}/{digest}.dcm"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file inside it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_temp_path(tmp_dir: Path, suffix: str = ".part") -> Path:
    """Create an empty, uniquely named file in ``tmp_dir`` and return its path."""
    fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=suffix)
    os.close(fd)
    return Path(name)


def place_durably(src: Path, dest: Path, *, tmp_dir: Path) -> None:
    """Make ``dest`` hold exactly the bytes of ``src``, durably, and remove ``src``.

    ``src`` is renamed when it lives on the store's file system, copied otherwise. Either way the bytes are
    fsynced before the atomic rename to ``dest`` and the directory is fsynced after it, so a crash leaves
    either no ``dest`` or a complete one.

    Raises
    ------
    OutOfResources
        The disk filled up while copying; nothing is left behind.
    """
    staged = _stage(src, tmp_dir)
    try:
        _fsync_file(staged)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(dest)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def _stage(src: Path, tmp_dir: Path) -> Path:
    """Bring ``src`` into ``tmp_dir`` (rename, or copy across file systems) and return the staged path."""
    if src.parent == tmp_dir:
        return src
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear_directory(path: Path) -> int:
    """Remove every file in ``path`` (left-over partial files after a crash); return how many."""
    removed = 0
    for entry in path.iterdir():
        if entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed
