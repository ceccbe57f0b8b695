"""Protocol-level bad input (PDUs past the limits) and TLS, against pynetdicom and raw sockets."""

from __future__ import annotations

import gc
import socket
import ssl
import struct
import time
import warnings
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from gateway.config import DicomSettings, TLSSettings
from gateway.export.scu import Peer, echo
from gateway.runtime import Gateway

from conftest import make_settings
from peers import pki as make_pki

A_ABORT = 0x07


def read_pdu_header(sock: socket.socket) -> tuple[int, int]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            break
        header += chunk
    assert len(header) == 6, "the gateway closed without an answer"
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, length


def test_oversized_associate_request_is_aborted(gateway: Gateway) -> None:
    assert gateway.scp is not None
    with socket.create_connection(("127.0.0.1", gateway.scp.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 50_000_000) + b"\0" * 1024)
        pdu_type, _ = read_pdu_header(sock)
    assert pdu_type == A_ABORT
    assert echo(Peer("GATEWAY", "127.0.0.1", gateway.scp.port)) == 0, "other associations are still served"


def test_p_data_larger_than_negotiated_is_aborted(gateway: Gateway) -> None:
    assert gateway.scp is not None
    ae = AE(ae_title="BADSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gateway.scp.port, ae_title="GATEWAY")
    assert assoc.is_established
    maximum = assoc.acceptor.maximum_length
    raw = assoc.dul.socket.socket
    try:
        raw.sendall(struct.pack(">BBL", 0x04, 0, maximum + 1000) + b"\0" * 64)
        deadline = time.monotonic() + 10
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        raw.close()  # pynetdicom's requestor drops, without closing, the socket of an aborted association
    assert assoc.is_aborted, "the gateway aborts an association that sends a PDU past the negotiated maximum"
    assert echo(Peer("GATEWAY", "127.0.0.1", gateway.scp.port)) == 0


def test_garbage_pdu_type_does_not_hurt_the_server(gateway: Gateway) -> None:
    assert gateway.scp is not None
    with socket.create_connection(("127.0.0.1", gateway.scp.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        try:
            data = sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            data = b""
        assert data == b"" or data[0] == A_ABORT
    assert echo(Peer("GATEWAY", "127.0.0.1", gateway.scp.port)) == 0


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path, server="gateway", client="pacs")


def _tls_echo(port: int, pki: dict[str, Path], *, client_cert: bool, max_version=None) -> bool:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if client_cert:
        ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
    if max_version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = max_version
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY", tls_args=(ctx, "localhost"))
    except (ssl.SSLError, OSError):
        return False
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) == 0


def test_mutual_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    tls = TLSSettings(certificate=pki["server_cert"], private_key=pki["server_key"], ca_bundle=pki["ca"])
    gw = Gateway(make_settings(tmp_path / "data", dicom=DicomSettings(host="127.0.0.1", port=0, tls=tls)))
    gw.start()
    try:
        assert gw.scp is not None
        assert _tls_echo(gw.scp.port, pki, client_cert=True)
        assert not _tls_echo(gw.scp.port, pki, client_cert=False), "mutual TLS requires a client certificate"
        with warnings.catch_warnings():  # asking for TLS 1.1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old = ssl.TLSVersion.TLSv1_1
        assert not _tls_echo(gw.scp.port, pki, client_cert=True, max_version=old), "TLS 1.2 is the minimum"
        with pytest.raises(ConnectionError):
            echo(Peer("GATEWAY", "127.0.0.1", gw.scp.port), timeout=5)  # plain TCP is not spoken
    finally:
        gw.stop()
        with warnings.catch_warnings():  # pynetdicom's requestor leaves its socket to the GC after a failed
            warnings.simplefilter("ignore", ResourceWarning)  # handshake: collect it here, not in a later test
            gc.collect()


def test_stopping_the_gateway_aborts_associations_in_progress_and_waits_for_them(tmp_path: Path) -> None:
    gw = Gateway(make_settings(tmp_path / "data"))
    gw.start()
    assert gw.scp is not None
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.scp.port, ae_title="GATEWAY")
    assert assoc.is_established
    server = gw.scp._server
    assert server is not None and len(server.active_associations) == 1
    (held,) = server.active_associations
    gw.stop()  # as SIGTERM does: the peer is told (A-ABORT), not left waiting
    assert not held.is_alive(), "the association's thread was joined"
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
