"""Export by C-STORE against a pynetdicom SCP answering chosen statuses: success, warning, retry, dead letters,
a PACS that is down for a while, and a restart that resumes what was being sent without resending what was not."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pacs import (
    StatusSCP,
    deliveries,
    drain,
    fast_export,
    job_of,
    make_job,
    outputs,
    relabel,
    sop_instance_uid,
    wait_for,
    wait_for_job,
)
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from gateway.config import DicomSettings, ExportSettings, TLSSettings
from gateway.export import queue
from gateway.export.workers import ExportWorkers
from gateway.jobs.states import JobState
from gateway.runtime import Gateway
from gateway.store.store import InstanceStore

from conftest import make_settings
from peers import free_port, pki


def to_pacs(port: int, **values: object) -> ExportSettings:
    return fast_export(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}}, **values)


def implicit_copy(src: Path, dest: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_one_association_proposing_exactly_the_files_contexts(instance_store: InstanceStore, tmp_path: Path) -> None:
    files = outputs(tmp_path / "out", 3)
    files.append(implicit_copy(files[0], tmp_path / "implicit.dcm"))
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, files, ["pacs"])
    with StatusSCP() as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.EXPORTED
    assert scp.received == {sop_instance_uid(f): 1 for f in files}
    assert scp.associations == [{(CTImageStorage, ExplicitVRLittleEndian), (CTImageStorage, ImplicitVRLittleEndian)}]
    for row in deliveries(instance_store, job):
        assert (row.state, row.attempts, row.last_status, row.last_error) == ("delivered", 1, 0, None)
        assert [h["outcome"] for h in row.history] == ["delivered"]
    detail = job_of(instance_store, job).detail["export"]
    assert (detail["deliveries"], detail["delivered"], detail["dead"], detail["warnings"]) == (4, 4, 0, 0)
    received = {p.name: pydicom.dcmread(p) for p in files}
    assert all(ds.SOPClassUID == CTImageStorage for ds in received.values())


def test_warning_status_is_a_success_with_the_warning_recorded(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"])
    with StatusSCP(statuses=[0xB000]) as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.EXPORTED
    (row,) = deliveries(instance_store, job)
    assert (row.state, row.last_status, row.last_error) == ("delivered", 0xB000, "warning status 0xB000")
    assert row.history[0]["outcome"] == "warning"
    assert job_of(instance_store, job).detail["export"]["warnings"] == 1


def test_out_of_resources_is_retried_with_backoff_until_delivered(
    instance_store: InstanceStore, tmp_path: Path
) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"])
    with StatusSCP(statuses=[0xA700, 0xA701]) as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.EXPORTED
    (row,) = deliveries(instance_store, job)
    assert row.state == "delivered" and row.attempts == 3 and scp.received[row.sop_instance_uid] == 1
    assert [(h["outcome"], h["status"]) for h in row.history] == [
        ("retry", 0xA700),
        ("retry", 0xA701),
        ("delivered", 0),
    ]
    first, second, third = (h["at"] for h in row.history)
    assert second - first >= 0.025 and third - second >= 0.05, "each retry waited its backoff"


def test_out_of_resources_until_max_attempts_is_dead(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"])
    with StatusSCP(statuses=[0xA700] * 5) as scp:
        assert drain(instance_store, to_pacs(scp.port, max_attempts=2), job) == JobState.FAILED
    (row,) = deliveries(instance_store, job)
    assert row.state == "dead" and row.attempts == 2
    assert row.last_error == "gave up after 2 attempts; last: out of resources, status 0xA700"
    failure = job_of(instance_store, job).detail["failure"]
    assert failure == {"stage": "export", "reason": "1 of 1 deliveries dead: pacs: " + row.last_error}


@pytest.mark.parametrize("status", [0xA900, 0xC000, 0x0122])
def test_refusal_is_a_dead_letter_at_once(instance_store: InstanceStore, tmp_path: Path, status: int) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"])
    with StatusSCP(statuses=[status]) as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.FAILED
    refused, delivered = deliveries(instance_store, job)
    assert (refused.state, refused.attempts, refused.last_status) == ("dead", 1, status)
    assert refused.last_error == f"refused, status 0x{status:04X}"
    assert delivered.state == "delivered", "the next file went on over the same association"
    assert f"0x{status:04X}" in job_of(instance_store, job).detail["failure"]["reason"]


def test_sop_class_the_pacs_does_not_support_is_a_dead_letter(instance_store: InstanceStore, tmp_path: Path) -> None:
    files = outputs(tmp_path / "out", 1)
    other = relabel(files[0], tmp_path / "sc.dcm", SecondaryCaptureImageStorage)
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, [*files, other], ["pacs"])
    with StatusSCP(sop_classes=[CTImageStorage]) as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.FAILED
    ct, sc = deliveries(instance_store, job)
    assert ct.state == "delivered" and scp.received == {ct.sop_instance_uid: 1}
    assert sc.state == "dead" and sc.attempts == 1
    assert sc.last_error == (
        f"presentation context for SOP class {SecondaryCaptureImageStorage} in transfer syntax "
        f"{ExplicitVRLittleEndian} SOP class not supported by the destination"
    )


def test_no_context_accepted_at_all_is_a_dead_letter(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"])
    with StatusSCP(sop_classes=[MRImageStorage]) as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.FAILED
    assert {(r.state, r.attempts) for r in deliveries(instance_store, job)} == {("dead", 1)}
    assert "SOP class not supported by the destination" in job_of(instance_store, job).detail["failure"]["reason"]


def test_pacs_down_for_a_while_then_delivered(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"])
    port = free_port()
    workers = ExportWorkers(instance_store, to_pacs(port, workers=2))
    workers.start()
    try:
        wait_for(lambda: min(r.attempts for r in deliveries(instance_store, job)) >= 2, what="two failed attempts")
        assert job_of(instance_store, job).state == JobState.ENCODED
        with StatusSCP(port=port) as scp:
            final = wait_for_job(instance_store, job, {JobState.EXPORTED, JobState.FAILED})
    finally:
        workers.stop()
    assert final.state == JobState.EXPORTED, final.detail
    for row in deliveries(instance_store, job):
        assert row.state == "delivered" and row.attempts >= 3 and scp.received[row.sop_instance_uid] == 1
        outcomes = [h["outcome"] for h in row.history]
        assert outcomes[-1] == "delivered" and set(outcomes[:-1]) == {"retry"}
        assert "association failed" in row.history[0]["reason"]


def test_restart_resumes_sending_and_never_resends_a_delivered_instance(
    instance_store: InstanceStore, tmp_path: Path
) -> None:
    job = make_job(instance_store)
    files = outputs(tmp_path / "out", 3)
    queue.enqueue(instance_store, job, files, ["pacs"])
    with StatusSCP() as scp:
        before = ExportWorkers(instance_store, to_pacs(scp.port, batch_size=1))
        assert before.run_once()  # the first file is delivered...
        before.stop()
        assert (
            queue.claim(instance_store, ["pacs"], 10) is not None
        )  # ...then the gateway dies while sending the others
        assert [r.state for r in deliveries(instance_store, job)] == ["delivered", "sending", "sending"]
        after = ExportWorkers(instance_store, to_pacs(scp.port))
        after.start()
        try:
            final = wait_for_job(instance_store, job, {JobState.EXPORTED, JobState.FAILED})
        finally:
            after.stop()
    assert final.state == JobState.EXPORTED
    assert scp.received == {sop_instance_uid(f): 1 for f in files}, "each instance received exactly once"
    assert [r.attempts for r in deliveries(instance_store, job)] == [1, 1, 1]


def test_stop_puts_claimed_unsent_deliveries_back(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 3), ["pacs"])
    with StatusSCP() as scp:
        workers = ExportWorkers(instance_store, to_pacs(scp.port))
        workers.stop()  # stopping before the batch starts: nothing is attempted
        assert workers.run_once()
    assert {(r.state, r.attempts) for r in deliveries(instance_store, job)} == {("pending", 0)}
    assert not scp.received and not scp.associations


def test_mutual_tls_to_a_dicom_node(instance_store: InstanceStore, tmp_path: Path) -> None:
    paths = pki(tmp_path / "pki")
    server_tls = TLSSettings(certificate=paths["server_cert"], private_key=paths["server_key"], ca_bundle=paths["ca"])
    node = Gateway(make_settings(tmp_path / "node", dicom=DicomSettings(host="127.0.0.1", port=0, tls=server_tls)))
    node.start()
    try:
        assert node.scp is not None
        pacs = {"ae_title": "GATEWAY", "host": "127.0.0.1", "port": node.scp.port}
        client = {"ca_bundle": paths["ca"], "certificate": paths["client_cert"], "private_key": paths["client_key"]}
        anonymous = {"ca_bundle": paths["ca"]}
        settings = fast_export(
            destinations={"mtls": {**pacs, "tls": client}, "no-cert": {**pacs, "tls": anonymous}, "plain": pacs},
            max_attempts=1,
        )
        files = outputs(tmp_path / "out", 2)
        job = make_job(instance_store)
        queue.enqueue(instance_store, job, files, ["mtls", "no-cert", "plain"])
        assert drain(instance_store, settings, job) == JobState.FAILED
        assert all(node.store.is_indexed(sop_instance_uid(f)) for f in files)
    finally:
        node.stop()
    states = {(r.destination, r.state) for r in deliveries(instance_store, job)}
    assert states == {("mtls", "delivered"), ("no-cert", "dead"), ("plain", "dead")}
    refused = [r for r in deliveries(instance_store, job) if r.state == "dead"]
    assert all(r.last_error and r.last_error.startswith("gave up after 1 attempts; last: association") for r in refused)
