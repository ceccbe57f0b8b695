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
import tempfile
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


def new_temp_path(tmp_dir: Path, suffix: str = ".part") -> Path:
    """Create an empty, uniquely named file in ``tmp_dir`` and return its path."""
    fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=suffix)
    os.close(fd)
    return Path(name)


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


def clear_directory(path: Path) -> int:
    """Remove every file in ``path`` (left-over partial files after a crash); return how many."""
    removed = 0
    for entry in path.iterdir():
        if entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed
