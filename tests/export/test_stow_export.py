"""Export by STOW-RS against a real DICOMweb server (a second gateway, with bearer tokens): 200, 202 with
per-instance failures, 409, 401; a server answering 503 (retried, then dead after the attempts); and an archive
that does not take one SOP class (FailureReason 0x0122: refused, the export goes on) or is not authorized to
store it (0x0124: dead)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pacs import deliveries, drain, fast_export, job_of, make_job, outputs, result_files, sop_instance_uid
from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID, GrayscaleSoftcopyPresentationStateStorage

from gateway.config import ExportSettings, HttpSettings, TokenSettings, hash_token
from gateway.errors import ExportError
from gateway.export import queue
from gateway.ingest.stow import boundary_of
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
    assert (row.state, row.attempts, row.last_status, row.last_error) == ("dead", 1, 401, "rejected, HTTP 401")
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
    assert mismatched.last_error == "rejected, HTTP 202, FailureReason 0xA900"
    assert held_by(peer, ours[0]) and not held_by(peer, others[0])

    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "c", 1, seed=3), ["web"])
    assert drain(instance_store, to_web(url), job) == JobState.FAILED
    (row,) = deliveries(instance_store, job)
    assert (row.state, row.last_status, row.last_error) == ("dead", 409, "rejected, HTTP 409, FailureReason 0xA900")


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


class _Archive(ThreadingHTTPServer):
    """A STOW-RS archive on loopback that answers a chosen FailureReason for chosen SOP classes (PS3.18 10.5.3).

    No DICOMweb server at hand can be made to refuse a SOP class (the peer gateway and Orthanc store any), so
    this one reads each part of the real request and answers per instance as an archive would.
    """

    def __init__(self, failures: dict[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _ArchiveHandler)
        self.failures = failures  # SOP Class UID -> FailureReason
        self.stored: list[str] = []  # SOP Instance UIDs

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/studies"

    def answer(self, body: bytes, boundary: bytes) -> tuple[int, dict[str, Any]]:
        stored, failed = [], []
        for part in body.split(b"--" + boundary)[1:-1]:
            ds = pydicom.dcmread(DicomBytesIO(part.partition(b"\r\n\r\n")[2][:-2]), stop_before_pixels=True)
            item = {"00081150": _ui(ds.SOPClassUID), "00081155": _ui(ds.SOPInstanceUID)}
            reason = self.failures.get(str(ds.SOPClassUID))
            if reason is None:
                stored.append(item)
                self.stored.append(str(ds.SOPInstanceUID))
            else:
                failed.append({**item, "00081197": {"vr": "US", "Value": [reason]}})
        answer = {"00081199": {"vr": "SQ", "Value": stored}}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        return (202 if failed else 200), answer


def _ui(uid: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [str(uid)]}


class _ArchiveHandler(BaseHTTPRequestHandler):
    server: _Archive

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status, answer = self.server.answer(body, boundary_of(self.headers["Content-Type"]))
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def archive() -> Iterator[_Archive]:
    server = _Archive({GrayscaleSoftcopyPresentationStateStorage: 0x0122})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_sop_class_the_archive_does_not_support_is_refused(
    archive: _Archive, instance_store: InstanceStore, tmp_path: Path
) -> None:
    files = result_files(tmp_path / "out")
    sent = [files[kind] for kind in ("seg", "sr", "gsps", "ko")]
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, sent, ["web"])
    assert drain(instance_store, to_web(archive.url), job) == JobState.EXPORTED
    gsps_uid = sop_instance_uid(files["gsps"])
    assert sorted(archive.stored) == sorted(sop_instance_uid(f) for f in sent if f != files["gsps"])
    rows = {r.sop_instance_uid: r for r in deliveries(instance_store, job)}
    gsps = rows.pop(gsps_uid)
    reason = (
        f"SOP class {GrayscaleSoftcopyPresentationStateStorage} ({UID(GrayscaleSoftcopyPresentationStateStorage).name})"
        " not supported, HTTP 202, FailureReason 0x0122"
    )
    assert (gsps.state, gsps.attempts, gsps.last_status, gsps.last_error) == ("refused", 1, 202, reason)
    assert {(r.state, r.last_status) for r in rows.values()} == {("delivered", 202)}
    export = job_of(instance_store, job).detail["export"]
    assert (export["delivered"], export["refused"], export["dead"]) == (3, 1, 0)
    assert export["refused_reasons"] == [f"web: {reason}"]

    archive.failures.clear()  # the archive now takes presentation states: the operator retries
    assert queue.retry_job(instance_store, job) == 1
    assert drain(instance_store, to_web(archive.url), job) == JobState.EXPORTED
    assert archive.stored.count(gsps_uid) == 1 and len(archive.stored) == 4, "only the refused one was sent again"
    (gsps,) = [r for r in deliveries(instance_store, job) if r.sop_instance_uid == gsps_uid]
    assert (gsps.state, [h["outcome"] for h in gsps.history]) == ("delivered", ["refused", "requeued", "delivered"])
    with pytest.raises(ExportError, match="no dead or refused delivery"):
        queue.retry_job(instance_store, job)


def test_not_authorized_is_a_dead_letter(archive: _Archive, instance_store: InstanceStore, tmp_path: Path) -> None:
    files = result_files(tmp_path / "out")
    archive.failures[GrayscaleSoftcopyPresentationStateStorage] = 0x0124
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, [files["seg"], files["gsps"]], ["web"])
    assert drain(instance_store, to_web(archive.url), job) == JobState.FAILED
    seg, gsps = deliveries(instance_store, job)
    assert seg.state == "delivered"
    assert (gsps.state, gsps.last_error) == ("dead", "rejected, HTTP 202, FailureReason 0x0124")
    assert job_of(instance_store, job).detail["failure"]["reason"] == f"1 of 2 deliveries dead: web: {gsps.last_error}"
