"""Settings that change a library for the whole process, in one place: applied by ``Gateway.start``, undone by
``Gateway.stop``, so that a gateway embedded in tests or another program behaves like the one ``gateway serve``
runs.

- **pynetdicom** (``pynetdicom._config``): received data sets are written to a file as they arrive
  (``STORE_RECV_CHUNKED_DATASET``: the store renames that file, it never decodes the data set) and files are sent
  as stored (``STORE_SEND_CHUNKED_DATASET``); its per-message logging, which would name patients, is off.
- **pydicom**: value validation on reading is off. It warns *and logs* each odd value (a malformed name, an
  over-long ID), which would put patient data in the log; the gateway checks what it depends on itself.
- **tempfile**: temporary files go to the data folder's ``tmp/``, on the store's file system, so that a received
  data set is renamed into place rather than copied across file systems.
- **loggers**: the INFO chatter of highdicom (which names instance UIDs) and of pynetdicom (a line per
  association request, acceptance and release) is off: their loggers are raised to WARNING (a level set higher
  is kept), and put back at stop. The gateway's own INFO lines name jobs, destinations and counts, never patients
  or UIDs.
- **prometheus-client**: the ``*_created`` sample of each counter and histogram (the time it was made, one more
  series per label set that no dashboard reads) is left out of ``/metrics``.
- **descriptors**: the soft limit on open files is raised to the hard limit (up to 65536): every association,
  HTTP connection and index connection takes one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import prometheus_client.metrics
import pydicom.config
from pynetdicom import _config as pynetdicom_config

from gateway.store.files import temp_prefix

__all__ = ["LibrarySettings", "library_settings", "release_memory"]

log = logging.getLogger(__name__)

_PYNETDICOM: dict[str, Any] = {
    "STORE_RECV_CHUNKED_DATASET": True,
    "STORE_SEND_CHUNKED_DATASET": True,
    "LOG_HANDLER_LEVEL": "none",
    "LOG_REQUEST_IDENTIFIERS": False,
    "LOG_RESPONSE_IDENTIFIERS": False,
}
_QUIET_LOGGERS = ("highdicom", "pynetdicom")
_MAX_OPEN_FILES = 65536


class LibrarySettings:
    """The process-wide settings of the module docstring; :meth:`apply` them, then :meth:`restore` what was there.

    Parameters
    ----------
    tmp_dir
        Where temporary files go (created if missing); ``None`` leaves ``tempfile`` alone.
    """

    def __init__(self, tmp_dir: Path | None = None) -> None:
        self._tmp_dir = tmp_dir
        self._undo: list[Callable[[], None]] = []

    def apply(self) -> None:
        """Set everything, remembering the previous values."""
        for name, value in _PYNETDICOM.items():
            self._set(pynetdicom_config, name, value)
        self._set(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
        # What prometheus_client.disable_created_metrics() sets; set here so that restore() can put it back.
        self._set(prometheus_client.metrics, "_use_created", False)
        if self._tmp_dir is not None:
            self._tmp_dir.mkdir(parents=True, exist_ok=True)
            self._set(tempfile, "tempdir", str(self._tmp_dir.resolve()))
            # Libraries' temporary files (pynetdicom's received data sets) carry this process's name, as the store's
            # own do: another process sharing the folder removes them at its start only once this one is gone.
            self._set(tempfile, "template", temp_prefix())
        for name in _QUIET_LOGGERS:
            logger = logging.getLogger(name)
            previous = logger.level
            logger.setLevel(max(previous, logging.WARNING))
            self._undo.append(lambda logger=logger, previous=previous: logger.setLevel(previous))  # type: ignore[misc]
        self._raise_open_files()

    def restore(self) -> None:
        """Put back what :meth:`apply` changed, last change first."""
        while self._undo:
            self._undo.pop()()

    def _set(self, owner: Any, name: str, value: Any) -> None:
        previous = getattr(owner, name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, previous))

    def _raise_open_files(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _MAX_OPEN_FILES)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            self._undo.append(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
            log.info("open files limit raised from %d to %d", soft, wanted)


@contextmanager
def library_settings(tmp_dir: Path | None = None) -> Iterator[LibrarySettings]:
    """The settings applied for the duration of a ``with`` block (the CLI's one-shot commands use it)."""
    applied = LibrarySettings(tmp_dir)
    applied.apply()
    try:
        yield applied
    finally:
        applied.restore()


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise): called after each job."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
