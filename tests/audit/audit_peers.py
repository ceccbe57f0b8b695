"""What the audit tests check messages against: the schema of PS3.15 A.5.1 (lxml RELAX NG), and real syslog
receivers on loopback (UDP, and TLS with RFC 5425 octet counting)."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import rnc2rng
from lxml import etree

SCHEMA_RNC = Path(__file__).resolve().parents[1] / "fixtures" / "audit" / "dicom-audit-message.rnc"
_QUERY_OR_NAME = "  element ParticipantObjectQuery { xsd:base64Binary }),"

#: An RFC 5424 header: PRI, VERSION, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID, STRUCTURED-DATA, then the MSG.
SYSLOG_HEADER = re.compile(rb"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) ", re.DOTALL)
BOM = b"\xef\xbb\xbf"


def schema_rng() -> bytes:
    """The standard's compact schema in RELAX NG XML syntax, with the two changes its header documents: ``##``
    after a value (not allowed there by the compact grammar) read as a plain comment, and the erratum that makes
    ParticipantObjectName | ParticipantObjectQuery optional."""
    text = SCHEMA_RNC.read_text(encoding="utf-8")
    assert text.count(_QUERY_OR_NAME) == 1, "the schema's ParticipantObjectQuery line was found"
    text = text.replace("##", "#").replace(_QUERY_OR_NAME, _QUERY_OR_NAME[:-1] + "?,")
    converted: str = rnc2rng.dumps(rnc2rng.loads(text))
    return converted.encode("utf-8")


@cache
def audit_schema() -> etree.RelaxNG:
    """The DICOM audit message schema, for lxml."""
    return etree.RelaxNG(etree.fromstring(schema_rng()))


def validated(message: bytes) -> Any:
    """Parse ``message`` and check it against the schema; the parsed root (fails with the schema's errors)."""
    root = etree.fromstring(message)
    schema = audit_schema()
    assert schema.validate(root), f"{schema.error_log}\n{message.decode()}"
    return root


def split_syslog(frame: bytes) -> tuple[dict[str, str], bytes]:
    """An RFC 5424 message's header fields and its MSG (the XML, its BOM removed; fails if the BOM is missing)."""
    match = SYSLOG_HEADER.match(frame)
    assert match is not None, frame[:200]
    names = ("pri", "timestamp", "hostname", "app", "procid", "msgid", "sd")
    header = dict(zip(names, (g.decode("utf-8") for g in match.groups()), strict=True))
    body = frame[match.end() :]
    assert body.startswith(BOM), "the MSG is UTF-8 with its BOM (RFC 5424 6.4)"
    return header, body[len(BOM) :]


class _Receiver:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def __enter__(self) -> _Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._close()
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _got(self, frame: bytes) -> None:
        with self._lock:
            self.frames.append(frame)

    def messages(self) -> list[bytes]:
        """The XML of each message received so far."""
        with self._lock:
            return [split_syslog(frame)[1] for frame in self.frames]

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[bytes]:
        """Wait until ``count`` messages came; all of them."""
        deadline = time.monotonic() + timeout_s
        while len(self.frames) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.messages()


class UdpReceiver(_Receiver):
    """A syslog receiver on UDP 127.0.0.1: each datagram is one message (RFC 5426)."""

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(70000)
            except TimeoutError:
                continue
            except OSError:
                return
            self._got(frame)

    def _close(self) -> None:
        self.sock.close()


class TlsReceiver(_Receiver):
    """A syslog receiver over TLS on 127.0.0.1 (RFC 5425): reads ``LENGTH SP MESSAGE`` frames from each
    connection; ``pki`` is :func:`peers.pki`'s material (the server certificate; clients need not present one
    unless ``require_client`` is set). ``connections`` counts the TLS sessions accepted."""

    def __init__(self, pki: dict[str, Path], *, require_client: bool = False) -> None:
        super().__init__()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
        if require_client:
            self.ctx.load_verify_locations(pki["ca"])
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.peer_certificates: list[dict[str, Any]] = []
        self._open: list[socket.socket] = []

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._read, args=(raw,), daemon=True).start()

    def _read(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self.connections += 1
        self.peer_certificates.append(conn.getpeercert() or {})
        self._open.append(conn)
        buffer = b""
        with contextlib.closing(conn):
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except (OSError, ssl.SSLError):
                    return
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    assert length.isdigit(), f"octet counting: {buffer[:40]!r}"
                    if len(rest) < int(length):
                        break
                    self._got(rest[: int(length)])
                    buffer = rest[int(length) :]

    def drop_connections(self) -> None:
        """Close every connection accepted so far (the client must reconnect)."""
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._open.clear()

    def _close(self) -> None:
        self.listener.close()
        self.drop_connections()
