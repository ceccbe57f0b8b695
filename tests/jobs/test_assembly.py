"""The assembly stage of jobs: received -> assembling -> assembled / failed, with what assembly found."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
from sqlalchemy import select, update

from gateway.config import IngestSettings, JobsSettings
from gateway.export.scu import Peer, SendReport, scan, send
from gateway.ingest.completion import complete_quiet_series
from gateway.jobs import lifecycle
from gateway.jobs.assembly import assemble_job
from gateway.jobs.states import JobState
from gateway.runtime import Gateway
from gateway.store.index import Job
from gateway.store.store import InstanceStore
from gateway.synth.ct import write_synthetic_ct

from conftest import make_settings


def jobs(store: InstanceStore) -> list[Job]:
    with store.sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def wait_for_state(store: InstanceStore, states: set[str], timeout: float = 60) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = jobs(store)
        if found and all(j.state in states for j in found):
            return found
        time.sleep(0.05)
    raise AssertionError(f"jobs did not reach {states}: {[(j.id, j.state) for j in jobs(store)]}")


def put_copies(store: InstanceStore, files: list[Path], tmp: Path, now: float) -> None:
    for f in files:
        copy = tmp / f"copy-{f.name}"
        copy.write_bytes(f.read_bytes())
        store.put(copy, source="test", now=now)


def claim(store: InstanceStore) -> lifecycle.Lease | None:
    return lifecycle.claim(store, "test/1/a", 60.0, max_attempts=3)


def record_assembly(store: InstanceStore, lease: lifecycle.Lease) -> None:
    """Assemble a claimed job and record the outcome as the runner does."""
    done = assemble_job(store, lease.job_id)
    state = JobState.FAILED if done.failure else JobState.ASSEMBLED
    failure = {"stage": "assemble", "reason": done.failure} if done.failure else None
    lifecycle.move(store, lease, JobState.ASSEMBLING, state, lease_s=60.0, assembly=done.summary, failure=failure)


def test_a_received_series_is_assembled_by_the_running_gateway(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", jobs=JobsSettings(workers=1, poll_s=0.05))
    write_synthetic_ct(tmp_path / "ct", 16, rows=64, columns=64)
    gw = Gateway(settings)
    gw.start()
    try:
        assert gw.scp is not None
        report = SendReport()
        send(scan([tmp_path / "ct"], report), Peer("GATEWAY", "127.0.0.1", gw.scp.port), report=report)
        assert report.sent == 16
        (job,) = wait_for_state(gw.store, {JobState.SKIPPED, JobState.FAILED})
    finally:
        gw.stop()
    assert job.state == JobState.SKIPPED, job.detail  # assembled, and no model is registered
    (volume,) = job.detail["assembly"]["volumes"]
    assert volume["shape"] == [16, 64, 64] and volume["modality"] == "CT" and volume["qc"] == []
    assert volume["spacing_mm"][0] == 2.5
    assert job.detail["timings"]["assemble_s"] >= 0


def test_a_series_that_cannot_be_assembled_fails_its_job_with_the_reason(tmp_path: Path) -> None:
    store = InstanceStore(make_settings(tmp_path / "data").store)
    try:
        write_synthetic_ct(tmp_path / "ct", 6, rows=64, columns=64)
        files = sorted((tmp_path / "ct").glob("*.dcm"))
        ds = pydicom.dcmread(files[3])
        small = ds.pixel_array[:32, :32].copy()
        ds.Rows = ds.Columns = 32
        ds.PixelData = small.tobytes()
        ds.save_as(files[3])
        put_copies(store, files, tmp_path, now=1000.0)
        complete_quiet_series(store.write_sessions, 10, now=2000.0)
        lease = claim(store)
        assert lease is not None and claim(store) is None, "a job is claimed once"
        record_assembly(store, lease)
        (job,) = jobs(store)
    finally:
        store.close()
    assert job.state == JobState.FAILED
    assert job.detail["failure"]["stage"] == "assemble"
    assert "frame size" in job.detail["failure"]["reason"]
    assert job.detail["assembly"]["volumes"] == []


def test_interrupted_assembly_resumes_and_revision_two_uses_the_whole_series(tmp_path: Path) -> None:
    store = InstanceStore(make_settings(tmp_path / "data", ingest=IngestSettings(quiet_period_s=10)).store)
    try:
        write_synthetic_ct(tmp_path / "ct", 10, rows=64, columns=64)
        files = sorted((tmp_path / "ct").glob("*.dcm"))
        put_copies(store, files[:6], tmp_path, now=1000.0)
        complete_quiet_series(store.write_sessions, 10, now=1100.0)
        put_copies(store, files[6:], tmp_path, now=1200.0)
        complete_quiet_series(store.write_sessions, 10, now=1300.0)
        first, second = (j.id for j in jobs(store))
        with store.write_sessions.begin() as session:  # as a crash in the middle of assembly would leave it
            values = {"state": JobState.ASSEMBLING, "lease_owner": "gone/1/x", "lease_expires_at": 0.0}
            session.execute(update(Job).where(Job.id == first).values(**values))
        assert lifecycle.reclaim_expired(store) == [first]
        for expected in (first, second):
            lease = claim(store)
            assert lease is not None and lease.job_id == expected
            record_assembly(store, lease)
        done = {j.id: j for j in jobs(store)}
    finally:
        store.close()
    assert done[first].detail["assembly"]["volumes"][0]["shape"] == [6, 64, 64]
    assert done[second].detail["assembly"]["volumes"][0]["shape"] == [10, 64, 64], "revision 2 = the series so far"
