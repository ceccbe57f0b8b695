"""STOW-RS (PS3.18 10.5): a ``multipart/related; type="application/dicom"`` body parsed as a stream.

Each part is written to a temporary file in the store as it arrives (the body is never held in memory). The
parts are handed to :meth:`InstanceStore.put` only once the body's closing boundary has been seen, so that a
request refused as a whole (400 malformed, 413 too large, client gone) stores nothing. The result lists each
instance as referenced (stored) or failed with its FailureReason; the HTTP layer turns it into the response.
A part whose data set contradicts its file meta (SOP Class or Instance UID) fails with 0xA900; one refused for
want of resources (0xA700) is remembered by its UIDs, read from its first bytes, so that its series is held until
it is sent again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import GatewayError, IngestError, InvalidInstance, OutOfResources
from gateway.ingest.instance import InstanceUIDs, peek_uids
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)

_DICOM = b"application/dicom"
_HEAD_BYTES = 64 << 10  # of a part that cannot be written: kept in memory to learn its UIDs


class StowRequestError(GatewayError):
    """The request as a whole cannot be processed; ``http_status`` says how (400, 413, 415)."""

    def __init__(self, http_status: int, reason: str) -> None:
        super().__init__(reason)
        self.http_status = http_status
        self.reason = reason


@dataclass(frozen=True)
class StowItem:
    """One part's outcome: stored (``failure_reason is None``; ``duplicate`` if it was already held) or failed
    with a DICOM FailureReason."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    failure_reason: int | None = None
    detail: str = ""
    duplicate: bool = False
    patient_id: str | None = None  # of a stored part (for the audit trail; never logged)


@dataclass
class StowResult:
    """All parts of one STOW-RS request, in order."""

    items: list[StowItem] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some failed, 409 all failed (PS3.18 10.5.3)."""
        failed = sum(item.failure_reason is not None for item in self.items)
        if failed == 0:
            return 200
        return 409 if failed == len(self.items) else 202

    def to_dataset(self, base_url: str, study_instance_uid: str | None) -> Dataset:
        """The response body as a dataset (PS3.18 Table 10.5.3-1), ready for ``to_json_dict``."""
        ds = Dataset()
        if study_instance_uid:
            ds.RetrieveURL = f"{base_url}/studies/{study_instance_uid}"
        stored = [_referenced(i, base_url) for i in self.items if i.failure_reason is None]
        ds.ReferencedSOPSequence = Sequence(stored)
        failed = [_failed(i) for i in self.items if i.failure_reason is not None]
        if failed:
            ds.FailedSOPSequence = Sequence(failed)
        return ds


def _referenced(item: StowItem, base_url: str) -> Dataset:
    ds = Dataset()
    ds.ReferencedSOPClassUID = item.sop_class_uid
    ds.ReferencedSOPInstanceUID = item.sop_instance_uid
    ds.RetrieveURL = f"{base_url}/studies/{item.study_instance_uid}/instances/{item.sop_instance_uid}"
    return ds


def _failed(item: StowItem) -> Dataset:
    ds = Dataset()
    ds.ReferencedSOPClassUID = item.sop_class_uid or ""
    ds.ReferencedSOPInstanceUID = item.sop_instance_uid or ""
    ds.FailureReason = item.failure_reason
    return ds


def boundary_of(content_type: str | None) -> bytes:
    """Check a STOW-RS Content-Type and return its multipart boundary.

    Raises
    ------
    StowRequestError
        415 for anything but ``multipart/related; type="application/dicom"``, 400 without a boundary.
    """
    media, params = parse_options_header(content_type or "")
    if media.lower() != b"multipart/related":
        raise StowRequestError(415, 'expected multipart/related; type="application/dicom"')
    part_type = params.get(b"type", _DICOM).lower()
    if part_type != _DICOM:
        raise StowRequestError(
            415, f"part type {part_type.decode('latin-1')!r} is not supported; send application/dicom"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise StowRequestError(400, "multipart/related without a boundary")
    return boundary


class StowReceiver:
    """Feed a STOW-RS body chunk by chunk; blocking (run it in a worker thread).

    Parameters
    ----------
    store
        Where the instances go.
    boundary
        The multipart boundary from the Content-Type.
    max_bytes
        Cap on the whole body; past it :meth:`feed` raises a 413 :class:`StowRequestError`.
    expected_study
        The Study Instance UID in the request URL, if any.
    """

    def __init__(
        self, store: InstanceStore, boundary: bytes, max_bytes: int, expected_study: str | None = None
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.expected_study = expected_study
        self._received = 0
        self._ended = False
        self._part: _Part | None = None
        self._complete: list[_Part] = []  # received whole, stored by finish()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        """Parse the next piece of the body."""
        self._received += len(chunk)
        if self._received > self.max_bytes:
            self.abort()
            raise StowRequestError(413, f"request body exceeds the limit of {self.max_bytes} bytes")
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            self.abort()
            raise StowRequestError(400, f"malformed multipart body: {exc}") from exc

    def finish(self) -> StowResult:
        """Check the body ended with its closing boundary, store every part and return their outcomes."""
        if not self._ended:
            self.abort()
            raise StowRequestError(400, "malformed multipart body: the closing boundary is missing")
        if not self._complete:
            raise StowRequestError(400, "the multipart body holds no part")
        result = StowResult()
        try:
            while self._complete:
                result.items.append(self._complete.pop(0).finish(self.expected_study))
        finally:
            self.abort()
        return result

    def abort(self) -> None:
        """Discard the parts not stored yet (their temporary files are removed)."""
        parts, self._complete = self._complete, []
        if self._part is not None:
            parts.append(self._part)
            self._part = None
        for part in parts:
            part.discard()

    def _part_begin(self) -> None:
        self._part = _Part(self.store)

    def _header_end(self) -> None:
        name = bytes(self._header_field).strip().lower()
        value = bytes(self._header_value).strip()
        self._header_field.clear()
        self._header_value.clear()
        if self._part is not None and name == b"content-type":
            self._part.content_type = parse_options_header(value)[0].lower()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part is not None:
            self._part.write(data[start:end])

    def _part_end(self) -> None:
        part, self._part = self._part, None
        if part is not None:
            part.close()
            self._complete.append(part)

    def _end(self) -> None:
        self._ended = True


class _Part:
    """One part being received into a temporary file."""

    def __init__(self, store: InstanceStore) -> None:
        self.store = store
        self.content_type = _DICOM
        self.failure: IngestError | None = None
        self.path: Path | None = None
        self.file: IO[bytes] | None = None
        self.head = bytearray()  # the first bytes of a part refused for resources
        try:
            store.check_space()
            self.path = store.temp_path()
            self.file = self.path.open("wb")
        except IngestError as exc:
            self.failure = exc

    def write(self, data: bytes) -> None:
        if self.file is None:
            if isinstance(self.failure, OutOfResources) and len(self.head) < _HEAD_BYTES:
                self.head.extend(data[: _HEAD_BYTES - len(self.head)])
            return
        try:
            self.file.write(data)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                self.discard()
                raise
            self.head = self._read_head()
            self.discard()
            self.failure = OutOfResources("disk full while receiving")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def finish(self, expected_study: str | None) -> StowItem:
        self.close()
        if self.failure is None and self.content_type != _DICOM:
            self.failure = InvalidInstance(f"part type {self.content_type.decode('latin-1')!r} is not DICOM")
        if self.failure is not None or self.path is None:
            self.discard()
            return self._refused(self.failure or OutOfResources("no space to receive"))
        uids = peek_uids(self.path)
        try:
            outcome = self.store.put(self.path, source="stow", expected_study=expected_study)
        except IngestError as exc:
            log.warning("STOW-RS part refused with 0x%04X: %s", exc.status, exc.reason)
            return _failure_item(uids, exc)
        info = outcome.instance
        patient_id = info.attributes.get("PatientID")
        return StowItem(
            info.sop_class_uid,
            info.sop_instance_uid,
            info.study_instance_uid,
            duplicate=outcome.duplicate,
            patient_id=None if patient_id is None else str(patient_id),
        )

    def _refused(self, exc: IngestError) -> StowItem:
        """The item of a part never written whole; one refused for resources is remembered by its UIDs."""
        uids = peek_uids(bytes(self.head)) if isinstance(exc, OutOfResources) and self.content_type == _DICOM else None
        if uids is not None and uids.series_instance_uid and uids.sop_instance_uid:
            try:
                self.store.record_refusal(uids.series_instance_uid, uids.sop_instance_uid, exc.reason)
            except Exception:
                log.exception("could not record a STOW-RS part refused for resources: its series will not be held")
        elif isinstance(exc, OutOfResources):
            log.warning("a STOW-RS part refused for resources could not be identified: its series will not be held")
        return _failure_item(uids, exc)

    def _read_head(self) -> bytearray:
        if self.file is None or self.path is None:
            return bytearray()
        with contextlib.suppress(OSError):
            self.file.flush()
        try:
            with self.path.open("rb") as fp:
                return bytearray(fp.read(_HEAD_BYTES))
        except OSError:
            return bytearray()

    def discard(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _failure_item(uids: InstanceUIDs | None, exc: IngestError) -> StowItem:
    known = uids or InstanceUIDs()
    return StowItem(known.sop_class_uid, known.sop_instance_uid, known.study_instance_uid, exc.status, exc.reason)
