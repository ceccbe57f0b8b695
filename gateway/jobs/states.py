"""Job states. Later stages add transitions; a job only moves forward, or to ``failed`` with a reason."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job stands."""

    RECEIVED = "received"
    ASSEMBLING = "assembling"
    ASSEMBLED = "assembled"
    INFERRING = "inferring"
    INFERRED = "inferred"
    SKIPPED = "skipped"  # no enabled model applies: the job's routing decisions say why
    ENCODING = "encoding"
    ENCODED = "encoded"
    EXPORTED = "exported"
    FAILED = "failed"
