"""Every kind of audit message the gateway emits validates against the schema of PS3.15 A.5.1 and carries the
codes of PS3.15 A.5.3: EventID, EventActionCode, outcome, roles, and the Patient ID and Study Instance UID where the
standard asks for them, never the patient's name."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.audit import messages as m
from gateway.audit.trail import AuditTrail, StudyTally

from audit_peers import SCHEMA_RNC, audit_schema, schema_rng, validated

STUDY = "1.2.826.0.1.3680043.8.498.1"
PATIENT = "PID-12345"
CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


class Collected:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.messages.append(message)

    def close(self) -> None:
        pass


def one(event: Callable[[AuditTrail], None]) -> Any:
    sink = Collected()
    event(AuditTrail("GW_SITE", [sink], ae_title="GATEWAY"))
    assert len(sink.messages) == 1
    assert b"\n" not in sink.messages[0], "one message, one line"
    return validated(sink.messages[0])


def event_of(root: Any) -> tuple[str, str, str, list[str]]:
    ident = root.find("EventIdentification")
    types = [t.get("csd-code") for t in ident.findall("EventTypeCode")]
    return (
        ident.find("EventID").get("csd-code"),
        ident.get("EventActionCode"),
        ident.get("EventOutcomeIndicator"),
        types,
    )


def objects_by_type(root: Any) -> dict[str, Any]:
    return {
        o.find("ParticipantObjectIDTypeCode").get("csd-code"): o
        for o in root.findall("ParticipantObjectIdentification")
    }


def roles(root: Any) -> dict[str, Any]:
    found = {}
    for p in root.findall("ActiveParticipant"):
        for role in p.findall("RoleIDCode"):
            found[role.get("csd-code")] = p
    return found


def check_study_and_patient(root: Any, sop_classes: dict[str, int]) -> None:
    objects = objects_by_type(root)
    study, patient = objects["110180"], objects["2"]
    assert study.get("ParticipantObjectID") == STUDY
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    counts = {c.get("UID"): int(c.get("NumberOfInstances")) for c in study.iter("SOPClass")}
    assert counts == sop_classes
    assert patient.get("ParticipantObjectID") == PATIENT
    assert (patient.get("ParticipantObjectTypeCode"), patient.get("ParticipantObjectTypeCodeRole")) == ("1", "1")
    assert patient.find("ParticipantObjectName") is None, "no patient name"


def test_the_schema_is_the_standards_and_rejects_what_it_should(tmp_path: Path) -> None:
    text = SCHEMA_RNC.read_text()
    assert "PS3.15" in text and "A.5.1" in text, "the source is named"
    assert b"AuditMessage" in schema_rng()
    not_audit = etree.fromstring(b"<AuditMessage><EventIdentification/></AuditMessage>")
    assert not audit_schema().validate(not_audit)


def test_application_start_and_stop() -> None:
    for started, code in ((True, "110120"), (False, "110121")):
        root = one(lambda t, s=started: t.application_started() if s else t.application_stopped())
        assert event_of(root) == ("110100", "E", "0", [code])
        app = roles(root)["110150"]
        assert app.get("UserID") == "GATEWAY" and app.get("UserIsRequestor") == "false"
        assert root.find("AuditSourceIdentification").get("AuditSourceID") == "GW_SITE"


def test_instances_received_one_per_study() -> None:
    sink = Collected()
    trail = AuditTrail("GW", [sink], ae_title="GATEWAY")
    tally = StudyTally()
    for sop_class in (CT, CT, CT):
        tally.add(STUDY, PATIENT, sop_class)
    tally.add("1.2.3.4", None, CT)
    trail.received("CT_SCANNER", "10.0.0.7", tally)
    assert len(sink.messages) == 2, "one message per study"
    root = validated(sink.messages[0])
    assert event_of(root) == ("110104", "C", "0", [])
    source, destination = roles(root)["110153"], roles(root)["110152"]
    assert (source.get("UserID"), source.get("NetworkAccessPointID"), source.get("UserIsRequestor")) == (
        "CT_SCANNER",
        "10.0.0.7",
        "true",
    )
    assert source.get("NetworkAccessPointTypeCode") == "2"
    assert destination.get("UserID") == "GATEWAY"
    check_study_and_patient(root, {CT: 3})
    assert "2" not in objects_by_type(validated(sink.messages[1])), "no Patient object without a Patient ID"


def test_export_begin_and_transferred() -> None:
    root = one(lambda t: t.export_started("PACS", "pacs.example", STUDY, PATIENT, {SEG: 1}))
    assert event_of(root) == ("110102", "E", "0", [])
    assert roles(root)["110152"].get("UserID") == "PACS"
    assert roles(root)["110152"].get("NetworkAccessPointTypeCode") == "1"
    assert roles(root)["110153"].get("UserIsRequestor") == "true"
    check_study_and_patient(root, {SEG: 1})
    root = one(lambda t: t.instances_exported("PACS", "pacs.example", STUDY, PATIENT, {SEG: 1, CT: 2}))
    assert event_of(root) == ("110104", "R", "0", [])
    check_study_and_patient(root, {SEG: 1, CT: 2})
    failed = one(
        lambda t: t.instances_exported("PACS", None, STUDY, PATIENT, {SEG: 1}, succeeded=False, reason="refused\nA700")
    )
    assert event_of(failed)[2] == "4"
    assert failed.find("EventIdentification/EventOutcomeDescription").text == "refused A700"


def test_query_carries_the_query_string_base64() -> None:
    query = "/dicomweb/studies?PatientID=PID-12345&limit=10"
    root = one(lambda t: t.query("reader", "127.0.0.1", query))
    assert event_of(root) == ("110112", "E", "0", [])
    (obj,) = root.findall("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectID") == m.STUDY_ROOT_FIND
    assert obj.find("ParticipantObjectIDTypeCode").get("csd-code") == "110181"
    assert base64.b64decode(obj.find("ParticipantObjectQuery").text).decode() == query
    assert roles(root)["110153"].get("UserID") == "reader"


def test_authentication_failure() -> None:
    root = one(lambda t: t.authentication_failed(None, "192.0.2.4"))
    assert event_of(root) == ("110114", "E", "4", ["110122"])
    who = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert [(p.get("UserID"), p.get("NetworkAccessPointID")) for p in who] == [("unknown", "192.0.2.4")]


def test_association_rejected_is_a_node_authentication_alert() -> None:
    root = one(lambda t: t.association_rejected("INTRUDER", "192.0.2.9", "not in the allow-list"))
    assert event_of(root) == ("110113", "E", "4", ["110126"])
    (subject,) = root.findall("ParticipantObjectIdentification")
    assert subject.get("ParticipantObjectID") == "INTRUDER"
    assert subject.find("ParticipantObjectIDTypeCode").get("csd-code") == "110182"


@pytest.mark.parametrize("change", ["registered", "enabled", "disabled", "removed"])
def test_model_changes_are_software_configuration_alerts(change: str) -> None:
    root = one(lambda t: t.model_changed("ops-token", "lung@1.0", change))
    assert event_of(root) == ("110113", "E", "0", ["110131"])
    (subject,) = root.findall("ParticipantObjectIdentification")
    assert subject.get("ParticipantObjectID") == "model:lung@1.0"
    detail = subject.find("ParticipantObjectDetail")
    assert base64.b64decode(detail.get("value")).decode() == f"model lung@1.0 {change}"
    performers = [p.get("UserID") for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert performers == ["ops-token"]


def test_configuration_change_alert() -> None:
    root = one(
        lambda t: t.security_alert(
            "admin", "token 'viewer' added", subject="http.tokens", alert=m.SECURITY_CONFIGURATION
        )
    )
    assert event_of(root) == ("110113", "E", "0", ["110129"])


def test_study_deleted() -> None:
    root = one(lambda t: t.study_deleted(STUDY, PATIENT, {CT: 40}))
    assert event_of(root) == ("110105", "D", "0", [])
    check_study_and_patient(root, {CT: 40})
    assert objects_by_type(root)["110180"].get("ParticipantObjectDataLifeCycle") == "15"


def test_xml_in_values_is_escaped_not_injected() -> None:
    root = one(lambda t: t.query("<x/>", "127.0.0.1", "/dicomweb/studies?PatientName=</ParticipantObjectQuery>"))
    assert roles(root)["110153"].get("UserID") == "<x/>"


def test_a_disabled_trail_records_nothing_and_a_failing_sink_does_not_raise() -> None:
    assert not AuditTrail.disabled().enabled
    AuditTrail.disabled().application_started()

    class Broken(Collected):
        def send(self, message: bytes) -> None:
            raise OSError("disk gone")

    good = Collected()
    trail = AuditTrail("GW", [Broken(), good])
    trail.application_started()
    assert trail.failed == 1 and len(good.messages) == 1, "the next sink still gets it"
