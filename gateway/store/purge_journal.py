"""The purge journal: the files retention took out of the index, kept on disk until they are gone.

A purge (:mod:`gateway.store.retention`) writes its journal, a JSON file in ``<data_dir>/purge/``, and fsyncs it
inside the index transaction that deletes the rows, before the commit; it removes the files after the commit, then
the journal. A crash in between leaves the journal, and the next purge finishes it. The journal's file is locked
(``flock``) while its purge runs, so that another process finishing journals (``gateway purge`` beside
``gateway serve``) leaves a live one alone; the lock dies with its process.

Nothing a journal lists is removed blindly, since it may outlive its transaction (the commit failed, or the files
were stored again since): the caller drops the entries the index holds again, and an instance file is removed
only while it is still the very file that was journaled (same inode and modification time). Removing a file twice
is harmless.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from gateway.store.files import fsync_dir

log = logging.getLogger(__name__)

_PREFIX, _SUFFIX, _NEW = "journal-", ".json", ".new-"
_NEW_GRACE_S = 60.0  # a journal file not yet named after this long was left by a purge that died creating it


@dataclass(frozen=True)
class InstanceEntry:
    """A received instance's file: data-folder-relative path, SOP Instance UID and the file's identity when
    journaled (``(inode, mtime_ns)``; ``None`` if it was already missing)."""

    relpath: str
    sop_instance_uid: str
    identity: tuple[int, int] | None


@dataclass(frozen=True)
class FolderEntry:
    """A job's output folder (``outputs/job-<id>``, ``results/job-<id>``), data-folder-relative."""

    relpath: str
    job_id: int


def identity(path: Path) -> tuple[int, int] | None:
    """The ``(inode, mtime_ns)`` of ``path``, or ``None`` if there is no such file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class Journal:
    """One purge's journal file, locked while open. Create one with :meth:`create`, or take over one left by an
    interrupted purge with :func:`leftover_journals`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, folder: Path) -> Journal:
        """A new, empty, locked journal in ``folder``.

        It is locked under a temporary name, then renamed: another process never sees it unlocked.
        """
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{time.time_ns()}-{os.getpid()}-{os.urandom(4).hex()}"
        fresh = folder / f"{_NEW}{stem}"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = folder / f"{_PREFIX}{stem}{_SUFFIX}"
        fresh.rename(path)
        return cls(path, fd)

    def write(self, instances: Iterable[InstanceEntry], folders: Iterable[FolderEntry]) -> None:
        """Record the entries durably (the file and its folder entry are fsynced)."""
        body = {
            "instances": [[e.relpath, e.sop_instance_uid, *(e.identity or ())] for e in instances],
            "folders": [[e.relpath, e.job_id] for e in folders],
        }
        data = json.dumps(body, separators=(",", ":")).encode("ascii")
        os.ftruncate(self._fd, 0)
        written = 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], written)
        os.fsync(self._fd)
        fsync_dir(self.path.parent)

    def entries(self) -> tuple[list[InstanceEntry], list[FolderEntry]] | None:
        """What the journal lists; ``None`` if it is empty or torn (written by a purge that never committed)."""
        size = os.fstat(self._fd).st_size
        try:
            body: dict[str, Any] = json.loads(os.pread(self._fd, size, 0)) if size else {}
            instances = [
                InstanceEntry(str(e[0]), str(e[1]), (int(e[2]), int(e[3])) if len(e) == 4 else None)
                for e in body["instances"]
            ]
            folders = [FolderEntry(str(e[0]), int(e[1])) for e in body["folders"]]
        except (ValueError, KeyError, TypeError, IndexError):
            return None
        return instances, folders

    def discard(self) -> None:
        """Remove the journal (its files are gone) and release it."""
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fsync_dir(self.path.parent)
        self.release()

    def release(self) -> None:
        """Release the journal, keeping it for the next purge."""
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def leftover_journals(folder: Path) -> Iterator[Journal]:
    """The journals of interrupted purges in ``folder``, each locked in turn; live ones are skipped.

    Files of purges that died before naming their journal are removed. The caller releases or discards each.
    """
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.name.startswith(_NEW) and not _older_than(path, _NEW_GRACE_S):
            continue  # being created: locked and named in a moment
        journal = _try_lock(path)
        if journal is None:
            continue
        if path.name.startswith(_NEW):
            journal.discard()
        elif path.name.startswith(_PREFIX) and path.name.endswith(_SUFFIX):
            yield journal
        else:
            journal.release()


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return path.stat().st_mtime < time.time() - seconds
    except OSError:
        return False


def _try_lock(path: Path) -> Journal | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # removed meanwhile, or not a file
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a live purge holds it
        os.close(fd)
        return None
    if not path.exists():  # finished and removed between our open and our lock
        os.close(fd)
        return None
    return Journal(path, fd)


def remove_files(data_dir: Path, entries: Iterable[InstanceEntry]) -> bool:
    """Remove the instance files still identical to their journaled identity; whether nothing failed.

    Their folders are fsynced (or removed once empty, their parent fsynced), so the removals are durable before
    the caller drops the journal.
    """
    ok = True
    folders: set[Path] = set()
    for entry in entries:
        path = data_dir / entry.relpath
        folders.add(path.parent)
        if entry.identity is None or identity(path) != entry.identity:
            continue  # gone already, or a newer file stored under the same name since
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("purge could not remove an instance file (kept in the journal for the next run): %s", _why(exc))
            ok = False
    return _settle_folders(folders) and ok


def _settle_folders(folders: Iterable[Path]) -> bool:
    """Remove the emptied series folders, fsync the others and the parents of the removed ones."""
    ok = True
    parents: set[Path] = set()
    for folder in folders:
        try:
            folder.rmdir()
            parents.add(folder.parent)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                log.warning("purge could not remove a folder: %s", _why(exc))
            ok = _fsync(folder) and ok
    for parent in parents:
        ok = _fsync(parent) and ok
    return ok


def remove_folders(data_dir: Path, entries: Iterable[FolderEntry]) -> bool:
    """Remove the output folders and fsync their parents; whether nothing failed."""
    ok = True
    parents: set[Path] = set()
    for entry in entries:
        path = data_dir / entry.relpath
        if not path.is_dir():
            continue
        try:
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("purge could not remove job %d's outputs (kept in the journal): %s", entry.job_id, _why(exc))
            ok = False
        parents.add(path.parent)
    for parent in parents:
        ok = _fsync(parent) and ok
    return ok


def _fsync(folder: Path) -> bool:
    try:
        fsync_dir(folder)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("purge could not flush a folder: %s", _why(exc))
        return False
    return True


def _why(exc: OSError) -> str:
    """An OS error without its file name: paths under ``instances/`` name series by their UID."""
    return exc.strerror or type(exc).__name__
