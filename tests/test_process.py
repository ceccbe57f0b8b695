"""gateway.process: the process-wide library settings are applied by a gateway's start and put back at its stop."""

from __future__ import annotations

import tempfile
from pathlib import Path

import prometheus_client
import prometheus_client.metrics
import pydicom.config
from prometheus_client import CollectorRegistry, Counter, generate_latest
from pynetdicom import _config as pynetdicom_config

from gateway.process import LibrarySettings


def _exposition() -> str:
    registry = CollectorRegistry()
    Counter("probe_total", "a probe", registry=registry).inc()
    return generate_latest(registry).decode()


def test_every_setting_is_applied_and_then_put_back(tmp_path: Path) -> None:
    before = (
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET,
        pynetdicom_config.LOG_HANDLER_LEVEL,
        pydicom.config.settings.reading_validation_mode,
        tempfile.tempdir,
        prometheus_client.metrics._use_created,
    )
    assert "probe_created" in _exposition(), "prometheus-client's default, which the gateway changes"
    applied = LibrarySettings(tmp_path / "tmp")
    applied.apply()
    try:
        assert pynetdicom_config.STORE_RECV_CHUNKED_DATASET is True
        assert pynetdicom_config.LOG_HANDLER_LEVEL == "none"
        assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
        assert tempfile.tempdir == str((tmp_path / "tmp").resolve()) and (tmp_path / "tmp").is_dir()
        assert "probe_total 1.0" in _exposition() and "probe_created" not in _exposition()
    finally:
        applied.restore()
    assert (
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET,
        pynetdicom_config.LOG_HANDLER_LEVEL,
        pydicom.config.settings.reading_validation_mode,
        tempfile.tempdir,
        prometheus_client.metrics._use_created,
    ) == before
    assert "probe_created" in _exposition()
