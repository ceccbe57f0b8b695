"""End to end: a study goes into a running gateway (DCMTK ``storescu``), its results out to a DICOM node
(the minimal pynetdicom SCP), a QIDO-RS search and a refused token follow; a syslog audit repository over TLS
(RFC 5425) receives the expected sequence of audit messages, each valid against the schema of PS3.15 A.5.1, and the
application log holds no patient data."""

from __future__ import annotations

import base64
import logging
import subprocess
from pathlib import Path

import httpx
import pytest

from gateway.config import (
    AuditSettings,
    AuditSyslogSettings,
    ClientTLSSettings,
    DicomSettings,
    ExportSettings,
    JobsSettings,
    Settings,
)
from gateway.synth.ct import write_synthetic_ct

from audit_peers import TlsReceiver, validated
from conftest import ADMIN, LiveServer, make_settings, require_tool
from peers import MinimalSCP, free_port, pki, wait_until

pytestmark = pytest.mark.slow

MODELS = Path(__file__).resolve().parents[2] / "models"
PATIENT_ID = "AUDIT-PID-4711"


def settings_for(tmp_path: Path, receiver: TlsReceiver, ca: Path, pacs: MinimalSCP) -> Settings:
    return make_settings(
        tmp_path / "data",
        dicom=DicomSettings(host="127.0.0.1", port=free_port()),
        jobs=JobsSettings(workers=1, poll_s=0.05),
        export=ExportSettings(
            destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
            default=["pacs"],
            unmapped="default",
            backoff_initial_s=0.1,
            poll_s=0.05,
        ),
        audit=AuditSettings(
            source_id="GW-TEST",
            syslog=AuditSyslogSettings(
                host="127.0.0.1", port=receiver.port, transport="tls", tls=ClientTLSSettings(ca_bundle=ca)
            ),
        ),
    )


def register_tissue_model(settings: Settings) -> None:
    from gateway.registry.registry import Registry, RegistryIndex

    index = RegistryIndex(settings.store)
    try:
        registry = Registry(index)
        registry.register(MODELS / "ct-tissue")
        registry.enable("ct-tissue")
    finally:
        index.close()


def events(messages: list[bytes]) -> list[tuple[str, str, str]]:
    """(EventID, EventActionCode, first EventTypeCode or '') of each message, each validated."""
    found = []
    for message in messages:
        ident = validated(message).find("EventIdentification")
        types = ident.findall("EventTypeCode")
        found.append(
            (
                ident.find("EventID").get("csd-code"),
                ident.get("EventActionCode"),
                types[0].get("csd-code") if types else "",
            )
        )
    return found


def test_study_in_results_out_query_and_refusal_reach_the_audit_repository(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storescu = require_tool("storescu")
    material = pki(tmp_path / "pki")
    series = write_synthetic_ct(tmp_path / "ct", 6, rows=64, columns=64, seed=3, patient_id=PATIENT_ID)
    caplog.set_level(logging.INFO)
    with TlsReceiver(material) as receiver, MinimalSCP(tmp_path / "pacs") as pacs:
        settings = settings_for(tmp_path, receiver, material["ca"], pacs)
        register_tissue_model(settings)
        with LiveServer(settings, start_dimse=True) as server:
            files = sorted(str(p) for p in (tmp_path / "ct").glob("*.dcm"))
            sent = subprocess.run(
                [storescu, "-aet", "SCANNER", "-aec", "GATEWAY", "127.0.0.1", str(settings.dicom.port), *files],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: any(pacs.outdir.iterdir()), timeout_s=240, what="results at the DICOM node")
            wait_until(
                lambda: [e[0] for e in events(receiver.messages())].count("110104") >= 2,
                timeout_s=60,
                what="the export's Instances Transferred",
            )
            query = httpx.get(f"{server.url}/dicomweb/studies?PatientID={PATIENT_ID}", headers=ADMIN, timeout=30)
            assert query.status_code == 200 and len(query.json()) == 1
            refused = httpx.get(f"{server.url}/dicomweb/studies", headers={"Authorization": "Bearer wrong"}, timeout=30)
            assert refused.status_code == 401
            wait_until(lambda: len(receiver.messages()) >= 6, timeout_s=30, what="the query and the refusal")
        messages = receiver.wait_for(7)
    seen = events(messages)
    expected = [
        ("110100", "E", "110120"),  # Application Activity: start
        ("110104", "C", ""),  # DICOM Instances Transferred: the study received
        ("110102", "E", ""),  # Begin Transferring DICOM Instances: the results to the node
        ("110104", "R", ""),  # DICOM Instances Transferred: sent
        ("110112", "E", ""),  # Query
        ("110114", "E", "110122"),  # User Authentication: the refused token
        ("110100", "E", "110121"),  # Application Activity: stop
    ]
    positions = [seen.index(event) for event in expected]
    assert positions == sorted(positions), seen

    received = validated(messages[seen.index(expected[1])])
    objects = {o.get("ParticipantObjectID"): o for o in received.findall("ParticipantObjectIdentification")}
    assert set(objects) == {series.study_instance_uid, PATIENT_ID}
    counts = [int(c.get("NumberOfInstances")) for c in objects[series.study_instance_uid].iter("SOPClass")]
    assert counts == [6]
    assert b"SYNTH" not in b"".join(messages), "no patient name in any audit message"
    queried = validated(messages[seen.index(expected[4])]).find(
        "ParticipantObjectIdentification/ParticipantObjectQuery"
    )
    assert PATIENT_ID in base64.b64decode(queried.text).decode()

    audit_file = settings.store.data_dir / "audit" / "audit.log"
    assert len(audit_file.read_bytes().splitlines()) >= len(messages), "the file has every message too"
    # The gateway's own log (the test's HTTP client logs its URLs, query included, under "httpx").
    ours = ("gateway", "uvicorn", "pynetdicom")
    log_text = "\n".join(
        r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name.split(".")[0] in ours
    )
    assert "DICOM listener" in log_text, "the application log was captured"
    for secret in (PATIENT_ID, series.study_instance_uid, "SYNTH^PHANTOM", *series.sop_instance_uids):
        assert secret not in log_text, f"patient data in the application log: {secret}"
