"""The gateway's exceptions: one tree, translated to DICOM and HTTP statuses only at the edges.

::

    GatewayError
     +-- ConfigError                  bad or missing settings
     +-- IndexSchemaError             the index's schema is newer than this gateway, or not one it can upgrade
     +-- IngestError                  a received instance cannot be accepted (carries a DICOM status)
     |    +-- InvalidInstance         unparseable, truncated, missing or malformed UIDs   (0xC000 range)
     |    +-- UnsupportedTransferSyntax                                                  (0xC122)
     |    +-- StudyMismatch           STOW-RS instance outside the study in the URL       (0xA900)
     |    +-- DataSetMismatch         SOP Class/Instance other than the context's, request's or file meta's (0xA900)
     |    +-- OutOfResources          free disk below the watermark, disk full            (0xA700)
     +-- AssemblyError                a series cannot become a volume with trustworthy geometry (the reason says why)
     |    +-- DecodeError             a frame's pixel data cannot be decoded (names the transfer syntax)
     +-- ModelError                   a model package cannot be registered or loaded (the reason says why)
     |    +-- ManifestError           model.yaml is missing, not YAML, or breaks the schema (names each key)
     |    +-- ModelConflict           name@version already registered with other weights (HTTP 409)
     +-- InferenceError               a model failed on a job's input (fails that job, never the gateway)
     |    +-- OutOfMemory             the device ran out of memory (the batcher splits the batch and retries)
     +-- EncodeError                  results cannot become DICOM objects: SEG, SR, Parametric Map (the reason says why)
     +-- ExportError                  results cannot be queued for export, or a job has nothing to retry (HTTP 409)
     +-- JobConflict                  a job cannot be re-run or cancelled in its state (HTTP 409; the reason says why)
     +-- InvalidQuery                 a QIDO-RS search the index cannot answer (HTTP 400)
     +-- NotFound                     a study, series, instance, job or model the gateway does not hold
     +-- LeaseLost                    a worker's job was reclaimed or handed back: the worker drops it
     +-- RequestBodyTimeout           (gateway.api.limits) an HTTP request body stalled: 408, staged parts removed
"""

from __future__ import annotations


def one_line(text: str, limit: int = 500) -> str:
    """``text`` as a reason is recorded (a job's failure, a delivery's error): one line, at most ``limit``
    characters (whitespace runs, newlines included, become one space). Tracebacks go to the log, never here."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The settings are invalid or incomplete."""


class IndexSchemaError(GatewayError):
    """The index database cannot be brought to this gateway's schema: a newer gateway's revision, or tables that no
    released gateway made; the message names the revisions."""


class IngestError(GatewayError):
    """A received instance cannot be accepted.

    Parameters
    ----------
    reason
        Human-readable reason; never contains patient data.
    status
        The DICOM status (C-STORE Status, STOW-RS FailureReason) that reports it.
    """

    default_status = 0xC000

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = self.default_status if status is None else status


class InvalidInstance(IngestError):
    """The data set cannot be understood (0xC000-0xCFFF, "Error: Cannot understand")."""

    UNPARSEABLE = 0xC000
    MISSING_UID = 0xC001
    TRUNCATED = 0xC002
    INVALID_UID = 0xC003
    default_status = UNPARSEABLE


class UnsupportedTransferSyntax(IngestError):
    """The transfer syntax is not one the gateway accepts (PS3.18 0xC122)."""

    default_status = 0xC122


class StudyMismatch(IngestError):
    """A STOW-RS instance belongs to another study than the one in the request URL (0xA900)."""

    default_status = 0xA900


class DataSetMismatch(IngestError):
    """The data set's SOP Class or Instance UID is not the one declared for it: by the presentation context, the
    C-STORE request or the file meta information (0xA900, "Data Set does not match SOP Class")."""

    default_status = 0xA900


class OutOfResources(IngestError):
    """Not enough free disk to store safely (0xA700, "Refused: Out of Resources")."""

    default_status = 0xA700


class _Reasoned(GatewayError):
    """An error whose message is a ``reason`` shown to users as is (never patient data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotFound(GatewayError):
    """The requested object is not held by the gateway."""


class InvalidQuery(GatewayError, ValueError):
    """A search names an attribute the index cannot match on, or gives a malformed value."""


class AssemblyError(_Reasoned):
    """A series (or stack) cannot be assembled into a volume; ``reason`` says why, without patient data."""


class DecodeError(AssemblyError):
    """A frame cannot be decoded; the message names the transfer syntax and the cause."""


class ModelError(_Reasoned):
    """A model package cannot be registered or loaded: bad manifest, missing or corrupt weights, failed dry run."""


class ManifestError(ModelError):
    """``model.yaml`` is missing, not YAML, or breaks the schema; the reason names each offending key."""


class ModelConflict(ModelError):
    """The same ``name@version`` is already registered with different weights."""


class InferenceError(_Reasoned):
    """A model failed on a job's input; the job fails with this reason, the gateway carries on."""


class ExportError(_Reasoned):
    """Results cannot be queued for export (an unreadable output file), or a job has no dead delivery to retry."""


class JobConflict(_Reasoned):
    """An operator's re-run, cancel or reprocess cannot be done in the job's (or series') current state."""


class OutOfMemory(InferenceError):
    """The device ran out of memory for a batch (CUDA OOM); the batcher splits the batch and retries."""


class EncodeError(_Reasoned):
    """A model's results cannot be encoded as DICOM (SEG, SR, Parametric Map); ``reason`` says why."""


class LeaseLost(GatewayError):
    """A worker's write found its job no longer leased to it (the lease expired and the job was reclaimed, or the
    job was handed back at shutdown): the worker drops the job, whoever holds it now carries on."""
