"""The audit trail: one method per event the gateway reports (PS3.15 A.5.3), over the file and syslog sinks.

The stages receive an :class:`AuditTrail` (constructor argument, or the app state for the HTTP faces); none reads
it from a module global. A method never raises and never waits for the network: a message that cannot be written
or sent is counted and logged (without its content). :meth:`AuditTrail.disabled` makes one that records nothing
(``audit.enabled: false``, and the default of stages built without one).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.audit import messages as m
from gateway.audit.sinks import FileSink, Sink, SyslogSink
from gateway.config import AuditSettings

log = logging.getLogger(__name__)


@dataclass
class StudyTally:
    """Instances counted per study (its Patient ID and SOP Classes), for one Instances Transferred per study."""

    _studies: dict[str, tuple[str | None, Counter[str]]] = field(default_factory=dict)

    def add(self, study_instance_uid: str, patient_id: str | None, sop_class_uid: str) -> None:
        """Count one instance."""
        known, counts = self._studies.setdefault(study_instance_uid, (patient_id, Counter()))
        if known is None and patient_id:
            self._studies[study_instance_uid] = (patient_id, counts)
        counts[sop_class_uid] += 1

    def studies(self) -> list[m.Study]:
        """The studies counted, in the order first seen."""
        return [m.Study(uid, pid, dict(counts)) for uid, (pid, counts) in self._studies.items()]

    def __bool__(self) -> bool:
        return bool(self._studies)


class AuditTrail:
    """Builds each event's audit message and hands it to every sink (the file first).

    Parameters
    ----------
    source_id
        The AuditSourceID of every message (``audit.source_id``).
    sinks
        Where messages go; none: a disabled trail.
    ae_title
        The gateway's AE title: its UserID as a participant (``source_id`` if not given).
    """

    def __init__(self, source_id: str, sinks: Sequence[Sink] = (), *, ae_title: str | None = None) -> None:
        self.source_id = source_id
        self.sinks = list(sinks)
        me = ae_title or source_id
        host = socket.gethostname()
        #: The gateway as an active participant: the application (its AE title), this process, this machine.
        self.application = m.Participant(me, False, (m.APPLICATION,), host, alternative_user_id=str(os.getpid()))
        self._me = me
        self._host = host
        #: Messages a sink refused with an unexpected error.
        self.failed = 0

    @classmethod
    def from_settings(cls, settings: AuditSettings, data_dir: Path, *, ae_title: str | None = None) -> AuditTrail:
        """The trail ``settings`` configure: the file (``audit.file``, else ``audit/audit.log`` in ``data_dir``)
        and, with ``audit.syslog``, the repository; a disabled one when ``audit.enabled`` is false."""
        if not settings.enabled:
            return cls.disabled(settings.source_id)
        sinks: list[Sink] = [FileSink(settings.file or data_dir / "audit" / "audit.log")]
        if settings.syslog is not None:
            sinks.append(SyslogSink(settings.syslog, settings.source_id))
        return cls(settings.source_id, sinks, ae_title=ae_title)

    @classmethod
    def disabled(cls, source_id: str = "GATEWAY") -> AuditTrail:
        """A trail that records nothing."""
        return cls(source_id)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere."""
        return bool(self.sinks)

    def emit(self, message: bytes) -> None:
        """Hand ``message`` to every sink; a sink's failure is counted and logged, never raised."""
        for sink in self.sinks:
            try:
                sink.send(message)
            except Exception:
                self.failed += 1
                log.exception("audit sink %s failed; the message is not in it", type(sink).__name__)

    def close(self) -> None:
        """Send what is queued and close the sinks (the file last)."""
        for sink in reversed(self.sinks):
            try:
                sink.close()
            except Exception:
                log.exception("closing audit sink %s failed", type(sink).__name__)
        self.sinks = []

    # --- events ---------------------------------------------------------------------------------------------

    def _node(self, *, requestor: bool, role: m.Code) -> m.Participant:
        return m.Participant(self._me, requestor, (role,), self._host, alternative_user_id=str(os.getpid()))

    def _send(self, build: Callable[..., bytes], *args: Any, **kwargs: Any) -> None:
        if not self.sinks:
            return
        try:
            message = build(*args, **kwargs)
        except Exception:
            self.failed += 1
            log.exception("building an audit message failed")
            return
        self.emit(message)

    def application_started(self) -> None:
        """Application Activity: the gateway started."""
        self._send(m.application_activity, self.application, self.source_id, started=True)

    def application_stopped(self) -> None:
        """Application Activity: the gateway stopped."""
        self._send(m.application_activity, self.application, self.source_id, started=False)

    def instances_received(
        self,
        user: str,
        remote_host: str | None,
        study_instance_uid: str,
        patient_id: str | None,
        sop_classes: Mapping[str, int],
    ) -> None:
        """DICOM Instances Transferred (Create): ``user`` (a calling AE title, or a token's name for STOW-RS) at
        ``remote_host`` sent instances of one study, counted per SOP Class, which the gateway stored."""
        source = m.Participant(user, True, (m.SOURCE,), remote_host)
        study = m.Study(study_instance_uid, patient_id, dict(sop_classes))
        self._send(
            m.instances_transferred,
            source,
            self._node(requestor=False, role=m.DESTINATION),
            study,
            self.source_id,
            action="C",
        )

    def received(self, user: str, remote_host: str | None, tally: StudyTally) -> None:
        """One :meth:`instances_received` per study of ``tally``."""
        for study in tally.studies():
            self.instances_received(user, remote_host, study.study_instance_uid, study.patient_id, study.sop_classes)

    def export_started(
        self,
        destination: str,
        remote_host: str | None,
        study_instance_uid: str,
        patient_id: str | None,
        sop_classes: Mapping[str, int],
    ) -> None:
        """Begin Transferring DICOM Instances: the gateway starts sending instances of one study to
        ``destination`` (its AE title or name) at ``remote_host``."""
        study = m.Study(study_instance_uid, patient_id, dict(sop_classes))
        target = m.Participant(destination, False, (m.DESTINATION,), remote_host)
        self._send(m.begin_transferring, self._node(requestor=True, role=m.SOURCE), target, study, self.source_id)

    def instances_exported(
        self,
        destination: str,
        remote_host: str | None,
        study_instance_uid: str,
        patient_id: str | None,
        sop_classes: Mapping[str, int],
        *,
        succeeded: bool = True,
        reason: str | None = None,
    ) -> None:
        """DICOM Instances Transferred (Read): the gateway sent instances of one study to ``destination``;
        ``succeeded`` false (with ``reason``, no patient data) for a delivery that failed (minor failure)."""
        study = m.Study(study_instance_uid, patient_id, dict(sop_classes))
        target = m.Participant(destination, False, (m.DESTINATION,), remote_host)
        self._send(
            m.instances_transferred,
            self._node(requestor=True, role=m.SOURCE),
            target,
            study,
            self.source_id,
            action="R",
            outcome=m.SUCCESS if succeeded else m.MINOR_FAILURE,
            description=reason,
        )

    def query(self, user: str | None, remote_host: str | None, query_string: str) -> None:
        """Query: ``user`` (a token's name; ``anonymous`` for an anonymous loopback read) searched with the
        QIDO-RS ``query_string`` (path and parameters, as sent)."""
        requestor = m.Participant(user or "anonymous", True, (m.SOURCE,), remote_host)
        responder = self._node(requestor=False, role=m.DESTINATION)
        self._send(m.query, requestor, responder, query_string.encode("utf-8"), self.source_id)

    def authentication_failed(self, user: str | None, remote_host: str | None) -> None:
        """User Authentication (minor failure): a missing or unknown token (``user`` None) or a token lacking
        the scope (``user`` its name) from ``remote_host``."""
        who = m.Participant(user or "unknown", True, host=remote_host)
        self._send(
            m.user_authentication,
            who,
            self._node(requestor=False, role=m.APPLICATION),
            self.source_id,
            outcome=m.MINOR_FAILURE,
        )

    def association_rejected(self, calling_ae: str, remote_host: str | None, reason: str) -> None:
        """Security Alert (Node Authentication, minor failure): a DICOM association was rejected."""
        performer = m.Participant(calling_ae or "unknown", True, host=remote_host)
        self._send(
            m.security_alert,
            m.NODE_AUTHENTICATION,
            self._node(requestor=False, role=m.APPLICATION),
            calling_ae or "unknown",
            f"association rejected: {reason}",
            self.source_id,
            subject_type=m.NODE_ID,
            performer=performer,
            outcome=m.MINOR_FAILURE,
        )

    def security_alert(
        self,
        user: str | None,
        what: str,
        *,
        subject: str,
        alert: m.Code = m.SOFTWARE_CONFIGURATION,
        remote_host: str | None = None,
    ) -> None:
        """Security Alert: ``user`` (a token's name, an operator; None: the gateway itself) changed ``subject``
        (e.g. ``model:NAME@VERSION``); ``what`` says the change. ``alert`` is a CID 403 code (Software
        Configuration by default; Security or Network Configuration for tokens and destinations)."""
        performer = None if user is None else m.Participant(user, True, host=remote_host)
        self._send(
            m.security_alert,
            alert,
            self._node(requestor=user is None, role=m.APPLICATION),
            subject,
            what,
            self.source_id,
            performer=performer,
        )

    def model_changed(self, by: str | None, ref: str, change: str) -> None:
        """Security Alert (Software Configuration): the model version ``ref`` was ``change``-d (registered,
        enabled, disabled, removed) by ``by``."""
        self.security_alert(by, f"model {ref} {change}", subject=f"model:{ref}")

    def study_deleted(
        self,
        study_instance_uid: str,
        patient_id: str | None,
        sop_classes: Mapping[str, int] | None = None,
        *,
        by: str | None = None,
    ) -> None:
        """DICOM Study Deleted: instances of a study were purged (by retention, or ``by`` an operator)."""
        requestor = self._node(requestor=True, role=m.APPLICATION) if by is None else m.Participant(by, True)
        study = m.Study(study_instance_uid, patient_id, dict(sop_classes or {}))
        self._send(m.study_deleted, requestor, study, self.source_id)
