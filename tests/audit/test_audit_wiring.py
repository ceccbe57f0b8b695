"""The stages report to the audit trail they are given: the DICOM listener (instances received per study, an
association rejected), STOW-RS, QIDO-RS and refused tokens, the registry's changes, and retention's purges. Each
message is read back from a real audit file and validated against the schema."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import update

from gateway.api.app import create_app
from gateway.audit.sinks import FileSink
from gateway.audit.trail import AuditTrail
from gateway.config import AllowedCaller, DicomSettings, RetentionSettings, StoreSettings
from gateway.ingest.completion import complete_quiet_series
from gateway.jobs.states import JobState
from gateway.registry.registry import Registry, RegistryIndex
from gateway.runtime import Gateway
from gateway.store.index import Job
from gateway.store.retention import DAY_S, Retention
from gateway.store.store import InstanceStore

from audit_peers import validated
from conftest import api_client, make_settings, require_tool
from dicom_files import minimal_ct
from peers import wait_until

MODELS = Path(__file__).resolve().parents[2] / "models"


def trail_to(path: Path) -> AuditTrail:
    return AuditTrail("GW", [FileSink(path)], ae_title="GATEWAY")


def read(path: Path) -> list[Any]:
    return [validated(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def event_ids(path: Path) -> list[tuple[str, str, str]]:
    found = []
    for root in read(path):
        ident = root.find("EventIdentification")
        found.append(
            (ident.find("EventID").get("csd-code"), ident.get("EventActionCode"), ident.get("EventOutcomeIndicator"))
        )
    return found


def test_dicom_listener_reports_each_study_received_and_each_rejection(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    log = tmp_path / "audit.log"
    dicom = DicomSettings(host="127.0.0.1", port=0, allowed_callers=[AllowedCaller(ae_title="SCANNER")])
    gateway = Gateway(make_settings(tmp_path / "data", dicom=dicom))
    assert gateway.scp is not None
    gateway.scp.audit = trail_to(log)  # the trail the listener was given
    gateway.start()
    try:
        studies = [generate_uid(), generate_uid()]
        files = [
            str(minimal_ct(tmp_path / f"{i}.dcm", StudyInstanceUID=studies[i % 2], PatientID="P-77")) for i in range(3)
        ]
        port = str(gateway.scp.port)
        done = subprocess.run(
            [storescu, "-aet", "SCANNER", "-aec", "GATEWAY", "127.0.0.1", port, *files], capture_output=True
        )
        assert done.returncode == 0, done.stderr
        subprocess.run([storescu, "-aet", "STRANGER", "127.0.0.1", port, files[0]], capture_output=True)
        wait_until(lambda: len(event_ids(log)) >= 3, timeout_s=20, what="three audit messages")
    finally:
        gateway.stop()
    roots = read(log)
    received = [r for r in roots if r.find("EventIdentification/EventID").get("csd-code") == "110104"]
    by_study = {
        o.get("ParticipantObjectID"): int(o.find(".//SOPClass").get("NumberOfInstances"))
        for r in received
        for o in r.findall("ParticipantObjectIdentification")
        if o.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    }
    assert by_study == {studies[0]: 2, studies[1]: 1}, "one message per study, with its count"
    (alert,) = [r for r in roots if r.find("EventIdentification/EventID").get("csd-code") == "110113"]
    assert alert.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert alert.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "STRANGER"


def test_stow_qido_and_refused_tokens_are_reported(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    app = create_app(make_settings(tmp_path / "data"), start_dimse=False)
    study = generate_uid()
    body_file = minimal_ct(tmp_path / "one.dcm", StudyInstanceUID=study, PatientID="P-88")
    boundary = "audit-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + body_file.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with api_client(app) as client:
        app.state.gateway.audit = trail_to(log)  # the trail the running gateway's faces use
        stored = client.post(
            "/dicomweb/studies",
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                **client.headers,
            },
        )
        assert stored.status_code == 200, stored.text
        assert client.get("/dicomweb/studies?PatientID=P-88").status_code == 200
        assert client.get("/dicomweb/studies", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.post("/dicomweb/studies", headers={"Authorization": ""}, content=b"").status_code == 401
    reported = [e for e in event_ids(log) if e[0] != "110100"]  # the gateway's stop is in it too, once wired
    assert reported == [("110104", "C", "0"), ("110112", "E", "0"), ("110114", "E", "4"), ("110114", "E", "4")]
    stow = read(log)[0]
    assert stow.find("ActiveParticipant").get("UserID") == "test-admin", "the token's name, never the token"


def test_registry_changes_say_who(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    index = RegistryIndex(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0))
    try:
        registry = Registry(index, dry_run=None)
        registry.audit = trail_to(log)
        registry.register(MODELS / "ct-tissue", by="ops-token")
        registry.disable("ct-tissue", by="ops-token")
        registry.enable("ct-tissue@1.0.0", by="ops-token")
        registry.remove("ct-tissue@1.0.0")
    finally:
        index.close()
    roots = read(log)
    details = [r.find("EventIdentification/EventOutcomeDescription").text for r in roots]
    assert details == [
        "model ct-tissue@1.0.0 registered",
        "model ct-tissue disabled",
        "model ct-tissue@1.0.0 enabled",
        "model ct-tissue@1.0.0 removed",
    ]
    requestors = [
        [p.get("UserID") for p in r.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"] for r in roots
    ]
    assert requestors == [["ops-token"], ["ops-token"], ["ops-token"], ["GATEWAY"]], "no one named: the gateway"


def test_a_purge_reports_each_study_deleted(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0))
    now = time.time()
    study, series = generate_uid(), generate_uid()
    try:
        for i in range(2):
            src = minimal_ct(tmp_path / f"{i}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="P-99")
            store.put(src, source="test", now=now - 100 * DAY_S)
        (done,) = complete_quiet_series(store.write_sessions, 0, now=now - 99 * DAY_S)
        with store.write_sessions.begin() as session:
            session.execute(
                update(Job)
                .where(Job.id == done.job_id)
                .values(state=JobState.EXPORTED, updated_at=now - 50 * DAY_S, finished_at=now - 50 * DAY_S)
            )
        settings = RetentionSettings(instances_days=7, disk_high_watermark=1.0, disk_low_watermark=1.0)
        report = Retention(store, settings, 0, audit=trail_to(log)).run(now=now)
    finally:
        store.close()
    assert report.instances == 2
    (root,) = read(log)
    assert root.find("EventIdentification/EventID").get("csd-code") == "110105"
    ids = {o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")}
    assert ids == {study, "P-99"}
