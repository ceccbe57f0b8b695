"""STOW-RS (PS3.18 10.5): a ``multipart/related; type="application/dicom"`` body parsed as a stream.

Each part is written to a temporary file in the store as it arrives (the body is never held in memory), then
handed to :meth:`InstanceStore.put` when its closing boundary is seen. The result lists each instance as
referenced (stored) or failed with its FailureReason; the HTTP layer turns it into the response.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import GatewayError, IngestError, InvalidInstance, OutOfResources
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)

_DICOM = b"application/dicom"


class StowRequestError(GatewayError):
    """The request as a whole cannot be processed; ``http_status`` says how (400, 413, 415)."""

    def __init__(self, http_status: int, reason: str) -> None:
        super().__init__(reason)
        self.http_status = http_status
        self.reason = reason


@dataclass(frozen=True)
class StowItem:
    """One part's outcome: stored (``failure_reason is None``) or failed with a DICOM FailureReason."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    failure_reason: int | None = None
    detail: str = ""


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
        ds.ReferencedSOPSequence = Sequence(
            [_referenced(i, base_url) for i in self.items if i.failure_reason is None]
        )
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
        self.result = StowResult()
        self._received = 0
        self._ended = False
        self._part: _Part | None = None
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
        """Check the body ended with its closing boundary and return the outcome of every part."""
        if not self._ended:
            self.abort()
            raise StowRequestError(400, "malformed multipart body: the closing boundary is missing")
        if not self.result.items:
            raise StowRequestError(400, "the multipart body holds no part")
        return self.result

    def abort(self) -> None:
        """Discard a part in progress (its temporary file is removed)."""
        if self._part is not None:
            self._part.discard()
            self._part = None

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
            self.result.items.append(part.finish(self.expected_study))

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
        try:
            store.check_space()
            self.path = store.temp_path()
            self.file = self.path.open("wb")
        except IngestError as exc:
            self.failure = exc

    def write(self, data: bytes) -> None:
        if self.file is None:
            return
        try:
            self.file.write(data)
        except OSError as exc:
            self.discard()
            if exc.errno != errno.ENOSPC:
                raise
            self.failure = OutOfResources("disk full while receiving")

    def finish(self, expected_study: str | None) -> StowItem:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.failure is None and self.content_type != _DICOM:
            self.failure = InvalidInstance(f"part type {self.content_type.decode('latin-1')!r} is not DICOM")
        if self.failure is not None or self.path is None:
            self.discard()
            return _failure_item(None, self.failure or OutOfResources("no space to receive"))
        uids = _peek_uids(self.path)
        try:
            outcome = self.store.put(self.path, source="stow", expected_study=expected_study)
        except IngestError as exc:
            log.warning("STOW-RS part refused with 0x%04X: %s", exc.status, exc.reason)
            return _failure_item(uids, exc)
        info = outcome.instance
        return StowItem(info.sop_class_uid, info.sop_instance_uid, info.study_instance_uid)

    def discard(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _failure_item(uids: Dataset | None, exc: IngestError) -> StowItem:
    def uid(keyword: str) -> str | None:
        value = uids.get(keyword) if uids is not None else None
        return str(value) if value else None

    return StowItem(
        uid("SOPClassUID"), uid("SOPInstanceUID"), uid("StudyInstanceUID"), exc.status, exc.reason
    )


def _peek_uids(path: Path) -> Dataset | None:
    """Best-effort read of the UIDs, so that a failure can name the instance it concerns."""
    try:
        return dcmread(
            path,
            stop_before_pixels=True,
            force=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
        )
    except Exception:
        return None
