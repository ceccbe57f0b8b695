"""DICOM audit messages (PS3.15 A.5, the IHE ATNA format): one builder per kind of event the gateway reports.

Each builder returns the ``AuditMessage`` XML of the schema of PS3.15 A.5.1, with the codes PS3.15 A.5.3 asks for
(DCM CID 400 Audit Event ID, CID 401 Audit Active Participant Role ID Code, CID 403 Security Alert Type Code,
CID 404 Audit Participant Object ID Type Code, and the RFC 3881 codes of A.5.1.2). A message carries what the
standard asks for and nothing more: the Patient ID and the Study Instance UID, the SOP Classes and counts; never the
patient's name or other demographics.

A message is one line (no line break inside it: descriptions are flattened), so an audit file holds one message per
line.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

#: EventActionCode (PS3.15 A.5.2): Create, Read, Update, Delete, Execute.
Action = Literal["C", "R", "U", "D", "E"]

#: EventOutcomeIndicator (PS3.15 A.5.2): success, minor failure, serious failure, major failure.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = "0", "4", "8", "12"


@dataclass(frozen=True)
class Code:
    """A coded value (``csd-code``, ``codeSystemName``, ``originalText``: the Code Meaning)."""

    value: str
    scheme: str
    meaning: str

    def element(self, parent: ET.Element, tag: str) -> ET.Element:
        """Add it to ``parent`` as ``tag``."""
        return ET.SubElement(
            parent, tag, {"csd-code": self.value, "codeSystemName": self.scheme, "originalText": self.meaning}
        )


def _dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


# DCM CID 400, Audit Event ID
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
BEGIN_TRANSFERRING = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
# DCM CID 401 Audit Event Type Code (Application Activity, User Authentication)
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
# DCM CID 402 Audit Active Participant Role ID Code
APPLICATION = _dcm("110150", "Application")
APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
DESTINATION = _dcm("110152", "Destination Role ID")
SOURCE = _dcm("110153", "Source Role ID")
# DCM CID 403 Security Alert Type Code
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
NETWORK_CONFIGURATION = _dcm("110128", "Network Configuration")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
# DCM CID 404 Audit Participant Object ID Type Code, and RFC 3881's (PS3.15 A.5.1.2.4)
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
NODE_ID = _dcm("110182", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")

#: The SOP Class a QIDO-RS search stands for in a Query message: Study Root Query/Retrieve - FIND (PS3.4 C.6.2).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: who (``user_id``: an AE title, a token's name, a process), in which role, from where.

    ``host`` is the NetworkAccessPointID: an IP address (type 2) or a machine name (type 1).
    """

    user_id: str
    requestor: bool
    roles: tuple[Code, ...] = ()
    host: str | None = None
    alternative_user_id: str | None = None

    def element(self, parent: ET.Element) -> None:
        """Add it to ``parent`` as an ``ActiveParticipant``."""
        attrs = {"UserID": self.user_id or "unknown", "UserIsRequestor": "true" if self.requestor else "false"}
        if self.alternative_user_id:
            attrs["AlternativeUserID"] = self.alternative_user_id
        if self.host:
            attrs["NetworkAccessPointID"] = self.host
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(self.host) else "1"
        node = ET.SubElement(parent, "ActiveParticipant", attrs)
        for role in self.roles:
            role.element(node, "RoleIDCode")


@dataclass(frozen=True)
class Study:
    """A study in a message: its Study Instance UID, the Patient ID, and how many instances of which SOP Class."""

    study_instance_uid: str
    patient_id: str | None = None
    sop_classes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """The EventIdentification: what happened, how it ended, when."""

    event_id: Code
    action: Action
    outcome: str = SUCCESS
    types: tuple[Code, ...] = ()
    description: str | None = None
    when: datetime.datetime | None = None


def build(
    event: Event, participants: Sequence[Participant], source_id: str, objects: Sequence[ET.Element] = ()
) -> bytes:
    """The ``AuditMessage`` of ``event`` as UTF-8 XML on one line (PS3.15 A.5.1).

    Parameters
    ----------
    event
        The event identification.
    participants
        The active participants (at least one).
    source_id
        The AuditSourceID (``audit.source_id``); the source type is 4, an application server process.
    objects
        ``ParticipantObjectIdentification`` elements (:func:`study_object`, :func:`patient_object`, ...).
    """
    if not participants:
        raise ValueError("participants: an audit message has at least one active participant")
    when = event.when or datetime.datetime.now(datetime.UTC)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": when.astimezone(datetime.UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": event.outcome,
        },
    )
    event.event_id.element(ident, "EventID")
    for code in event.types:
        code.element(ident, "EventTypeCode")
    if event.description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _one_line(event.description)
    for participant in participants:
        participant.element(root)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})
    root.extend(objects)
    text: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return text


def participant_object(
    object_id: str,
    id_type: Code,
    *,
    type_code: str,
    role: str | None = None,
    life_cycle: str | None = None,
    query: bytes | None = None,
    details: Mapping[str, bytes] | None = None,
) -> ET.Element:
    """A ``ParticipantObjectIdentification`` (PS3.15 A.5.1): ``type_code`` and ``role`` are the codes of
    A.5.1.2.2; ``query`` goes base64-encoded in ``ParticipantObjectQuery``, each detail in a base64 value pair."""
    attrs = {"ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code}
    if role is not None:
        attrs["ParticipantObjectTypeCodeRole"] = role
    if life_cycle is not None:
        attrs["ParticipantObjectDataLifeCycle"] = life_cycle
    node = ET.Element("ParticipantObjectIdentification", attrs)
    id_type.element(node, "ParticipantObjectIDTypeCode")
    if query is not None:
        ET.SubElement(node, "ParticipantObjectQuery").text = base64.b64encode(query).decode("ascii")
    for name, value in (details or {}).items():
        ET.SubElement(node, "ParticipantObjectDetail", {"type": name, "value": base64.b64encode(value).decode()})
    return node


def study_object(study: Study, *, life_cycle: str | None = None) -> ET.Element:
    """The Study participant (system object, role Report, ID type Study Instance UID) with one ``SOPClass`` per
    SOP Class and its number of instances (PS3.15 A.5.3.2)."""
    node = participant_object(
        study.study_instance_uid, STUDY_INSTANCE_UID, type_code="2", role="3", life_cycle=life_cycle
    )
    if study.sop_classes:
        description = ET.SubElement(node, "ParticipantObjectDescription")
        for uid, count in sorted(study.sop_classes.items()):
            ET.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
    return node


def patient_object(patient_id: str) -> ET.Element:
    """The Patient participant (person, role Patient, ID type Patient Number): its Patient ID, no name."""
    return participant_object(patient_id, PATIENT_NUMBER, type_code="1", role="1")


def study_objects(study: Study, *, life_cycle: str | None = None) -> list[ET.Element]:
    """The Study participant and, when the Patient ID is known, the Patient participant."""
    objects = [study_object(study, life_cycle=life_cycle)]
    if study.patient_id:
        objects.append(patient_object(study.patient_id))
    return objects


# --- one builder per kind of event (PS3.15 A.5.3) ----------------------------------------------------------------


def application_activity(application: Participant, source_id: str, *, started: bool, outcome: str = SUCCESS) -> bytes:
    """Application Activity (A.5.3.1): the gateway started or stopped; ``application`` has the Application role."""
    event = Event(APPLICATION_ACTIVITY, "E", outcome, (APPLICATION_START if started else APPLICATION_STOP,))
    return build(event, [application], source_id)


def instances_transferred(
    source: Participant,
    destination: Participant,
    study: Study,
    source_id: str,
    *,
    action: Action,
    outcome: str = SUCCESS,
    description: str | None = None,
) -> bytes:
    """DICOM Instances Transferred (A.5.3.4) of one study: ``action`` C when the gateway stored new instances it
    received, R when it sent instances it holds; ``source`` and ``destination`` carry the Source and Destination
    roles."""
    event = Event(INSTANCES_TRANSFERRED, action, outcome, description=description)
    life_cycle = "2" if action == "C" else "10"  # Import / Copy; Export / Copy to target
    return build(event, [source, destination], source_id, study_objects(study, life_cycle=life_cycle))


def begin_transferring(source: Participant, destination: Participant, study: Study, source_id: str) -> bytes:
    """Begin Transferring DICOM Instances (A.5.3.3) of one study, from ``source`` to ``destination``."""
    event = Event(BEGIN_TRANSFERRING, "E")
    return build(event, [source, destination], source_id, study_objects(study))


def query(
    requestor: Participant, responder: Participant, query_text: bytes, source_id: str, *, outcome: str = SUCCESS
) -> bytes:
    """Query (A.5.3.10): the query as it came (a QIDO-RS query string) in ParticipantObjectQuery, the SOP Class
    it stands for (Study Root FIND) as the object's ID."""
    obj = participant_object(STUDY_ROOT_FIND, SOP_CLASS_UID, type_code="2", role="3", query=query_text)
    return build(Event(QUERY, "E", outcome), [requestor, responder], source_id, [obj])


def user_authentication(user: Participant, node: Participant, source_id: str, *, outcome: str) -> bytes:
    """User Authentication (A.5.3.12) of a login attempt: ``user`` the one who tried (a token's name, or
    ``unknown``) and where from, ``node`` the gateway that authenticated it."""
    return build(Event(USER_AUTHENTICATION, "E", outcome, (LOGIN,)), [user, node], source_id)


def security_alert(
    alert: Code,
    reporter: Participant,
    subject_id: str,
    description: str,
    source_id: str,
    *,
    subject_type: Code = URI,
    performer: Participant | None = None,
    outcome: str = SUCCESS,
) -> bytes:
    """Security Alert (A.5.3.11) of type ``alert`` (CID 403): ``reporter`` reports it, ``performer`` (if given)
    did it; the alert subject is ``subject_id`` and ``description`` says what happened (in the event's outcome
    description and the subject's ``Alert Description`` detail)."""
    participants = [reporter] if performer is None else [reporter, performer]
    subject = participant_object(
        subject_id,
        subject_type,
        type_code="2",
        role="13",
        details={"Alert Description": _one_line(description).encode("utf-8")},
    )
    event = Event(SECURITY_ALERT, "E", outcome, (alert,), description=description)
    return build(event, participants, source_id, [subject])


def study_deleted(requestor: Participant, study: Study, source_id: str) -> bytes:
    """DICOM Study Deleted (A.5.3.6): ``requestor`` (the retention worker, or whoever purged) deleted the
    instances of ``study`` (the Study participant's life cycle: permanent erasure)."""
    return build(Event(STUDY_DELETED, "D"), [requestor], source_id, study_objects(study, life_cycle="15"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
