"""What one delivery attempt came to, how a DIMSE status is read, and the retry policy (exponential backoff,
given up after a duration rather than a count).

A status either delivers the instance (success, or a warning that is recorded), asks for a later attempt (the
destination is short of resources, or unreachable), records that the destination does not take objects of that
SOP class at all (refused: its configuration says so, not a fault of the result), or dead-letters it (the
destination will never take it as it is: retrying would only repeat the refusal).

Every reason is recorded as one line (:func:`gateway.errors.one_line`); tracebacks go to the log only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydicom import config
from pydicom.uid import UID

from gateway.config import ExportSettings

#: General warning statuses of PS3.7 Annex C that a C-STORE may also answer (the instance is stored).
_GENERAL_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
#: "Resource limitation" (PS3.7 C.5.15): transient, like the C-STORE "Refused: Out of Resources" (0xA7xx).
_RESOURCE_LIMITATION = 0x0213
#: How the reason of a delivery given up after retrying begins (:meth:`RetryPolicy.gives_up`): such a delivery is
#: resent once its destination answers again (:func:`gateway.export.requeue.revive_destination`).
GAVE_UP = "gave up after"
#: "Refused: SOP Class not supported" (PS3.7 C.5.x, PS3.4 B.2.3); also a STOW-RS FailureReason (PS3.18 10.5.3).
SOP_CLASS_NOT_SUPPORTED = 0x0122


class Kind(StrEnum):
    """The kinds of outcome; ``delivered`` and ``warning`` both mean the destination holds the instance.

    ``refused`` means the destination does not take objects of the instance's SOP class (a presentation context
    rejected with "abstract syntax not supported", C-STORE status or STOW-RS FailureReason 0x0122): final, like
    ``dead``, but the destination's choice rather than a failure of the export.
    """

    DELIVERED = "delivered"
    WARNING = "warning"
    RETRY = "retry"
    REFUSED = "refused"
    DEAD = "dead"


@dataclass(frozen=True)
class Item:
    """A claimed delivery, as a sender needs it: which file, and what its presentation context must be."""

    id: int
    job_id: int
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class Outcome:
    """One attempt's result: its kind, the status the destination answered (DIMSE or HTTP) and why."""

    kind: Kind
    reason: str = ""
    status: int | None = None

    @property
    def delivered(self) -> bool:
        """Whether the destination holds the instance now."""
        return self.kind in (Kind.DELIVERED, Kind.WARNING)


def sop_class_text(uid: str) -> str:
    """A SOP Class UID for people: followed by its name where pydicom knows it (a malformed UID is left as is)."""
    name = UID(uid, validation_mode=config.IGNORE).name
    return uid if name == uid else f"{uid} ({name})"


def class_refused(sop_class_uid: str, text: str, status: int | None = None) -> Outcome:
    """A ``refused`` outcome: its reason names the SOP class the destination does not take, then ``text``."""
    named = f" {sop_class_text(sop_class_uid)}" if sop_class_uid else ""
    return Outcome(Kind.REFUSED, f"SOP class{named} not supported, {text}", status)


def dimse_outcome(status: int, comment: str = "", *, sop_class_uid: str = "") -> Outcome:
    """Read a C-STORE response status (PS3.4 B.2.3, PS3.7 Annex C) to an instance of ``sop_class_uid``.

    ``0x0000`` delivers; ``0xB0xx`` and the general warnings deliver with a warning; ``0xA7xx`` (out of
    resources) and ``0x0213`` (resource limitation) retry; ``0x0122`` (SOP class not supported) is refused;
    anything else (``0xA9xx`` data set does not match the SOP class, ``0xCxxx`` cannot understand, ``0x0124``
    not authorized, ...) is dead.
    """
    text = f"status 0x{status:04X}" + (f": {comment}" if comment else "")
    if status == 0x0000:
        return Outcome(Kind.DELIVERED, "", status)
    if status & 0xF000 == 0xB000 or status in _GENERAL_WARNINGS:
        return Outcome(Kind.WARNING, f"warning {text}", status)
    if status & 0xFF00 == 0xA700 or status == _RESOURCE_LIMITATION:
        return Outcome(Kind.RETRY, f"out of resources, {text}", status)
    if status == SOP_CLASS_NOT_SUPPORTED:
        return class_refused(sop_class_uid, text, status)
    return Outcome(Kind.DEAD, f"rejected, {text}", status)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and for how long a transiently failing delivery is tried again, sized for real PACS downtime.

    The wait before attempt ``n + 1`` is ``backoff_initial_s * 2 ** (n - 1)``, capped at ``backoff_max_s``, then
    scaled by a factor in [0.5, 1) drawn at random ("equal jitter"), so that batches failing at the same time do
    not all come back at the same time. A delivery is given up (dead) once ``give_up_after_s`` have passed since
    the first attempt of its round (its first attempt, or the first since an operator's retry or a revival): the
    last wait is shortened so that one attempt falls on that deadline. With ``max_attempts`` set, it is also
    given up after that many attempts, whichever comes first.
    """

    max_attempts: int | None = None
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 600.0
    give_up_after_s: float = 86400.0

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (or None), got {self.max_attempts}")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("backoff_initial_s must be positive and not above backoff_max_s")
        if not self.give_up_after_s > 0:
            raise ValueError(f"give_up_after_s must be positive, got {self.give_up_after_s}")

    @classmethod
    def from_settings(cls, settings: ExportSettings) -> RetryPolicy:
        """The policy of the ``export`` settings."""
        return cls(
            max_attempts=settings.max_attempts,
            backoff_initial_s=settings.backoff_initial_s,
            backoff_max_s=settings.backoff_max_s,
            give_up_after_s=settings.give_up_after_s,
        )

    def gives_up(self, attempts: int, first_attempt_at: float, now: float) -> str | None:
        """Why a delivery is given up after its ``attempts``-th failed attempt of a round begun at
        ``first_attempt_at``, at ``now``; ``None`` while it is tried again."""
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return f"{GAVE_UP} {attempts} attempts"
        if now - first_attempt_at >= self.give_up_after_s:
            return f"{GAVE_UP} {_duration(now - first_attempt_at)} and {attempts} attempts"
        return None

    def next_attempt_at(self, attempts: int, jitter: float, first_attempt_at: float, start: float) -> float:
        """When to try again after the ``attempts``-th failed attempt, waiting from ``start``: the backoff, but
        never later than the round's deadline (``first_attempt_at + give_up_after_s``)."""
        return min(start + self.delay_s(attempts, jitter), first_attempt_at + self.give_up_after_s)

    def delay_s(self, attempts: int, jitter: float) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (``attempts`` >= 1).

        ``jitter`` is a random draw in [0, 1); the deliveries of one batch share one draw, so that a batch that
        failed together is retried together (one association, one request).
        """
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        exponent = min(max(attempts - 1, 0), 62)
        capped = min(self.backoff_max_s, self.backoff_initial_s * 2.0**exponent)
        return capped * (0.5 + 0.5 * jitter)


def _duration(seconds: float) -> str:
    """``90 s``, ``2.5 min``, ``24.0 h``: a duration for people."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
