"""The HTTP server's limits on real sockets: request-head and body timeouts, keep-alive, the connection limit.

Each test serves the app as ``gateway serve`` does (:func:`gateway.api.limits.server_config`) with small limits,
and talks to it over raw sockets the way a slow or hostile client would. Socket timeouts bound how long a test
waits; nothing asserts how long the server took.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import func, select

from gateway.api.limits import raw_response
from gateway.config import Settings
from gateway.store.index import Instance

from conftest import ADMIN, LiveServer, http_settings, make_settings
from dicom_files import minimal_ct
from model_packages import manifest_dict, write_package, zip_folder
from peers import wait_until

WAIT_S = 20  # the longest a test waits for the server to act (a bound, not a measurement)
AUTH = f"Authorization: {ADMIN['Authorization']}\r\n"


def serve(tmp_path: Path, **http: Any) -> LiveServer:
    settings: Settings = make_settings(tmp_path / "data", http=http_settings(**http))
    return LiveServer(settings)


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[LiveServer]:
    """A server with short timeouts."""
    with serve(tmp_path, header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=0.5) as server:
        yield server


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails the test if it does not within WAIT_S)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {WAIT_S} s; it sent {received[:200]!r}")
    return received


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{AUTH}\r\n".encode()


def files_left(server: LiveServer) -> list[Path]:
    data: Path = server.app.state.store.data_dir
    return list((data / "tmp").iterdir()) + [p for p in (data / "instances").rglob("*") if p.is_file()]


# --- request heads -------------------------------------------------------------------------------------------


def test_an_incomplete_request_head_is_answered_408_and_closed(quick: LiveServer) -> None:
    with connect(quick) as sock:
        sock.sendall(b"GET /dicomweb/stu")  # half a request line, and then nothing
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer


def test_a_connection_that_sends_nothing_is_closed(quick: LiveServer) -> None:
    with connect(quick) as sock:
        assert read_until_closed(sock) == b""


def test_a_head_sent_a_byte_at_a_time_is_closed(quick: LiveServer) -> None:
    """Slowloris: every byte arrives in time for an idle timeout, but the head never ends."""
    with connect(quick) as sock:
        sock.sendall(b"GET /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sock.settimeout(0.05)
        deadline = time.monotonic() + WAIT_S
        answer = b""
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if answer == b"" or answer.endswith(b"request head incomplete within the time limit"):
                break
        else:
            pytest.fail("a never-ending head kept the connection open")
    assert answer in (b"", raw_response(408, "request head incomplete within the time limit")), answer


def test_a_head_over_the_size_limit_is_refused(quick: LiveServer) -> None:
    with connect(quick) as sock:
        sock.sendall(b"GET /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        with suppress(BrokenPipeError, ConnectionResetError):  # the server may close before all is sent
            for _ in range(64):  # a head that keeps growing is refused once 16 KiB of it are buffered (h11's limit)
                sock.sendall(b"a" * 4096)
        answer = read_until_closed(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer[:100]


def test_keep_alive_serves_requests_then_closes_when_idle(tmp_path: Path) -> None:
    with serve(tmp_path, header_timeout_s=10, keep_alive_s=0.5) as server, connect(server) as sock:
        for _ in range(3):  # the head deadline starts again after each response
            sock.sendall(get("/api/jobs"))
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        assert read_until_closed(sock) == b"", "an idle keep-alive connection is closed"


# --- request bodies ------------------------------------------------------------------------------------------


def stalled_post(server: LiveServer, path: str, content_type: str, body: bytes, sent: int) -> bytes:
    """POST with the Content-Length of ``body`` but only its first ``sent`` bytes; the answer, until closed."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{AUTH}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with connect(server) as sock:
        sock.sendall(head + body[:sent])
        return read_until_closed(sock)


def test_a_stalled_stow_body_is_408_and_stores_nothing(quick: LiveServer, tmp_path: Path) -> None:
    parts = [minimal_ct(tmp_path / f"{i}.dcm").read_bytes() for i in range(2)]
    boundary = b"stall"
    body = b"".join(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    body += b"--" + boundary + b"--\r\n"
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary.decode()}'
    answer = stalled_post(quick, "/dicomweb/studies", content_type, body, len(parts[0]) + 200)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"request body stalled" in answer
    wait_until(lambda: files_left(quick) == [], timeout_s=WAIT_S, what="the staged parts removed")
    with quick.app.state.store.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_a_stalled_model_upload_is_408_and_leaves_nothing(quick: LiveServer, tmp_path: Path) -> None:
    folder = write_package(tmp_path / "pkg", manifest_dict())
    body = zip_folder(folder, tmp_path / "pkg.zip").read_bytes()
    answer = stalled_post(quick, "/api/models", "application/zip", body, len(body) // 2)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    wait_until(lambda: files_left(quick) == [], timeout_s=WAIT_S, what="the staged archive removed")
    assert quick.app.state.gateway.registry.list() == []


def test_a_slowly_read_response_is_not_cut_by_the_body_timeout(quick: LiveServer, tmp_path: Path) -> None:
    """The body timeout covers request bodies only: a client that reads a large WADO-RS answer slowly gets it all."""
    side = 1500  # a 4.5 MB instance: more than the sockets buffer, so the server waits on the reader
    big = minimal_ct(tmp_path / "big.dcm", Rows=side, Columns=side, PixelData=bytes(side * side * 2))
    ds = pydicom.dcmread(big, stop_before_pixels=True)
    boundary = "slow"
    part = b"--slow\r\nContent-Type: application/dicom\r\n\r\n" + big.read_bytes() + b"\r\n--slow--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', **ADMIN}
    with httpx.Client(base_url=quick.url, headers=ADMIN, timeout=WAIT_S) as http:
        assert http.post("/dicomweb/studies", content=part, headers=headers).status_code == 200
        received = 0
        with http.stream("GET", f"/dicomweb/studies/{ds.StudyInstanceUID}") as response:
            assert response.status_code == 200
            for n, chunk in enumerate(response.iter_raw(1 << 16)):
                if n == 1:
                    time.sleep(1.5)  # three body timeouts without reading
                received += len(chunk)
    assert received > big.stat().st_size


# --- the connection limit ------------------------------------------------------------------------------------


def test_connections_beyond_the_limit_get_503_and_the_others_are_served(tmp_path: Path) -> None:
    with serve(tmp_path, max_connections=3, header_timeout_s=WAIT_S * 2) as server:
        connections = server.server.server_state.connections
        idle = [connect(server) for _ in range(3)]
        try:
            wait_until(lambda: len(connections) == 3, timeout_s=WAIT_S, what="three open connections")
            for _ in range(5):
                with connect(server) as extra:
                    extra.sendall(get("/api/jobs"))
                    answer = read_until_closed(extra)
                assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
            assert len(connections) == 3, "the refused ones are not counted"
            idle[0].sendall(get("/api/jobs"))
            assert read_response(idle[0]).startswith(b"HTTP/1.1 200 "), "the open connections are served"
            idle.pop().close()
            wait_until(lambda: len(connections) == 2, timeout_s=WAIT_S, what="a connection closed")
            with connect(server) as again:
                again.sendall(get("/api/jobs"))
                assert read_response(again).startswith(b"HTTP/1.1 200 "), "a freed place is taken again"
        finally:
            for sock in idle:
                sock.close()
