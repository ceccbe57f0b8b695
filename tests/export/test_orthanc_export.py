"""Orthanc as the PACS: results exported by C-STORE and by STOW-RS arrive whole, only the kinds of result the
destination asks for are sent, and a PACS that is down for a while gets them once it is up (the attempts before
are recorded)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pacs import deliveries, drain, fast_export, job_of, make_job, outputs, result_files, sop_instance_uid, wait_for

from gateway.config import ExportSettings
from gateway.export import queue
from gateway.export.destinations import destinations_for
from gateway.export.workers import ExportWorkers
from gateway.jobs.states import JobState
from gateway.store.store import InstanceStore

from conftest import require_tool
from peers import Orthanc, OrthancOn, dicomweb_plugin, free_port, orthanc_binary

pytestmark = pytest.mark.slow


@pytest.fixture
def need_orthanc() -> None:
    if orthanc_binary() is None:
        require_tool("Orthanc")
    if dicomweb_plugin() is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (make test installs orthanc-dicomweb)")


def held(orthanc: Orthanc) -> dict[str, str]:
    """{SOP Instance UID: Orthanc id} of every instance Orthanc holds."""
    found = orthanc.rest("GET", "/instances?expand")
    return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in found}


def settings_for(orthanc: Orthanc, send: list[str] | None = None, **values: object) -> ExportSettings:
    kinds = {} if send is None else {"send": send}
    destinations = {
        "orthanc-dimse": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, **kinds},
        "orthanc-web": {"stow_url": f"{orthanc.dicomweb_url}/studies", **kinds},
    }
    return fast_export(destinations=destinations, **values)


@pytest.mark.parametrize("destination", ["orthanc-dimse", "orthanc-web"])
def test_results_arrive_in_orthanc(
    need_orthanc: None, instance_store: InstanceStore, tmp_path: Path, destination: str
) -> None:
    files = outputs(instance_store.data_dir / "results" / "job-1", 4)
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, files, [destination])
    with Orthanc(tmp_path / "orthanc") as orthanc:
        assert drain(instance_store, settings_for(orthanc), job, timeout_s=60.0) == JobState.EXPORTED
        holding = held(orthanc)
        assert set(holding) == {sop_instance_uid(f) for f in files}
        original = pydicom.dcmread(files[0])
        copy = pydicom.dcmread(
            pydicom.filebase.DicomBytesIO(orthanc.rest("GET", f"/instances/{holding[original.SOPInstanceUID]}/file"))
        )
    assert copy.PixelData == original.PixelData and copy.SOPClassUID == original.SOPClassUID
    assert {(r.state, r.attempts) for r in deliveries(instance_store, job)} == {("delivered", 1)}
    expected = 0 if destination == "orthanc-dimse" else 200
    assert {r.last_status for r in deliveries(instance_store, job)} == {expected}


@pytest.mark.parametrize("destination", ["orthanc-dimse", "orthanc-web"])
def test_only_the_kinds_the_destination_asks_for_arrive(
    need_orthanc: None, instance_store: InstanceStore, tmp_path: Path, destination: str
) -> None:
    files = result_files(tmp_path / "out")
    job = make_job(instance_store)
    with Orthanc(tmp_path / "orthanc") as orthanc:
        settings = settings_for(orthanc, send=["seg", "sr"], default=[destination])
        queue.enqueue(instance_store, job, list(files.values()), destinations_for(settings, "stow"))
        assert drain(instance_store, settings, job, timeout_s=60.0) == JobState.EXPORTED
        holding = held(orthanc)
    assert set(holding) == {sop_instance_uid(files["seg"]), sop_instance_uid(files["sr"])}
    export = job_of(instance_store, job).detail["export"]
    assert export["not_sent"] == {destination: ["gsps", "ko", "sc"]}
    assert (export["deliveries"], export["delivered"], export["refused"], export["dead"]) == (2, 2, 0, 0)


def test_orthanc_down_for_a_while_then_up(need_orthanc: None, instance_store: InstanceStore, tmp_path: Path) -> None:
    files = outputs(tmp_path / "out", 2)
    job = make_job(instance_store)
    orthanc = OrthancOn(tmp_path / "orthanc", free_port(), free_port())
    queue.enqueue(instance_store, job, files, ["orthanc-dimse", "orthanc-web"])
    workers = ExportWorkers(instance_store, settings_for(orthanc, workers=2, backoff_max_s=0.5))
    workers.start()
    try:
        wait_for(lambda: min(r.attempts for r in deliveries(instance_store, job)) >= 2, what="two failed attempts each")
        with orthanc:
            wait_for(lambda: job_of(instance_store, job).state != JobState.ENCODED, timeout_s=60, what="export")
            holding = held(orthanc)
    finally:
        workers.stop()
    assert job_of(instance_store, job).state == JobState.EXPORTED, job_of(instance_store, job).detail
    assert set(holding) == {sop_instance_uid(f) for f in files}
    for row in deliveries(instance_store, job):
        outcomes = [h["outcome"] for h in row.history]
        assert row.state == "delivered" and row.attempts == len(outcomes) >= 3, row.history
        assert outcomes[-1] == "delivered" and set(outcomes[:-1]) == {"retry"}
    web = next(r for r in deliveries(instance_store, job) if r.destination == "orthanc-web")
    assert "STOW-RS request failed: ConnectError" in web.history[0]["reason"]
