"""Log hygiene: the process-wide library settings turn highdicom's and pynetdicom's INFO chatter off (and put it back),
and an export's own log lines at INFO and above name jobs, destinations and counts, never a UID."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from pacs import StatusSCP, drain, fast_export, make_job, outputs

from gateway.export import queue
from gateway.jobs.states import JobState
from gateway.process import LibrarySettings
from gateway.store.store import InstanceStore

QUIETED = ("highdicom", "pynetdicom")


def test_third_party_info_chatter_is_off_until_restored() -> None:
    loggers = [logging.getLogger(name) for name in QUIETED]
    before = [logger.level for logger in loggers]
    loud = logging.getLogger("pynetdicom.events")  # a child keeps inheriting its parent's level
    applied = LibrarySettings()
    applied.apply()
    try:
        assert [logger.getEffectiveLevel() for logger in loggers] == [logging.WARNING] * len(QUIETED)
        assert not loud.isEnabledFor(logging.INFO) and loud.isEnabledFor(logging.WARNING)
    finally:
        applied.restore()
    assert [logger.level for logger in loggers] == before


def test_an_export_logs_no_uid(instance_store: InstanceStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = outputs(tmp_path / "out", 3)
    uids = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids |= {str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)}
    job, nowhere = make_job(instance_store), make_job(instance_store)
    applied = LibrarySettings()
    applied.apply()
    caplog.set_level(logging.DEBUG)
    try:
        with StatusSCP(statuses=[0xA700, 0xC000]) as scp:  # busy once, one rejected, then the rest taken
            queue.enqueue(instance_store, job, files, ["pacs"])
            queue.enqueue(instance_store, nowhere, files, [])
            settings = fast_export(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}})
            assert drain(instance_store, settings, job) == JobState.FAILED
    finally:
        applied.restore()
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert any("results undelivered" in r.getMessage() for r in shown if r.levelno == logging.WARNING)
    assert any("failed at export" in r.getMessage() for r in shown if r.levelno == logging.WARNING)
    assert not [r for r in shown if r.name.startswith(QUIETED)], "no third-party INFO"
    leaked = [r.getMessage() for r in shown if any(uid in r.getMessage() for uid in uids)]
    assert not leaked, leaked
