"""Safe extraction of model package archives (``.zip``, ``.tar.gz``, ``.tgz``).

An archive comes from an upload, so nothing in it is trusted: every member name is checked (no absolute path, no
``..``, no backslash, no drive letter), links, devices and other special members are refused, and the bytes written
are counted against the limit as they are written (a declared size is never believed). Members are written one by
one with exclusive creation into a fresh folder; ``extractall`` is never used.
"""

from __future__ import annotations

import gzip
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from gateway.errors import ModelError
from gateway.registry.bundle_manifest import BUNDLE_METADATA
from gateway.registry.manifest import MANIFEST_NAME

__all__ = ["ARCHIVE_SUFFIXES", "extract_archive", "is_archive", "package_root", "remove_tree"]

#: The archive kinds a model package may come in.
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")

#: The most members an archive may hold (a package is a manifest, weights and perhaps a bundle's few files).
MAX_MEMBERS = 10_000

_CHUNK = 1 << 20
_IGNORED = ("__MACOSX",)  # resource forks macOS's archiver adds; never part of a package


#: The first bytes of each kind of package archive, and the suffix it is staged under.
_MAGIC = {b"PK\x03\x04": ".zip", b"PK\x05\x06": ".zip", b"\x1f\x8b": ".tar.gz"}


def archive_suffix(head: bytes) -> str | None:
    """The suffix (``.zip`` or ``.tar.gz``) of an archive whose first four bytes are ``head``; ``None`` if neither."""
    return next((suffix for magic, suffix in _MAGIC.items() if head.startswith(magic)), None)


def is_archive(path: Path) -> bool:
    """Whether ``path`` names an archive kind this module extracts (by its suffix)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _member_path(name: str) -> PurePosixPath | None:
    """The relative path a member is written to, ``None`` for one to skip; refuses unsafe names."""
    if "\\" in name or "\x00" in name:
        raise ModelError(f"archive member {name!r}: backslashes and NUL are not allowed in names")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise ModelError(f"archive member {name!r}: absolute paths are not allowed")
    if ".." in path.parts:
        raise ModelError(f"archive member {name!r}: '..' is not allowed")
    parts = [p for p in path.parts if p != "."]
    if not parts or parts[0] in _IGNORED:
        return None
    return PurePosixPath(*parts)


class _Budget:
    """Counts the bytes written against the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise ModelError(f"archive content exceeds the limit of {self.limit} bytes")


def _write(source: IO[bytes], target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("xb") as out:
        while chunk := source.read(_CHUNK):
            budget.take(len(chunk))
            out.write(chunk)


def _count(members: int) -> None:
    if members > MAX_MEMBERS:
        raise ModelError(f"archive holds more than {MAX_MEMBERS} members")


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _count(len(infos))
        for info in infos:
            relpath = _member_path(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix file type
            if relpath is None:
                continue
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ModelError(f"archive member {info.filename!r}: links and special files are not allowed")
            if info.is_dir():
                (dest / relpath).mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as source:
                _write(source, dest / relpath, budget)


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive, "r:gz") as tf:
        count = 0
        for member in tf:
            count += 1
            _count(count)
            relpath = _member_path(member.name)
            if relpath is None:
                continue
            if member.isdir():
                (dest / relpath).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise ModelError(f"archive member {member.name!r}: links and special files are not allowed")
            source = tf.extractfile(member)
            assert source is not None, "a regular member always has content"
            with source:
                _write(source, dest / relpath, budget)


@contextmanager
def _readable(archive: Path) -> Iterator[None]:
    """Turn the archive libraries' errors into a :class:`ModelError` naming the archive."""
    try:
        yield
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise ModelError(f"{archive.name}: a member is given twice, or is both a file and a folder") from exc
    except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError, ValueError) as exc:
        raise ModelError(f"{archive.name}: not a readable archive: {exc}") from exc
    except (NotImplementedError, RuntimeError) as exc:  # zip: unsupported compression, encrypted member
        raise ModelError(f"{archive.name}: cannot extract: {exc}") from exc


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Extract a model package archive into the new folder ``dest`` and return the package folder inside it.

    Parameters
    ----------
    archive
        A ``.zip``, ``.tar.gz`` or ``.tgz`` file.
    dest
        A folder that must not exist yet; it is created (and left for the caller to remove, even on failure).
    max_bytes
        The most bytes the archive file may have, and the most its members may expand to, together.

    Returns
    -------
    Path
        The package folder (:func:`package_root`): ``dest`` itself, or the archive's single top-level folder.

    Raises
    ------
    ModelError
        If the archive is too large, unreadable, holds an unsafe member (absolute path, ``..``, a link or a
        special file) or has neither ``model.yaml`` nor a bundle's ``configs/metadata.json`` at its top or in its one
        top folder.
    """
    if not is_archive(archive):
        raise ModelError(f"{archive.name}: not a model archive (expected {', '.join(ARCHIVE_SUFFIXES)})")
    size = archive.stat().st_size
    if size > max_bytes:
        raise ModelError(f"{archive.name}: {size} bytes exceeds the limit of {max_bytes} bytes")
    dest.mkdir(parents=True)
    budget = _Budget(max_bytes)
    with _readable(archive):
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, dest, budget)
        else:
            _extract_tar(archive, dest, budget)
    return package_root(dest, archive.name)


def package_root(folder: Path, label: str) -> Path:
    """The package folder: ``folder`` itself or its one subfolder, whichever holds ``model.yaml`` or is a bare
    MONAI bundle (``configs/metadata.json``; its manifest is then synthesised, named after that subfolder:
    :mod:`gateway.registry.bundle_manifest`).

    Raises
    ------
    ModelError
        If neither holds ``model.yaml`` nor is a bundle.
    """
    if _is_package(folder):
        return folder
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and _is_package(entries[0]):
        return entries[0]
    raise ModelError(
        f"{label}: no {MANIFEST_NAME} at the top of the archive or in its one top-level folder (nor a MONAI "
        f"bundle's {BUNDLE_METADATA})"
    )


def _is_package(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file() or (folder / BUNDLE_METADATA).is_file()


def remove_tree(path: Path) -> None:
    """Remove a folder and everything in it, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
