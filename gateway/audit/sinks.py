"""Where audit messages go: an append-only local file, and a syslog audit repository (RFC 5424 over UDP or TLS).

The file is the record that is always kept: a message reaches it before the syslog sink is even tried, and a
message the syslog sink cannot send (queue full, repository unreachable) is counted and stays in the file.

File policy: opened ``O_APPEND`` (each message is one ``write`` of one line, so concurrent writers never
interleave a line), created ``0600``, and ``fsync``-ed after every message: audit events are few (per association,
request, export, query, refusal, change), and an audit record lost to a crash is worse than the few milliseconds.

Syslog (IHE ITI-20, RFC 5424): ``<85>1 TIMESTAMP HOST APP PROCID IHE+RFC-3881 - BOM XML`` (facility 10,
security/authorization; severity 5, notice). Over UDP (RFC 5426) each message is one datagram, and a message over
``max_datagram`` bytes is not sent (counted); over TLS (RFC 5425, TLS 1.2 minimum) each is framed ``LENGTH SP
MESSAGE``. The caller never waits for the network: messages go through a bounded queue to one sending thread,
which reconnects with backoff.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue
import socket
import ssl
import threading
from pathlib import Path
from typing import Protocol

from gateway.config import AuditSyslogSettings, ClientTLSSettings

log = logging.getLogger(__name__)

#: PRI of every message: facility 10 (security/authorization) * 8 + severity 5 (notice), as IHE ITI-20 asks.
PRI = 10 * 8 + 5
#: MSGID of every message (IHE ITI-20).
MSGID = "IHE+RFC-3881"
_BOM = b"\xef\xbb\xbf"
_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Sink(Protocol):
    """Takes one audit message (UTF-8 XML); never raises for a failure to deliver it."""

    def send(self, message: bytes) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """The append-only audit file: one message per line.

    Parameters
    ----------
    path
        The file; its folder is made if missing. Created ``0600``; an existing file is appended to.
    fsync
        Whether each message is flushed to disk before :meth:`send` returns.
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        self._lock = threading.Lock()
        #: Messages that could not be written (the error is logged once per message, without its content).
        self.failed = 0

    def send(self, message: bytes) -> None:
        """Append ``message`` as one line."""
        line = message.replace(b"\n", b" ") + b"\n"
        with self._lock:
            if self._fd < 0:
                self.failed += 1
                return
            try:
                os.write(self._fd, line)
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                self.failed += 1
                log.error("audit message not written to the audit file: %s", exc.strerror or exc)

    def close(self) -> None:
        """Close the file (later messages are counted as failed)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def syslog_frame(message: bytes, app_name: str, *, when: datetime.datetime | None = None) -> bytes:
    """``message`` as an RFC 5424 syslog message (no structured data, the XML as a UTF-8 MSG with its BOM)."""
    stamp = (when or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC).isoformat(timespec="milliseconds")
    header = f"<{PRI}>1 {stamp} {_field(socket.gethostname(), 255)} {_field(app_name, 48)} {os.getpid()} {MSGID} -"
    return header.encode("ascii", "replace") + b" " + _BOM + message


def octet_counted(frame: bytes) -> bytes:
    """``frame`` with RFC 5425's octet-counting framing: ``LENGTH SP FRAME``."""
    return str(len(frame)).encode("ascii") + b" " + frame


def _field(value: str, limit: int) -> str:
    """A header field of RFC 5424: printable US-ASCII without spaces, at most ``limit`` characters, ``-`` if empty."""
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


class SyslogSink:
    """Sends each message to a syslog audit repository from a background thread; never blocks the caller.

    Parameters
    ----------
    settings
        The repository: host, port, ``udp`` or ``tls``, and for TLS whom to trust and our client certificate.
    app_name
        The APP-NAME of the syslog header (``audit.source_id``).
    queue_size
        Messages waiting to be sent; past it a message is dropped from syslog (counted; the file has it).
    max_datagram
        The largest UDP datagram sent (IPv4's UDP limit by default).
    """

    def __init__(
        self,
        settings: AuditSyslogSettings,
        app_name: str,
        *,
        queue_size: int = 1000,
        max_datagram: int = 65507,
        timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.app_name = app_name
        self.max_datagram = max_datagram
        self.timeout_s = timeout_s
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._ssl = _client_context(settings.tls) if settings.transport == "tls" else None
        #: Messages sent, and those dropped (queue full, too large, or still unsent when closed).
        self.sent = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def send(self, message: bytes) -> None:
        """Queue ``message`` for the repository; drop (and count) it if the queue is full."""
        if self._stop.is_set():
            self.dropped += 1
            return
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1

    def close(self, join_s: float = 5.0) -> None:
        """Send what is queued (for up to ``join_s``), then stop the thread and close the connection."""
        if self._stop.is_set():
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=join_s)
        self._thread.join(timeout=join_s)
        self._stop.set()
        self._thread.join(timeout=1.0)
        while True:  # what the thread could not send in time
            try:
                self.dropped += self._queue.get_nowait() is not None
            except queue.Empty:
                break
        self._disconnect()

    def _run(self) -> None:
        attempt = 0
        while True:
            message = self._queue.get()
            if message is None:
                return
            frame = syslog_frame(message, self.app_name)
            while not self._stop.is_set():
                if self._deliver(frame):
                    attempt = 0
                    break
                self._stop.wait(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                attempt += 1
            else:
                self.dropped += 1
                return

    def _deliver(self, frame: bytes) -> bool:
        """Send one frame; ``True`` when sent or not sendable (too large: counted), ``False`` to try again."""
        if self.settings.transport == "udp" and len(frame) > self.max_datagram:
            self.dropped += 1
            log.warning("audit message of %d bytes over the UDP limit of %d: not sent", len(frame), self.max_datagram)
            return True
        try:
            sock = self._sock or self._connect()
            if self.settings.transport == "udp":
                sock.send(frame)
            else:
                sock.sendall(octet_counted(frame))
        except (OSError, ssl.SSLError) as exc:
            log.warning(
                "audit repository %s:%d not reachable (%s); retrying",
                self.settings.host,
                self.settings.port,
                exc,
            )
            self._disconnect()
            return False
        self.sent += 1
        return True

    def _connect(self) -> socket.socket:
        address = (self.settings.host, self.settings.port)
        if self.settings.transport == "udp":
            family = socket.getaddrinfo(*address, type=socket.SOCK_DGRAM)[0][0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect(address)
        else:
            assert self._ssl is not None
            raw = socket.create_connection(address, timeout=self.timeout_s)
            try:
                sock = self._ssl.wrap_socket(raw, server_hostname=self.settings.host)
            except BaseException:
                raw.close()
                raise
        self._sock = sock
        return sock

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def _client_context(tls: ClientTLSSettings | None) -> ssl.SSLContext:
    """TLS 1.2 minimum, the repository's certificate and host name verified (``tls.ca_bundle``, or the system's
    authorities), our client certificate presented when configured (RFC 5425 mutual authentication)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None if tls is None else tls.ca_bundle)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None and tls.certificate is not None and tls.private_key is not None:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    return ctx
