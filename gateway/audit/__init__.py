"""The audit trail: DICOM audit messages (PS3.15 A.5, IHE ATNA) of what the gateway did, to an append-only file
and optionally to a syslog audit repository (RFC 5424 over UDP, or TLS per RFC 5425).

- :mod:`gateway.audit.messages`: one builder per kind of event, producing the ``AuditMessage`` XML;
- :mod:`gateway.audit.sinks`: the file and syslog sinks;
- :mod:`gateway.audit.trail`: :class:`~gateway.audit.trail.AuditTrail`, one method per event, which the stages
  receive as a dependency.
"""

from gateway.audit.trail import AuditTrail, StudyTally

__all__ = ["AuditTrail", "StudyTally"]
