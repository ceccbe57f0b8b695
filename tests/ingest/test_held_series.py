"""A series some of whose instances were refused for want of resources (0xA700) is held, not run on what was stored
of it, until the refused instances arrive (a PACS retries a 0xA700) or an operator releases it."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from gateway.config import Settings, StoreSettings
from gateway.errors import NotFound, OutOfResources
from gateway.ingest.completion import complete_quiet_series, release_series
from gateway.runtime import Gateway
from gateway.store.index import Job, RefusedInstance, SeriesRevision
from gateway.store.store import InstanceStore

from conftest import ADMIN, LiveServer, make_settings
from dicom_files import minimal_ct

QUIET = 10.0
T0 = 1_000_000.0
FULL = 1 << 62  # a free-space watermark no disk meets: every instance is refused for want of space
STUDY = "1.2.826.0.1.3680043.8.498.7"
SERIES = "1.2.826.0.1.3680043.8.498.7.1"
GATEWAY_SCRIPT = Path(sys.executable).with_name("gateway")


class Series:
    """Five instances of one series; ``send`` stores a copy through ``store`` (which consumes it)."""

    def __init__(self, folder: Path, count: int = 5) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.files = [
            minimal_ct(folder / f"{i}.dcm", StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES, InstanceNumber=i + 1)
            for i in range(count)
        ]

    def send(self, store: InstanceStore, index: int, now: float) -> None:
        copy = self.folder / f"copy-{uuid.uuid4().hex}.part"
        shutil.copyfile(self.files[index], copy)
        store.put(copy, source="test", now=now)

    def refuse(self, store: InstanceStore, index: int, now: float) -> None:
        with pytest.raises(OutOfResources):
            self.send(store, index, now)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[InstanceStore, InstanceStore]]:
    """Two stores over one data folder: one with room, one whose disk is (as far as it knows) full."""
    room = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0))
    full = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=FULL))
    try:
        yield room, full
    finally:
        full.close()
        room.close()


@pytest.fixture
def series(tmp_path: Path) -> Series:
    return Series(tmp_path / "series")


def revision_rows(store: InstanceStore) -> list[SeriesRevision]:
    with store.sessions() as session:
        return list(session.scalars(select(SeriesRevision).order_by(SeriesRevision.revision)))


def jobs(store: InstanceStore) -> list[Job]:
    with store.sessions() as session:
        return list(session.scalars(select(Job)))


def refused(store: InstanceStore) -> set[str]:
    with store.sessions() as session:
        return set(session.scalars(select(RefusedInstance.sop_instance_uid)))


def hold(room: InstanceStore, full: InstanceStore, series: Series) -> SeriesRevision:
    """Instances 0-2 stored, 3 and 4 refused for want of space; the quiet period passes: the revision is held."""
    for i in range(3):
        series.send(room, i, T0 + i)
    series.refuse(full, 3, T0 + 3)
    series.refuse(full, 4, T0 + 4)
    assert complete_quiet_series(room.write_sessions, QUIET, now=T0 + 4 + QUIET + 1) == []
    (rev,) = revision_rows(room)
    return rev


def test_a_series_with_refused_instances_is_held_not_run(
    stores: tuple[InstanceStore, InstanceStore], series: Series, caplog: pytest.LogCaptureFixture
) -> None:
    room, full = stores
    caplog.set_level(logging.INFO, logger="gateway")
    rev = hold(room, full, series)
    assert (rev.state, rev.instance_count, rev.refused_count) == ("held", 3, 2)
    assert jobs(room) == [], "no job is made of a partial series"
    assert len(refused(room)) == 2
    (line,) = [r.getMessage() for r in caplog.records if "held" in r.getMessage()]
    assert f"revision {rev.id} held: 2 instance(s)" in line
    assert all(uid not in r.getMessage() for r in caplog.records for uid in (STUDY, SERIES, *refused(room)))
    assert complete_quiet_series(room.write_sessions, QUIET, now=T0 + 1000) == [], "a held revision stays held"


def test_the_refused_instances_sent_again_complete_the_same_revision(
    stores: tuple[InstanceStore, InstanceStore], series: Series
) -> None:
    room, full = stores
    held = hold(room, full, series)
    series.send(room, 3, T0 + 100)  # the PACS retries one: the held revision reopens ...
    assert [r.state for r in revision_rows(room)] == ["open"]
    assert complete_quiet_series(room.write_sessions, QUIET, now=T0 + 100 + QUIET + 1) == []
    assert [r.state for r in revision_rows(room)] == ["held"], "... and is held again: one is still missing"
    series.send(room, 4, T0 + 200)
    (done,) = complete_quiet_series(room.write_sessions, QUIET, now=T0 + 200 + QUIET + 1)
    assert (done.revision_id, done.instance_count) == (held.id, 5), "one job, on the whole series"
    assert [(r.state, r.revision) for r in revision_rows(room)] == [("complete", 1)]
    assert refused(room) == set()


def test_a_retry_within_the_quiet_period_completes_normally(
    stores: tuple[InstanceStore, InstanceStore], series: Series
) -> None:
    room, full = stores
    series.send(room, 0, T0)
    series.refuse(full, 1, T0 + 1)
    series.send(room, 1, T0 + 2)
    (done,) = complete_quiet_series(room.write_sessions, QUIET, now=T0 + 2 + QUIET + 1)
    assert done.instance_count == 2
    (rev,) = revision_rows(room)
    assert (rev.state, rev.refused_count) == ("complete", 1), "the refusal is counted, and was made good"


def test_a_refusal_before_the_series_is_known_still_holds_it(
    stores: tuple[InstanceStore, InstanceStore], series: Series
) -> None:
    room, full = stores
    series.refuse(full, 0, T0)  # its first instance: no series, no revision yet
    series.send(room, 1, T0 + 1)
    assert complete_quiet_series(room.write_sessions, QUIET, now=T0 + 1 + QUIET + 1) == []
    (rev,) = revision_rows(room)
    assert (rev.state, rev.refused_count) == ("held", 1)


def test_an_instance_already_stored_is_not_counted_as_refused(
    stores: tuple[InstanceStore, InstanceStore], series: Series
) -> None:
    room, full = stores
    series.send(room, 0, T0)
    series.refuse(full, 0, T0 + 1)  # a duplicate refused for want of space: the series lacks nothing
    assert refused(room) == set()
    assert len(complete_quiet_series(room.write_sessions, QUIET, now=T0 + 1 + QUIET + 1)) == 1


def test_an_operator_release_runs_the_series_as_stored(
    stores: tuple[InstanceStore, InstanceStore], series: Series
) -> None:
    room, full = stores
    held = hold(room, full, series)
    release = release_series(room.write_sessions, SERIES, now=T0 + 500)
    assert release.refusals_dropped == 2 and release.completion is not None
    assert (release.completion.revision_id, release.completion.instance_count) == (held.id, 3)
    (job,) = jobs(room)
    assert job.detail["released_with_refused"] == 2
    assert [r.state for r in revision_rows(room)] == ["complete"] and refused(room) == set()
    assert release_series(room.write_sessions, SERIES).completion is None, "nothing is held any more"
    series.send(room, 3, T0 + 600)  # a refused instance arriving after all opens the next revision, as any other
    (late,) = complete_quiet_series(room.write_sessions, QUIET, now=T0 + 600 + QUIET + 1)
    assert [r.revision for r in revision_rows(room)] == [1, 2] and late.revision == 2
    with pytest.raises(NotFound):
        release_series(room.write_sessions, "1.2.3.4.5.6")


def test_gateway_series_release_command(stores: tuple[InstanceStore, InstanceStore], series: Series) -> None:
    room, full = stores
    hold(room, full, series)
    data_dir = room.data_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    run = subprocess.run(
        [str(GATEWAY_SCRIPT), "series", "release", SERIES, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (job,) = jobs(room)
    assert f"job {job.id} on 3 instance(s)" in run.stdout
    unknown = subprocess.run(
        [str(GATEWAY_SCRIPT), "series", "release", "1.2.3.4", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: "), unknown.stderr


# -- over the wire: C-STORE and STOW-RS under a full disk ---------------------------------------------------------


def c_store(gw: Gateway, paths: list[Path]) -> list[int]:
    assert gw.scp is not None
    ae = AE(ae_title="PACS")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", gw.scp.port, ae_title="GATEWAY")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def wait_for(condition: object, what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_pacs_retrying_its_0xa700_over_c_store_completes_a_held_series(gateway: Gateway, series: Series) -> None:
    gw = gateway
    assert c_store(gw, series.files[:3]) == [0, 0, 0]
    roomy = gw.store.settings
    gw.store.settings = roomy.model_copy(update={"min_free_bytes": FULL})  # the disk fills up
    assert c_store(gw, series.files[3:]) == [0xA700, 0xA700]
    gw.store.settings = roomy
    wait_for(lambda: [r.state for r in revision_rows(gw.store)] == ["held"], "the series to be held")
    assert jobs(gw.store) == []
    assert c_store(gw, series.files[3:]) == [0, 0]  # the PACS retries
    wait_for(lambda: len(jobs(gw.store)) == 1, "the job")
    (job,) = jobs(gw.store)
    assert job.detail["instances"] == 5


def test_stow_parts_refused_for_space_are_remembered(tmp_path: Path, series: Series) -> None:
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = b"".join(head + p.read_bytes() + b"\r\n" for p in series.files[:2]) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', **ADMIN}
    settings: Settings = make_settings(
        tmp_path / "data", store=StoreSettings(data_dir=tmp_path / "data", min_free_bytes=FULL)
    )
    with LiveServer(settings) as server:
        response = httpx.post(f"{server.url}/dicomweb/studies", content=body, headers=headers, timeout=30)
        assert response.status_code == 409, response.text
        failed = Dataset.from_json(response.json()).FailedSOPSequence
        assert [item.FailureReason for item in failed] == [0xA700, 0xA700]
        named = {str(item.ReferencedSOPInstanceUID) for item in failed}
        assert refused(server.app.state.store) == named and len(named) == 2, "known by their first bytes alone"


def test_an_operator_releases_a_held_series_over_the_api(
    stores: tuple[InstanceStore, InstanceStore], series: Series, tmp_path: Path
) -> None:
    from gateway.api.app import create_app

    from conftest import api_client

    room, full = stores
    hold(room, full, series)
    app = create_app(make_settings(room.data_dir), start_dimse=False)
    with api_client(app) as client:
        anonymous = client.post(f"/api/series/{SERIES}/release", headers={"Authorization": ""})
        assert anonymous.status_code == 401, "a state change needs a token"
        answer = client.post(f"/api/series/{SERIES}/release")
        assert answer.status_code == 200, answer.text
        assert answer.json()["refusals_dropped"] == 2 and answer.json()["job_id"] is not None
        again = client.post(f"/api/series/{SERIES}/release")
        assert again.status_code == 409 and "not held" in again.json()["detail"]
        assert client.post("/api/series/1.2.3.4/release").status_code == 404
