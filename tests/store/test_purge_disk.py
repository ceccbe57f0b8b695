"""Retention on a small real file system: C-STORE into a gateway whose data folder fills a 16 MiB tmpfs.

Ingest goes on once purge has freed space, with no 0xA700 for data that could have been purged; with nothing
purgeable, 0xA700 it is. ``/healthz`` and ``/api/storage`` show that file system.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from gateway.config import (
    HttpSettings,
    JobsSettings,
    RetentionSettings,
    Settings,
    StoreSettings,
    TokenSettings,
    hash_token,
)
from gateway.export.scu import Peer, SendReport, scan, send
from gateway.jobs.states import FINISHED
from gateway.runtime import Gateway
from gateway.store.index import Instance, Job
from gateway.synth.ct import SynthCT, write_synthetic_ct

from conftest import LiveServer, make_settings

pytestmark = pytest.mark.slow

FS_BYTES = 16 << 20
FLOOR = 2 << 20  # store.min_free_bytes
TOKEN = "storage-reader-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERIES = 10  # about 2.1 MB each: 21 MB sent into 16 MiB


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (skips where mounting is not permitted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def cts(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[SynthCT, Path]]:
    root = tmp_path_factory.mktemp("cts")
    return [
        (write_synthetic_ct(root / f"ct{i}", 16, rows=256, columns=256, seed=i, n_nodules=0), root / f"ct{i}")
        for i in range(SERIES)
    ]


def small_settings(data_dir: Path, *, workers: int) -> Settings:
    """A gateway that finishes each job ``skipped`` (no model registered) when it has ``workers``, and keeps
    everything by age: only disk space purges."""
    return make_settings(
        data_dir,
        store=StoreSettings(data_dir=data_dir, min_free_bytes=FLOOR),
        jobs=JobsSettings(workers=workers, poll_s=0.1),
        http=HttpSettings(host="127.0.0.1", port=0, tokens=[TokenSettings(name="t", sha256=hash_token(TOKEN))]),
        retention=RetentionSettings(
            instances_days=None,
            outputs_days=None,
            failed_days=None,
            disk_high_watermark=0.95,
            disk_low_watermark=0.5,
            interval_s=3600,
        ),
    )


def c_store(gw: Gateway, folder: Path) -> SendReport:
    assert gw.scp is not None
    report = SendReport()
    return send(scan([folder], report), Peer("GATEWAY", "127.0.0.1", gw.scp.port), associations=1, report=report)


def wait_finished(gw: Gateway, series_uid: str, timeout_s: float = 120) -> Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with gw.store.sessions() as session:
            job = session.scalars(select(Job).where(Job.series_instance_uid == series_uid)).first()
        if job is not None and job.state in FINISHED:
            return job
        time.sleep(0.1)
    raise AssertionError(f"no finished job for the series within {timeout_s} s")


def test_ingest_goes_on_once_purge_has_freed_space(small_fs: Path, cts: list[tuple[SynthCT, Path]]) -> None:
    with LiveServer(small_settings(small_fs / "data", workers=1), start_dimse=True) as server:
        gw: Gateway = server.app.state.gateway
        jobs: list[int] = []
        for i, (ct, folder) in enumerate(cts):
            report = c_store(gw, folder)
            assert report.failed == [] and report.sent == 16, f"series {i}: {report.failed[:2]}"
            job = wait_finished(gw, ct.series_instance_uid)
            assert job.state == "skipped"
            jobs.append(job.id)

        with gw.store.sessions() as session:
            purged = [session.get(Job, job_id).purged_at is not None for job_id in jobs]  # type: ignore[union-attr]
            paths = list(session.scalars(select(Instance.path)))
        assert sum(purged) >= 3, "21 MB went into 16 MiB: purge made the room"
        assert purged == sorted(purged, reverse=True), "the oldest finished series went first"
        assert not purged[-1]
        assert all(gw.store.path_of(p).is_file() for p in paths), "the index names only files that exist"

        health = httpx.get(f"{server.url}/healthz", headers=AUTH, timeout=10).json()
        disk = health["disk"]
        assert disk["total_bytes"] == FS_BYTES and disk["min_free_bytes"] == FLOOR
        assert disk["used_bytes"] + disk["free_bytes"] == FS_BYTES  # tmpfs reserves nothing
        assert (disk["high_watermark"], disk["low_watermark"]) == (0.95, 0.5)
        assert health["accepting"] is True and disk["accepting"] is True
        storage = httpx.get(f"{server.url}/api/storage", headers=AUTH, timeout=10).json()
        assert storage["held"]["instances"] == len(paths) == 16 * purged.count(False)
        assert storage["disk"]["total_bytes"] == FS_BYTES
        assert storage["retention"]["disk_high_watermark"] == 0.95 and storage["retention"]["instances_days"] is None


def test_with_nothing_purgeable_ingest_is_refused_for_space(small_fs: Path, cts: list[tuple[SynthCT, Path]]) -> None:
    with LiveServer(small_settings(small_fs / "data", workers=0), start_dimse=True) as server:  # jobs stay received
        gw: Gateway = server.app.state.gateway
        failed: list[str] = []
        for _ct, folder in cts:
            failed = [reason for _path, reason in c_store(gw, folder).failed]
            if failed:
                break
        assert failed and all("0xA700" in reason for reason in failed), failed[:3]
        with gw.store.sessions() as session:
            assert all(job.purged_at is None for job in session.scalars(select(Job)))
