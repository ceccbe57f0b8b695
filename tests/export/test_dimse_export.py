"""Export by C-STORE against a pynetdicom SCP answering chosen statuses: success, warning, retry, dead letters,
a PACS that is down for a while, and a restart that resumes what was being sent without resending what was not;
and against DCMTK ``storescp`` taking only some SOP classes: each destination gets the kinds of result it asks
for, and a SOP class it refuses ends ``refused`` without failing the export."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pacs import (
    EARLIER,
    ProfileStoreSCP,
    StatusSCP,
    deliveries,
    drain,
    fast_export,
    job_of,
    make_job,
    outputs,
    relabel,
    result_files,
    sop_instance_uid,
    wait_for,
    wait_for_job,
)
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)

from gateway.config import DicomSettings, ExportSettings, TLSSettings
from gateway.errors import ExportError
from gateway.export import queue
from gateway.export.destinations import destinations_for
from gateway.export.workers import ExportWorkers
from gateway.jobs.states import JobState
from gateway.runtime import Gateway
from gateway.store.store import InstanceStore

from conftest import make_settings, require_tool
from peers import dcmtk_tool, free_port, pki

#: Every SOP class of :func:`pacs.result_files` but the presentation state.
WITHOUT_GSPS = [SegmentationStorage, Comprehensive3DSRStorage, KeyObjectSelectionDocumentStorage]


@pytest.fixture
def need_storescp() -> None:
    if dcmtk_tool("storescp") is None:
        require_tool("DCMTK storescp")


def to_pacs(port: int, **values: object) -> ExportSettings:
    return fast_export(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}}, **values)


def gsps_refused(transfer_syntax: str = ExplicitVRLittleEndian) -> str:
    gsps = GrayscaleSoftcopyPresentationStateStorage
    return (
        f"presentation context for SOP class {gsps} ({UID(gsps).name}) in transfer syntax {transfer_syntax} "
        "rejected: SOP class not supported by the destination"
    )


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


@pytest.mark.parametrize("status", [0xA900, 0xC000, 0x0124])
def test_rejection_is_a_dead_letter_at_once(instance_store: InstanceStore, tmp_path: Path, status: int) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"])
    with StatusSCP(statuses=[status]) as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.FAILED
    rejected, delivered = deliveries(instance_store, job)
    assert (rejected.state, rejected.attempts, rejected.last_status) == ("dead", 1, status)
    assert rejected.last_error == f"rejected, status 0x{status:04X}"
    assert delivered.state == "delivered", "the next file went on over the same association"
    assert f"0x{status:04X}" in job_of(instance_store, job).detail["failure"]["reason"]


def test_sop_class_not_supported_status_is_refused_and_the_export_goes_on(
    instance_store: InstanceStore, tmp_path: Path
) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"])
    with StatusSCP(statuses=[0x0122]) as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.EXPORTED
    refused, delivered = deliveries(instance_store, job)
    reason = f"SOP class {CTImageStorage} (CT Image Storage) not supported, status 0x0122"
    assert (refused.state, refused.attempts, refused.last_status, refused.last_error) == ("refused", 1, 0x0122, reason)
    assert [(h["outcome"], h["status"]) for h in refused.history] == [("refused", 0x0122)]
    assert delivered.state == "delivered" and scp.received == {delivered.sop_instance_uid: 1}
    detail = job_of(instance_store, job).detail
    assert "failure" not in detail
    assert detail["export"] | {"destinations": None} == {
        "deliveries": 2,
        "destinations": None,
        "delivered": 1,
        "warnings": 0,
        "refused": 1,
        "dead": 0,
        "refused_reasons": [f"pacs: {reason}"],
    }


def test_sop_class_the_pacs_does_not_support_is_refused(instance_store: InstanceStore, tmp_path: Path) -> None:
    files = outputs(tmp_path / "out", 1)
    other = relabel(files[0], tmp_path / "sc.dcm", SecondaryCaptureImageStorage)
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, [*files, other], ["pacs"])
    with StatusSCP(sop_classes=[CTImageStorage]) as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.EXPORTED
    ct, sc = deliveries(instance_store, job)
    assert ct.state == "delivered" and scp.received == {ct.sop_instance_uid: 1}
    assert sc.state == "refused" and sc.attempts == 1
    assert sc.last_error == (
        f"presentation context for SOP class {SecondaryCaptureImageStorage} (Secondary Capture Image Storage) in "
        f"transfer syntax {ExplicitVRLittleEndian} rejected: SOP class not supported by the destination"
    )


def test_no_context_accepted_at_all_is_refused(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"])
    with StatusSCP(sop_classes=[MRImageStorage]) as scp:
        assert drain(instance_store, to_pacs(scp.port), job) == JobState.EXPORTED
    assert {(r.state, r.attempts) for r in deliveries(instance_store, job)} == {("refused", 1)}
    export = job_of(instance_store, job).detail["export"]
    assert (export["delivered"], export["refused"], export["dead"]) == (0, 2, 0)
    (reason,) = export["refused_reasons"]
    assert reason.startswith(f"pacs: presentation context for SOP class {CTImageStorage} (CT Image Storage)")


def test_each_destination_gets_the_kinds_it_asks_for(
    need_storescp: None, instance_store: InstanceStore, tmp_path: Path
) -> None:
    files = result_files(tmp_path / "out")
    sop_classes = [*WITHOUT_GSPS, GrayscaleSoftcopyPresentationStateStorage, SecondaryCaptureImageStorage]
    with ProfileStoreSCP(tmp_path / "pacs", sop_classes) as pacs, StatusSCP() as archive:
        settings = fast_export(
            destinations={
                "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "send": ["seg", "sr"]},
                "archive": {"ae_title": "PACS", "host": "127.0.0.1", "port": archive.port},  # default: all but sc
            },
            default=["pacs", "archive"],
        )
        job = make_job(instance_store)
        queue.enqueue(instance_store, job, list(files.values()), destinations_for(settings, "stow"))
        assert drain(instance_store, settings, job) == JobState.EXPORTED
        received = pacs.received()
    uid = {kind: sop_instance_uid(path) for kind, path in files.items()}
    assert received == {uid["seg"], uid["sr"]}
    assert archive.received == {uid[kind]: 1 for kind in ("seg", "sr", "gsps", "ko")}
    export = job_of(instance_store, job).detail["export"]
    assert export["not_sent"] == {"pacs": ["gsps", "ko", "sc"], "archive": ["sc"]}
    assert (export["deliveries"], export["delivered"], export["refused"], export["dead"]) == (6, 6, 0, 0)


def test_a_sop_class_refused_in_negotiation_does_not_fail_the_export(
    need_storescp: None, instance_store: InstanceStore, tmp_path: Path
) -> None:
    files = result_files(tmp_path / "out")
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, [files[kind] for kind in ("seg", "sr", "gsps", "ko")], ["pacs"])
    with ProfileStoreSCP(tmp_path / "pacs", WITHOUT_GSPS) as pacs:
        assert drain(instance_store, to_pacs(pacs.port), job) == JobState.EXPORTED
        received = pacs.received()
    assert received == {sop_instance_uid(files[kind]) for kind in ("seg", "sr", "ko")}
    views = {view["kind"]: view for view in queue.deliveries_of(instance_store, job)}
    assert {kind: view["state"] for kind, view in views.items()} == {
        "seg": "delivered",
        "sr": "delivered",
        "gsps": "refused",
        "ko": "delivered",
    }
    gsps = views["gsps"]
    assert (gsps["attempts"], gsps["last_status"], gsps["last_error"]) == (1, None, gsps_refused())
    assert [(h["outcome"], h["reason"]) for h in gsps["history"]] == [("refused", gsps_refused())]
    export = job_of(instance_store, job).detail["export"]
    assert (export["delivered"], export["refused"], export["dead"]) == (3, 1, 0)
    assert export["refused_reasons"] == [f"pacs: {gsps_refused()}"]

    # the PACS is configured to take presentation states; the operator sends the refused one again
    assert queue.retry_job(instance_store, job) == 1
    assert job_of(instance_store, job).state == JobState.ENCODED
    with ProfileStoreSCP(tmp_path / "pacs-after", [*WITHOUT_GSPS, GrayscaleSoftcopyPresentationStateStorage]) as pacs:
        assert drain(instance_store, to_pacs(pacs.port), job) == JobState.EXPORTED
        assert pacs.received() == {sop_instance_uid(files["gsps"])}
    (gsps_row,) = [r for r in deliveries(instance_store, job) if r.sop_instance_uid == sop_instance_uid(files["gsps"])]
    assert [h["outcome"] for h in gsps_row.history] == ["refused", "requeued", "delivered"]
    export = job_of(instance_store, job).detail["export"]
    assert (export["delivered"], export["refused"]) == (4, 0) and "refused_reasons" not in export
    with pytest.raises(ExportError, match="no dead or refused delivery"):
        queue.retry_job(instance_store, job)


def test_a_transfer_syntax_the_pacs_rejects_is_a_dead_letter(
    need_storescp: None, instance_store: InstanceStore, tmp_path: Path
) -> None:
    files = result_files(tmp_path / "out")
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, [files["seg"], files["gsps"]], ["pacs"])
    profile = [SegmentationStorage, GrayscaleSoftcopyPresentationStateStorage]
    with ProfileStoreSCP(tmp_path / "pacs", profile, transfer_syntaxes=[ImplicitVRLittleEndian]) as pacs:
        assert drain(instance_store, to_pacs(pacs.port), job) == JobState.FAILED
    assert {(r.state, r.attempts) for r in deliveries(instance_store, job)} == {("dead", 1)}
    reason = job_of(instance_store, job).detail["failure"]["reason"]
    assert reason.startswith("2 of 2 deliveries dead: pacs: presentation context for SOP class")
    assert "rejected: transfer syntax not supported by the destination" in reason


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
            queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0) is not None
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
