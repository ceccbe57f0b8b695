"""The DIMSE Storage SCP (pynetdicom): C-ECHO and C-STORE, stored as received.

The handlers stay thin: each calls one plain function (:func:`store_status`, over :meth:`InstanceStore.put`) and
maps the gateway's errors to C-STORE statuses. A data set whose SOP Class or Instance disagrees with its
presentation context or its request is refused with 0xA900, never stored with file meta that contradicts it.
Datasets are received in chunks straight to a temporary file (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), so a
large multi-frame object never sits in memory, and they are never decoded and re-encoded.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.audit.trail import AuditTrail, StudyTally
from gateway.config import AllowedCaller, DicomSettings, TLSSettings
from gateway.errors import DataSetMismatch, IngestError, OutOfResources
from gateway.ingest.instance import ACCEPTED_TRANSFER_SYNTAXES, ReceivedInstance
from gateway.metrics import GatewayMetrics
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)

_ASSOCIATE_RQ_LIMIT = 1 << 20  # an A-ASSOCIATE-RQ is a few KiB; anything past 1 MiB is not one
_P_DATA_TF = 0x04
_A_ABORT_INVALID_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)
_STATUS_INTERNAL = 0xA700  # an unexpected fault: "Out of Resources" tells the sender to retry later


def store_status(
    store: InstanceStore,
    path: Any,
    calling_ae: str,
    *,
    abstract_syntax: str | None = None,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
    metrics: GatewayMetrics | None = None,
    on_stored: Callable[[ReceivedInstance], None] | None = None,
) -> int | Dataset:
    """Store one received C-STORE data set and return the C-STORE response status (PS3.4 B.2.3).

    Parameters
    ----------
    store
        Where it goes.
    path
        The received data set as a Part 10 file (consumed either way).
    calling_ae
        The sender's AE title.
    abstract_syntax
        The SOP Class of the presentation context the data set came on.
    sop_class_uid, sop_instance_uid
        The request's AffectedSOPClassUID and AffectedSOPInstanceUID. The context's SOP Class, the request's
        and the data set's must agree, and so must the request's SOP Instance UID and the data set's: 0xA900
        ("Data Set does not match SOP Class") otherwise.
    metrics
        Where each outcome (``stored``, ``duplicate``, ``refused`` for want of resources, ``invalid``, ``error``)
        and the time to store are counted.
    on_stored
        Called with each instance stored (or already held), e.g. to count it for the audit trail.
    """
    began = time.perf_counter()
    try:
        if abstract_syntax and sop_class_uid and abstract_syntax != sop_class_uid:
            _discard(path)
            raise DataSetMismatch("AffectedSOPClassUID is not the presentation context's SOP Class")
        outcome = store.put(
            path, source=f"dimse:{calling_ae}", sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid
        )
    except IngestError as exc:
        log.warning("C-STORE from %r refused with 0x%04X: %s", calling_ae, exc.status, exc.reason)
        _counted(metrics, "refused" if isinstance(exc, OutOfResources) else "invalid")
        return _failure(exc.status, exc.reason)
    except Exception:
        log.exception("C-STORE from %r failed unexpectedly; answered 0x%04X", calling_ae, _STATUS_INTERNAL)
        _counted(metrics, "error")
        return _failure(_STATUS_INTERNAL, "internal error, retry later")
    what = "duplicate" if outcome.duplicate else "stored"
    log.debug("C-STORE from %r %s", calling_ae, what)
    _counted(metrics, what, time.perf_counter() - began)
    if on_stored is not None:
        on_stored(outcome.instance)
    return 0x0000


def _counted(metrics: GatewayMetrics | None, outcome: str, seconds: float | None = None) -> None:
    if metrics is not None:
        metrics.instance_received("dimse", outcome, seconds)


def _discard(path: Any) -> None:
    with contextlib.suppress(OSError, TypeError):
        Path(path).unlink(missing_ok=True)


def _failure(status: int, reason: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = reason[:64]
    return rsp


class StorageSCP:
    """The DICOM listener: owns a pynetdicom AE and its threaded server.

    Parameters
    ----------
    settings
        AE title, address, limits, allow-list and TLS.
    store
        Where received instances go.
    metrics
        Where each C-STORE's outcome and store time are counted.
    audit
        The audit trail: one DICOM Instances Transferred per study when an association that stored instances
        ends, a Security Alert for each association rejected.
    """

    def __init__(
        self,
        settings: DicomSettings,
        store: InstanceStore,
        *,
        metrics: GatewayMetrics | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.audit = audit or AuditTrail.disabled()
        self._server: Any = None
        self._counts: dict[int, Counter[str]] = {}
        self._tallies: dict[int, StudyTally] = {}
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (useful when the settings asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads (``gateway.process`` has set pynetdicom to write received data
        sets to files as they arrive, and not to log messages)."""
        ae = self._make_ae()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
        ]
        self._server = ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            contexts=[_CheaplyCopied.of(cx) for cx in ae.supported_contexts],
            evt_handlers=handlers,
            ssl_context=_ssl_context(self.settings.tls) if self.settings.tls else None,
        )
        log.info(
            "DICOM listener %s on %s:%d%s",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            " (TLS)" if self.settings.tls else "",
        )

    @property
    def running(self) -> bool:
        """Whether the listener is serving."""
        return self._server is not None

    def stop(self, join_s: float = 10.0) -> None:
        """Stop accepting, close the server, abort the associations in progress and wait for their threads.

        A peer whose association is aborted mid-transfer sees an A-ABORT for the instances not yet acknowledged
        and sends them again (an instance is acknowledged only once it is durably stored and indexed).
        """
        if self._server is None:
            return
        server, self._server = self._server, None
        associations = list(server.active_associations)
        server.shutdown()
        for assoc in associations:
            if assoc.is_alive():
                assoc.abort()
        deadline = time.monotonic() + join_s
        for assoc in associations:
            assoc.join(timeout=max(0.0, deadline - time.monotonic()))

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.maximum_pdu_size
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.require_called_aet = s.require_called_ae_title
        syntaxes = sorted(ACCEPTED_TRANSFER_SYNTAXES)
        ae.supported_contexts = [
            build_context(Verification, syntaxes),
            *(build_context(str(cx.abstract_syntax), syntaxes) for cx in AllStoragePresentationContexts),
        ]
        return ae

    def _on_store(self, event: Any) -> int | Dataset:
        calling = event.assoc.requestor.ae_title
        request = event.request
        status = store_status(
            self.store,
            event.dataset_path,
            calling,
            abstract_syntax=str(event.context.abstract_syntax),
            sop_class_uid=_uid_text(request.AffectedSOPClassUID),
            sop_instance_uid=_uid_text(request.AffectedSOPInstanceUID),
            metrics=self.metrics,
            on_stored=lambda instance: self._tally(event.assoc, instance),
        )
        code = status if isinstance(status, int) else int(status.Status)
        self._count(event.assoc, "stored" if code == 0 else "failed")
        return status

    def _on_connect(self, event: Any) -> None:
        _guard_pdu_size(event.assoc, self.settings.maximum_pdu_size)

    def _on_requested(self, event: Any) -> None:
        callers = self.settings.allowed_callers
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        address = event.assoc.requestor.address
        if callers and not _is_allowed(callers, calling, address):
            log.warning("association from %r at %s rejected: not in the allow-list", calling, address)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            self.audit.association_rejected(calling, address, "calling AE title not in the allow-list")
            return
        _prefer_requestor_order(event.assoc)

    def _on_end(self, event: Any) -> None:
        with self._lock:
            counts = self._counts.pop(id(event.assoc), None)
            tally = self._tallies.pop(id(event.assoc), None)
        if tally:
            self.audit.received(str(event.assoc.requestor.ae_title).strip(), event.assoc.requestor.address, tally)
        if counts:
            log.info(
                "association from %r ended: %d stored, %d refused",
                event.assoc.requestor.ae_title,
                counts["stored"],
                counts["failed"],
            )

    def _count(self, assoc: Any, what: str) -> None:
        with self._lock:
            self._counts.setdefault(id(assoc), Counter())[what] += 1

    def _tally(self, assoc: Any, instance: ReceivedInstance) -> None:
        value = instance.attributes.get("PatientID")
        patient_id = None if value is None else str(value)
        with self._lock:
            tally = self._tallies.setdefault(id(assoc), StudyTally())
            tally.add(instance.study_instance_uid, patient_id, instance.sop_class_uid)


class _CheaplyCopied(PresentationContext):
    """A supported presentation context that copies itself cheaply.

    pynetdicom deep-copies the server's supported contexts for every association (each may then be changed for
    that association alone, as :func:`_prefer_requestor_order` does). A generic deep copy rebuilds and re-checks
    every UID of every context: ~9 ms of CPU, holding the GIL, per association for the gateway's ~130 storage
    SOP classes. UIDs are immutable strings, so a copy of the object with its own list of transfer syntaxes is
    as independent as a deep copy.
    """

    @classmethod
    def of(cls, context: PresentationContext) -> _CheaplyCopied:
        """The same context, as this class."""
        copied = cls.__new__(cls)
        copied.__dict__.update(context.__dict__)
        copied._transfer_syntax = list(context._transfer_syntax)
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> _CheaplyCopied:
        return _CheaplyCopied.of(self)


def _uid_text(value: object) -> str | None:
    text = "" if value is None else str(value).strip("\0 ")
    return text or None


def _prefer_requestor_order(assoc: Any) -> None:
    """Accept, in each presentation context, the transfer syntax the requestor listed first.

    pynetdicom picks the first of the acceptor's syntaxes that was proposed; ordering ours like the
    requestor's proposal (PS3.8: in order of preference) means a compressed instance offered as compressed
    stays compressed and nothing is transcoded on our account.
    """
    proposed = assoc.requestor.primitive.presentation_context_definition_list
    preference: dict[str, list[str]] = {}
    for cx in proposed:
        ranked = preference.setdefault(str(cx.abstract_syntax), [])
        ranked.extend(str(ts) for ts in cx.transfer_syntax if str(ts) not in ranked)
    for cx in assoc.acceptor.supported_contexts:
        ranked = preference.get(str(cx.abstract_syntax), [])
        if ranked:
            ours = [str(ts) for ts in cx.transfer_syntax]
            cx.transfer_syntax = [ts for ts in ranked if ts in ours] + [ts for ts in ours if ts not in ranked]


def _is_allowed(callers: list[AllowedCaller], ae_title: str, address: str) -> bool:
    for caller in callers:
        if caller.ae_title.strip() != ae_title.strip():
            continue
        if caller.host is None or address in _addresses(caller.host):
            return True
    return False


@cache
def _addresses(host: str) -> frozenset[str]:
    with contextlib.suppress(OSError):
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    return frozenset({host})


def _ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_bundle is not None:
        ctx.load_verify_locations(tls.ca_bundle)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _guard_pdu_size(assoc: Any, maximum: int) -> None:
    """Refuse PDUs longer than negotiated before reading them: A-ABORT and close, never buffer them; read the
    others in as few system calls as the network allows.

    pynetdicom reads a PDU's declared length in full; this wraps the association socket's ``recv`` so that a
    header declaring more than ``maximum`` (P-DATA-TF) or 1 MiB (other PDUs) ends the association at once. A PDU
    within the limits is read into one buffer of its declared length (:func:`_recv_exactly`), where pynetdicom
    would call ``recv`` for each 4 KiB (128 calls, each releasing and taking back the GIL, for a 512 KiB image).
    """
    sock = assoc.dul.socket
    original: Callable[[int], bytearray] = sock.recv
    expecting_header = [True]

    def recv(nr_bytes: int) -> bytearray:
        if not expecting_header[0]:
            expecting_header[0] = True
            return _recv_exactly(sock.socket, nr_bytes)
        data = original(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", bytes(data))
            limit = maximum if pdu_type == _P_DATA_TF else _ASSOCIATE_RQ_LIMIT
            if length > limit:
                log.warning(
                    "PDU type 0x%02X of %d bytes exceeds the limit of %d: association aborted",
                    pdu_type,
                    length,
                    limit,
                )
                with contextlib.suppress(OSError):
                    sock.socket.sendall(_A_ABORT_INVALID_PARAMETER)
                return bytearray()
            expecting_header[0] = False
        return data

    sock.recv = recv


def _recv_exactly(raw: socket.socket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` from ``raw`` (a plain or TLS socket) into one buffer; fewer if the peer closed first.

    Like pynetdicom's ``AssociationSocket.recv`` (blocking until all the bytes are there, or the connection is
    closed; a timeout or an error is raised), without its 4 KiB steps.
    """
    data = bytearray(nr_bytes)
    got = 0
    with memoryview(data) as view:
        while got < nr_bytes:
            n = raw.recv_into(view[got:], nr_bytes - got)
            if n == 0:
                break
            got += n
    del data[got:]
    return data
