"""C-ECHO and C-STORE SCU over files, several associations at once, sending the bytes as stored.

Files are sent without decoding (pynetdicom's ``STORE_SEND_CHUNKED_DATASET``), so each needs an accepted
presentation context with exactly its own transfer syntax; one without is reported, not converted.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket

from gateway.paths import walk_files

log = logging.getLogger(__name__)

_ADDRESS_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: at most 128 presentation contexts per association
_JOIN_TIMEOUT_S = 10.0
_NO_RESPONSE = "no response (association aborted or timed out)"


class _ClosingSocket(AssociationSocket):
    """pynetdicom 3.0's socket, closed even when it never connected.

    When the connection is refused, pynetdicom's ``_shutdown_socket`` calls ``shutdown`` first, which fails on an
    unconnected socket, so ``close`` never runs and the socket is left to the garbage collector (a
    ``ResourceWarning`` for every refused association). Fixed upstream after 3.0.4 (pynetdicom PR #999).
    """

    def _shutdown_socket(self) -> None:
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


class ClosingAE(AE):
    """A pynetdicom ``AE`` whose requested associations close their socket whatever happens."""

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> AssociationSocket:
        sock = _ClosingSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


@dataclass(frozen=True)
class Peer:
    """A remote DICOM node: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AET@HOST:PORT``.

        Raises
        ------
        ValueError
            If ``text`` is not of that form; the message says what is expected.
        """
        match = _ADDRESS_RE.match(text.strip())
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"expected AET@HOST:PORT, got {text!r}")
        return cls(match["aet"], match["host"].strip("[]"), int(match["port"]))


@dataclass(frozen=True)
class DicomFile:
    """A file to send, with what its presentation context needs."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class SendReport:
    """What happened to each file."""

    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def scan(paths: Iterable[Path], report: SendReport) -> list[DicomFile]:
    """Find the DICOM Part 10 files under ``paths`` (files or folders, recursively); others are skipped."""
    found: list[DicomFile] = []
    for path in walk_files(paths):
        try:
            with warnings.catch_warnings():  # odd but readable files are still sent, as they are
                warnings.simplefilter("ignore")
                ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            found.append(DicomFile(path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as exc:
            report.skipped.append((path, f"not a DICOM file ({type(exc).__name__})"))
    return found


def echo(peer: Peer, calling_ae: str = "GATEWAY-SCU", timeout: float = 30) -> int:
    """Send a C-ECHO; return its status (0 is success).

    Raises
    ------
    ConnectionError
        If no association could be established.
    """
    ae = ClosingAE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        close_socket(assoc)
        why = "rejected the association" if assoc.is_rejected else "could not be reached or aborted the association"
        raise ConnectionError(f"{peer.ae_title}@{peer.host}:{peer.port} {why}")
    status: Any = None
    try:
        status = assoc.send_c_echo()
    finally:
        finish_association(assoc, broken=status is None or "Status" not in status)
    return int(status.Status) if "Status" in status else -1


def finish_association(assoc: Any, *, broken: bool = False) -> None:
    """Release a working association; abort a ``broken`` one (a request went unanswered); close the socket.

    pynetdicom closes the socket on a release but not always when the association ends in an abort (a peer's
    A-ABORT, a reset connection): without the close, every association a crashed peer leaves behind keeps its
    socket open until the garbage collector finds it.
    """
    if assoc.is_established and not broken:
        assoc.release()
        return
    if assoc.is_established:
        assoc.abort()  # no answer came, yet pynetdicom may not have noticed the connection is gone
    assoc.join(timeout=_JOIN_TIMEOUT_S)  # let the association's own thread stop using the socket first
    close_socket(assoc)


def close_socket(assoc: Any) -> None:
    """Close the socket of an association that was not established (pynetdicom leaves it to the GC)."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def send(
    files: list[DicomFile],
    peer: Peer,
    *,
    associations: int = 4,
    calling_ae: str = "GATEWAY-SCU",
    on_progress: Callable[[int], object] | None = None,
    report: SendReport | None = None,
) -> SendReport:
    """C-STORE ``files`` to ``peer`` over up to ``associations`` concurrent associations."""
    report = report or SendReport()
    n = max(1, min(associations, len(files)))
    shares = [files[i::n] for i in range(n)]
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_send_share, args=(share, peer, calling_ae, report, lock, on_progress))
        for share in shares
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return report


def _send_share(
    files: list[DicomFile],
    peer: Peer,
    calling_ae: str,
    report: SendReport,
    lock: threading.Lock,
    on_progress: Callable[[int], object] | None,
) -> None:
    for batch in _batches_by_context(files):
        _send_batch(batch, peer, calling_ae, report, lock, on_progress)


def _batches_by_context(files: list[DicomFile]) -> Iterator[list[DicomFile]]:
    """Split ``files`` so that each batch needs at most 128 presentation contexts."""
    batch: list[DicomFile] = []
    contexts: set[tuple[str, str]] = set()
    for f in files:
        key = (f.sop_class_uid, f.transfer_syntax_uid)
        if key not in contexts and len(contexts) == _MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(f)
    if batch:
        yield batch


def _send_batch(
    files: list[DicomFile],
    peer: Peer,
    calling_ae: str,
    report: SendReport,
    lock: threading.Lock,
    on_progress: Callable[[int], object] | None,
) -> None:
    ae = ClosingAE(ae_title=calling_ae)
    for key in sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files}):
        ae.add_requested_context(key[0], key[1])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        close_socket(assoc)
        for f in files:
            _record(f, "association not accepted", report, lock, on_progress)
        return
    broken = False
    try:
        for k, f in enumerate(files):
            outcome = _store_one(assoc, f)
            _record(f, outcome, report, lock, on_progress)
            if outcome == _NO_RESPONSE:
                # The association is gone (aborted, connection lost, timed out), though pynetdicom may still call
                # it established: a further C-STORE on it would wait out the whole DIMSE timeout for nothing.
                broken = True
                for rest in files[k + 1 :]:
                    _record(rest, "not sent: the association was lost", report, lock, on_progress)
                break
    finally:
        finish_association(assoc, broken=broken)


def _record(
    f: DicomFile,
    outcome: str | None,
    report: SendReport,
    lock: threading.Lock,
    on_progress: Callable[[int], object] | None,
) -> None:
    with lock:
        if outcome is None:
            report.sent += 1
        else:
            report.failed.append((f.path, outcome))
    if on_progress is not None:
        on_progress(1)


def _store_one(assoc: object, f: DicomFile) -> str | None:
    """Send one file; ``None`` on success (0x0000 or a warning), else the reason."""
    try:
        status = assoc.send_c_store(f.path)  # type: ignore[attr-defined]
    except (ValueError, RuntimeError, AttributeError, OSError) as exc:  # a bad or vanished file, a dead association
        return str(exc) or type(exc).__name__
    if "Status" not in status:
        return _NO_RESPONSE
    code = int(status.Status)
    if code == 0 or code & 0xF000 == 0xB000:
        return None
    comment = status.get("ErrorComment", "")
    return f"status 0x{code:04X}{': ' + str(comment) if comment else ''}"
