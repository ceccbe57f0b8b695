"""Export by STOW-RS against a real DICOMweb server (a second gateway, with bearer tokens): 200, 202 with
per-instance failures, 409, 401; and a server answering 503 (retried, then dead after the attempts)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pacs import deliveries, drain, fast_export, make_job, outputs, sop_instance_uid

from gateway.config import ExportSettings, HttpSettings, TokenSettings, hash_token
from gateway.export import queue
from gateway.jobs.states import JobState
from gateway.store.store import InstanceStore

from conftest import LiveServer, make_settings

WRITE_TOKEN = "stow-export-token-0b8f4d2a9c1e"


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Another gateway, as the DICOMweb archive results are stored to."""
    http = HttpSettings(
        host="127.0.0.1",
        port=0,
        tokens=[TokenSettings(name="exporter", sha256=hash_token(WRITE_TOKEN), scopes=["write"])],
    )
    with LiveServer(make_settings(tmp_path_factory.mktemp("peer") / "data", http=http), start_dimse=False) as server:
        yield server


def to_web(url: str, token: str | None = WRITE_TOKEN, **values: object) -> ExportSettings:
    return fast_export(destinations={"web": {"stow_url": url, "token": token}}, **values)


def held_by(peer: LiveServer, path: Path) -> bool:
    return bool(peer.app.state.store.is_indexed(sop_instance_uid(path)))


def study_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_stored_with_a_bearer_token(peer: LiveServer, instance_store: InstanceStore, tmp_path: Path) -> None:
    files = outputs(tmp_path / "out", 3)
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, files, ["web"])
    assert drain(instance_store, to_web(f"{peer.url}/dicomweb/studies"), job) == JobState.EXPORTED
    assert all(held_by(peer, f) for f in files)
    assert {(r.state, r.attempts, r.last_status) for r in deliveries(instance_store, job)} == {("delivered", 1, 200)}


def test_without_the_right_token_is_a_dead_letter(
    peer: LiveServer, instance_store: InstanceStore, tmp_path: Path
) -> None:
    files = outputs(tmp_path / "out", 1)
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, files, ["web"])
    assert drain(instance_store, to_web(f"{peer.url}/dicomweb/studies", token="wrong"), job) == JobState.FAILED
    (row,) = deliveries(instance_store, job)
    assert (row.state, row.attempts, row.last_status, row.last_error) == ("dead", 1, 401, "refused, HTTP 401")
    assert not held_by(peer, files[0])


def test_partial_acceptance_202_and_conflict_409(
    peer: LiveServer, instance_store: InstanceStore, tmp_path: Path
) -> None:
    ours = outputs(tmp_path / "a", 2, seed=1)
    others = outputs(tmp_path / "b", 1, seed=2)
    url = f"{peer.url}/dicomweb/studies/{study_of(ours[0])}"  # the other study's instance does not belong there
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, [*ours, *others], ["web"])
    assert drain(instance_store, to_web(url), job) == JobState.FAILED
    first, second, mismatched = deliveries(instance_store, job)
    assert (first.state, second.state, first.last_status) == ("delivered", "delivered", 202)
    assert (mismatched.state, mismatched.last_status) == ("dead", 202)
    assert mismatched.last_error == "refused, HTTP 202, FailureReason 0xA900"
    assert held_by(peer, ours[0]) and not held_by(peer, others[0])

    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "c", 1, seed=3), ["web"])
    assert drain(instance_store, to_web(url), job) == JobState.FAILED
    (row,) = deliveries(instance_store, job)
    assert (row.state, row.last_status, row.last_error) == ("dead", 409, "refused, HTTP 409, FailureReason 0xA900")


class _Unavailable(BaseHTTPRequestHandler):
    requests = 0

    def do_POST(self) -> None:
        type(self).requests += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_server_unavailable_is_retried_then_dead(instance_store: InstanceStore, tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        job = make_job(instance_store)
        queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["web"])
        url = f"http://127.0.0.1:{server.server_address[1]}/studies"
        assert drain(instance_store, to_web(url, max_attempts=3), job) == JobState.FAILED
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert _Unavailable.requests == 3, "one request per attempt, both files in it"
    for row in deliveries(instance_store, job):
        assert (row.state, row.attempts) == ("dead", 3)
        assert row.last_error == "gave up after 3 attempts; last: HTTP 503"
        assert [(h["outcome"], h["status"]) for h in row.history] == [("retry", 503)] * 3
