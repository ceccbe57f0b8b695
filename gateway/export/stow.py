"""The STOW-RS sender of the export queue: one ``multipart/related`` request per batch (PS3.18 10.5).

Each file goes as stored, one ``application/dicom`` part each, streamed from disk (the request carries its
``Content-Length``; nothing is held whole in memory). The answer is read per instance: 200 delivers all; 202
delivers those in the ReferencedSOPSequence (a WarningReason is recorded) and fails those in the
FailedSOPSequence with their FailureReason (0xA7xx retries, 0x0122 "SOP class not supported" is refused, others
are dead); 408, 429 and 5xx and network errors retry; 400, 409, 415 and other client errors are dead (an
instance-level 0xA7xx FailureReason still retries, 0x0122 is still refused).

FailureReason 0x0124 ("not authorized") is dead, not refused: it says the origin lacks a permission (a token, an
AE title, a study it may not write to), which is a fault to repair, and it may well apply to every instance sent;
counting it as the destination's choice would let a job whose results reached nobody end ``exported``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx

from gateway.config import StowDestination
from gateway.export.destinations import Report, client_ssl_context
from gateway.export.outcome import SOP_CLASS_NOT_SUPPORTED, Item, Kind, Outcome, class_refused

__all__ = ["StowSender", "stow_outcomes"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_MAX_RESPONSE_BYTES = 16 << 20  # a STOW-RS answer lists instances; anything bigger is not one
_RETRY_HTTP = frozenset({408, 425, 429})
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


class StowSender:
    """STOW-RS client for one destination (thread-safe: one pooled ``httpx.Client``).

    Parameters
    ----------
    destination
        The URL to POST to, an optional bearer token and optional TLS settings.
    timeout_s
        Connect, read and write timeout of each request.
    """

    def __init__(self, destination: StowDestination, *, timeout_s: float) -> None:
        self.url = destination.stow_url
        headers = {"Accept": "application/dicom+json"}
        if destination.token is not None:
            headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
        verify: Any = client_ssl_context(destination.tls) if destination.tls else True
        self._client = httpx.Client(timeout=timeout_s, headers=headers, verify=verify, follow_redirects=False)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def send(self, items: Sequence[Item], report: Report, stopping: Callable[[], bool]) -> None:
        """POST ``items`` in one request and report each one's outcome from the answer."""
        sizes: list[tuple[Item, int]] = []
        for item in items:
            try:
                sizes.append((item, item.path.stat().st_size))
            except OSError as exc:
                report(item, Outcome(Kind.DEAD, f"the output file cannot be read: {type(exc).__name__}"))
        if not sizes or stopping():
            return
        for item, outcome in zip((i for i, _ in sizes), self._post(sizes), strict=True):
            report(item, outcome)

    def _post(self, sizes: list[tuple[Item, int]]) -> list[Outcome]:
        boundary = uuid.uuid4().hex
        body = _Body(sizes, boundary)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(body.length),
        }
        items = [item for item, _ in sizes]
        try:
            with self._client.stream("POST", self.url, content=iter(body), headers=headers) as response:
                content = _read_limited(response)
        except (httpx.HTTPError, OSError) as exc:
            reason = f"STOW-RS request failed: {type(exc).__name__}: {exc}"
            return [Outcome(Kind.RETRY, reason)] * len(items)
        return stow_outcomes(response.status_code, _json(content), items)


class _Body:
    """The multipart body, streamed from the files; its length is known before the first byte is sent."""

    def __init__(self, sizes: list[tuple[Item, int]], boundary: str) -> None:
        self.sizes = sizes
        self.head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self.tail = f"--{boundary}--\r\n".encode()
        self.length = sum(len(self.head) + size + 2 for _, size in sizes) + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        for item, size in self.sizes:
            yield self.head
            yield from _file_chunks(item, size)
            yield b"\r\n"
        yield self.tail


def _file_chunks(item: Item, size: int) -> Iterator[bytes]:
    left = size
    with item.path.open("rb") as f:
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise OSError("the output file shrank while it was being sent")
            left -= len(chunk)
            yield chunk


def _read_limited(response: httpx.Response) -> bytes:
    """The response body, refused past :data:`_MAX_RESPONSE_BYTES` (a declared length is not trusted)."""
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > _MAX_RESPONSE_BYTES:
            raise httpx.DecodingError("the STOW-RS response is larger than any answer to a store request")
    return bytes(data)


def _json(content: bytes) -> dict[str, Any]:
    """The DICOM JSON answer, or ``{}`` if the body is not a JSON object."""
    try:
        value = json.loads(content)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def stow_outcomes(status: int, answer: dict[str, Any], items: Sequence[Item]) -> list[Outcome]:
    """The outcome of each of ``items`` from a STOW-RS response's HTTP ``status`` and DICOM JSON ``answer``."""
    failed = _by_uid(answer, _FAILED_SOP_SEQUENCE, _FAILURE_REASON)
    stored = _by_uid(answer, _REFERENCED_SOP_SEQUENCE, _WARNING_REASON)
    return [_instance_outcome(status, item, failed, stored) for item in items]


def _instance_outcome(status: int, item: Item, failed: dict[str, int | None], stored: dict[str, int | None]) -> Outcome:
    uid = item.sop_instance_uid
    if uid in failed:
        return _failure(status, failed[uid], item.sop_class_uid)
    if status == 200 or (status == 202 and uid in stored):
        warning = stored.get(uid)
        if warning:
            return Outcome(Kind.WARNING, f"warning, WarningReason 0x{warning:04X}", status)
        return Outcome(Kind.DELIVERED, "", status)
    if status == 202:
        return Outcome(Kind.RETRY, "HTTP 202 without this instance in the answer", status)
    if status in _RETRY_HTTP or status >= 500:
        return Outcome(Kind.RETRY, f"HTTP {status}", status)
    return Outcome(Kind.DEAD, f"rejected, HTTP {status}", status)


def _failure(status: int, reason: int | None, sop_class_uid: str) -> Outcome:
    text = f"HTTP {status}, FailureReason " + (f"0x{reason:04X}" if reason is not None else "not given")
    if reason is not None and reason & 0xFF00 == 0xA700:
        return Outcome(Kind.RETRY, f"out of resources, {text}", status)
    if reason == SOP_CLASS_NOT_SUPPORTED:
        return class_refused(sop_class_uid, text, status)
    return Outcome(Kind.DEAD, f"rejected, {text}", status)


def _by_uid(answer: dict[str, Any], sequence: str, reason_tag: str) -> dict[str, int | None]:
    """{ReferencedSOPInstanceUID: reason code or None} of the items of a sequence of the DICOM JSON answer."""
    found: dict[str, int | None] = {}
    for entry in _values(answer, sequence):
        if not isinstance(entry, dict):
            continue
        uids = _values(entry, _REFERENCED_SOP_INSTANCE_UID)
        reasons = _values(entry, reason_tag)
        if uids and isinstance(uids[0], str):
            found[uids[0]] = reasons[0] if reasons and isinstance(reasons[0], int) else None
    return found


def _values(obj: dict[str, Any], tag: str) -> list[Any]:
    element = obj.get(tag)
    value = element.get("Value") if isinstance(element, dict) else None
    return value if isinstance(value, list) else []
