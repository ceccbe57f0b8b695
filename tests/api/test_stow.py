"""STOW-RS (PS3.18 10.5): the real dicomweb-client for the happy paths, crafted requests for the bad ones."""

from __future__ import annotations

import logging
import socket
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from gateway.config import IngestSettings, Settings, StoreSettings
from gateway.ingest.stow import StowReceiver, StowRequestError
from gateway.store.index import Instance
from gateway.store.store import InstanceStore

from conftest import ADMIN, LiveServer, make_settings
from dicom_files import (
    RELABELLED,
    SAMPLES,
    dataset_bytes,
    garbage_body,
    minimal_ct,
    overlong_element,
    prepared,
    sample,
    truncated,
)

STOW = "/dicomweb/studies"

# --- helpers ------------------------------------------------------------------------------------------------


def multipart(parts: Iterable[bytes], boundary: str, *, close: bool = True) -> bytes:
    """A multipart/related body of application/dicom parts, optionally without its closing boundary."""
    head = b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
    body = b"".join(head + part + b"\r\n" for part in parts)
    return body + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


def content_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def post_files(server: LiveServer, *paths: Path, url: str = STOW) -> httpx.Response:
    """POST the files, byte for byte, as one STOW-RS request."""
    boundary = uuid.uuid4().hex
    body = multipart((p.read_bytes() for p in paths), boundary)
    headers = {"Content-Type": content_type(boundary), **ADMIN}
    return httpx.post(server.url + url, content=body, headers=headers, timeout=30)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def response_dataset(response: httpx.Response) -> Dataset:
    assert response.headers["content-type"].startswith("application/dicom+json"), response.text
    return Dataset.from_json(response.json())


def referenced(ds: Dataset) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in ds.get("ReferencedSOPSequence", [])]


def failures(ds: Dataset) -> list[tuple[str, int]]:
    """(ReferencedSOPInstanceUID, FailureReason) of each failed instance."""
    return [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in ds.get("FailedSOPSequence", [])]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def store_of(server: LiveServer) -> InstanceStore:
    store: InstanceStore = server.app.state.store
    return store


def stored_paths(server: LiveServer) -> dict[str, Path]:
    """SOP Instance UID -> stored file, from the index."""
    store = store_of(server)
    with store.sessions() as session:
        return {row.sop_instance_uid: store.path_of(row.path) for row in session.scalars(select(Instance))}


def files_in_store(server: LiveServer) -> list[Path]:
    data = store_of(server).data_dir
    return list((data / "tmp").iterdir()) + [p for p in (data / "instances").rglob("*") if p.is_file()]


def assert_nothing_stored(server: LiveServer) -> None:
    assert stored_paths(server) == {}
    assert files_in_store(server) == [], "no partial or orphaned file is left behind"


def assert_still_serves(server: LiveServer, work: Path) -> None:
    good = minimal_ct(work / f"after-{uuid.uuid4().hex}.dcm")
    response = post_files(server, good)
    assert response.status_code == 200, response.text
    assert sop_uid(good) in stored_paths(server)


def series_files(work: Path, count: int, **attrs: Any) -> list[Path]:
    """``count`` small CT instances of one new study and series."""
    work.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    return [
        minimal_ct(
            work / f"{series[-8:]}-{i}.dcm",
            StudyInstanceUID=study,
            SeriesInstanceUID=series,
            InstanceNumber=i + 1,
            **attrs,
        )
        for i in range(count)
    ]


@pytest.fixture
def server(live_server: LiveServer) -> LiveServer:
    return live_server


@pytest.fixture
def custom_server(tmp_path: Path) -> Iterator[Any]:
    """A factory of live servers with some settings sections replaced."""
    servers: list[LiveServer] = []

    def start(**sections: object) -> LiveServer:
        live = LiveServer(make_settings(tmp_path / f"data{len(servers)}", **sections))
        servers.append(live)
        return live.__enter__()

    yield start
    for live in servers:
        live.__exit__(None, None, None)


# --- happy paths: dicomweb-client ---------------------------------------------------------------------------


def test_dicomweb_client_stores_then_retrieves_and_finds_a_study(server: LiveServer, tmp_path: Path) -> None:
    paths = series_files(tmp_path, 3)
    study = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    sources = {sop_uid(p): p for p in paths}
    client = DICOMwebClient(url=f"{server.url}/dicomweb", headers=ADMIN)

    result = client.store_instances([pydicom.dcmread(p) for p in paths])

    assert "FailedSOPSequence" not in result
    assert sorted(referenced(result)) == sorted(sources)
    for item in result.ReferencedSOPSequence:
        uid = item.ReferencedSOPInstanceUID
        assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        # dicomweb-client sends "Host: 127.0.0.1" without the port; the URL follows the Host header.
        assert urlsplit(item.RetrieveURL).path == f"/dicomweb/studies/{study}/instances/{uid}"
    stored = stored_paths(server)
    assert set(stored) == set(sources)
    for uid, source in sources.items():
        assert dataset_bytes(stored[uid]) == dataset_bytes(source), "stored as received"

    for uid, source in sources.items():
        series = str(pydicom.dcmread(source).SeriesInstanceUID)
        retrieved = client.retrieve_instance(study, series, uid)
        original = pydicom.dcmread(source)
        assert retrieved.SOPInstanceUID == uid and retrieved.PixelData == original.PixelData
        assert retrieved.PatientName == original.PatientName
    found = client.search_for_instances(study_instance_uid=study)
    assert {Dataset.from_json(obj).SOPInstanceUID for obj in found} == set(sources)
    assert [Dataset.from_json(obj).StudyInstanceUID for obj in client.search_for_studies()] == [study]


def test_dicomweb_client_stores_to_a_study_url(server: LiveServer, tmp_path: Path) -> None:
    paths = series_files(tmp_path, 2)
    study = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    client = DICOMwebClient(url=f"{server.url}/dicomweb", headers=ADMIN)
    result = client.store_instances([pydicom.dcmread(p) for p in paths], study_instance_uid=study)
    assert urlsplit(result.RetrieveURL).path == f"/dicomweb/studies/{study}"
    assert sorted(referenced(result)) == sorted(sop_uid(p) for p in paths)


def test_every_transfer_syntax_is_stored_byte_for_byte(server: LiveServer, tmp_path: Path) -> None:
    sources = [prepared(ts, tmp_path / f"{ts}.dcm") for ts in sorted({*SAMPLES, *RELABELLED})]
    response = post_files(server, *sources)
    assert response.status_code == 200, response.text
    ds = response_dataset(response)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources]
    assert [str(item.ReferencedSOPInstanceUID) for item in ds.ReferencedSOPSequence] == [
        h.SOPInstanceUID for h in headers
    ], "referenced in the order sent"
    for item, header in zip(ds.ReferencedSOPSequence, headers, strict=True):
        assert item.ReferencedSOPClassUID == header.SOPClassUID
        assert item.RetrieveURL == (
            f"{server.url}/dicomweb/studies/{header.StudyInstanceUID}/instances/{header.SOPInstanceUID}"
        )
    stored = stored_paths(server)
    for source in sources:
        assert stored[sop_uid(source)].read_bytes() == source.read_bytes()


# --- study in the URL ---------------------------------------------------------------------------------------


def test_instances_of_another_study_fail_with_a900(server: LiveServer, tmp_path: Path) -> None:
    mine = series_files(tmp_path / "mine", 2)
    other = series_files(tmp_path / "other", 1)[0]
    study = str(pydicom.dcmread(mine[0]).StudyInstanceUID)

    response = post_files(server, mine[0], other, mine[1], url=f"{STOW}/{study}")

    assert response.status_code == 202, response.text
    ds = response_dataset(response)
    assert ds.RetrieveURL == f"{server.url}/dicomweb/studies/{study}"
    assert referenced(ds) == [sop_uid(mine[0]), sop_uid(mine[1])]
    assert failures(ds) == [(sop_uid(other), 0xA900)]
    assert set(stored_paths(server)) == {sop_uid(p) for p in mine}


def test_all_of_another_study_is_409(server: LiveServer, tmp_path: Path) -> None:
    paths = series_files(tmp_path, 2)
    response = post_files(server, *paths, url=f"{STOW}/{generate_uid()}")
    assert response.status_code == 409, response.text
    ds = response_dataset(response)
    assert referenced(ds) == []
    assert failures(ds) == [(sop_uid(p), 0xA900) for p in paths]
    assert_nothing_stored(server)


def test_malformed_study_uid_in_the_url_is_400(server: LiveServer, tmp_path: Path) -> None:
    response = post_files(server, minimal_ct(tmp_path / "a.dcm"), url=f"{STOW}/1.2.abc")
    assert response.status_code == 400
    assert "StudyInstanceUID" in response.json()["detail"]
    assert_nothing_stored(server)


# --- bad instances ------------------------------------------------------------------------------------------


def _unsupported_syntax(dest: Path) -> Path:
    ds = pydicom.dcmread(minimal_ct(dest))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"  # not a transfer syntax anyone knows
    ds.save_as(dest, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return dest


_CT = "1.2.840.10008.1.2.1"


@pytest.mark.parametrize(
    ("make", "reason", "named"),
    [
        (lambda d: truncated(sample(_CT), d), 0xC002, False),
        (lambda d: overlong_element(sample(_CT), d), 0xC002, False),
        (lambda d: garbage_body(sample(_CT), d), 0xC002, False),
        (lambda d: minimal_ct(d, drop=("StudyInstanceUID",)), 0xC001, True),
        (lambda d: minimal_ct(d, drop=("SOPInstanceUID",)), 0xC001, False),
        (lambda d: minimal_ct(d, StudyInstanceUID="1.2.abc"), 0xC003, True),
        (lambda d: minimal_ct(d, SeriesInstanceUID="1.2.3." + "4" * 80), 0xC003, True),
        (_unsupported_syntax, 0xC122, True),
    ],
    ids=[
        "truncated",
        "overlong-element",
        "garbage",
        "no-study-uid",
        "no-sop-uid",
        "bad-study-uid",
        "overlong-uid",
        "unsupported-ts",
    ],
)
def test_bad_instance_gets_its_failure_reason_and_nothing_is_stored(
    server: LiveServer, tmp_path: Path, make: Any, reason: int, named: bool
) -> None:
    bad = make(tmp_path / "bad.dcm")
    response = post_files(server, bad)
    assert response.status_code == 409, response.text
    ds = response_dataset(response)
    assert referenced(ds) == []
    [(uid, got)] = failures(ds)
    assert got == reason, f"0x{got:04X} != 0x{reason:04X}"
    if named:
        assert uid == sop_uid(bad), "the failure names the instance it concerns"
    assert_nothing_stored(server)
    assert_still_serves(server, tmp_path)


def test_bad_instance_among_good_ones_is_202(server: LiveServer, tmp_path: Path) -> None:
    good = series_files(tmp_path, 2)
    bad = minimal_ct(tmp_path / "bad.dcm", StudyInstanceUID="1.2.abc")
    response = post_files(server, good[0], bad, good[1])
    assert response.status_code == 202, response.text
    ds = response_dataset(response)
    assert referenced(ds) == [sop_uid(good[0]), sop_uid(good[1])]
    assert failures(ds) == [(sop_uid(bad), 0xC003)]
    assert set(stored_paths(server)) == {sop_uid(p) for p in good}


def test_part_that_is_not_dicom_fails(server: LiveServer, tmp_path: Path) -> None:
    good = minimal_ct(tmp_path / "good.dcm")
    boundary = "b0undary"
    body = multipart([good.read_bytes()], boundary).replace(
        b"Content-Type: application/dicom", b"Content-Type: application/octet-stream"
    )
    response = httpx.post(server.url + STOW, content=body, headers={"Content-Type": content_type(boundary), **ADMIN})
    assert response.status_code == 409, response.text
    assert [reason for _, reason in failures(response_dataset(response))] == [0xC000]
    assert_nothing_stored(server)


# --- duplicates ---------------------------------------------------------------------------------------------


def test_duplicate_in_one_request_is_referenced_twice_stored_once(server: LiveServer, tmp_path: Path) -> None:
    path = minimal_ct(tmp_path / "a.dcm")
    response = post_files(server, path, path)
    assert response.status_code == 200, response.text
    assert referenced(response_dataset(response)) == [sop_uid(path)] * 2
    assert list(stored_paths(server)) == [sop_uid(path)]
    assert len(files_in_store(server)) == 1


def test_duplicate_across_requests_is_referenced_and_stored_once(server: LiveServer, tmp_path: Path) -> None:
    path = minimal_ct(tmp_path / "a.dcm")
    client = DICOMwebClient(url=f"{server.url}/dicomweb", headers=ADMIN)
    for _ in range(2):
        result = client.store_instances([pydicom.dcmread(path)])
        assert referenced(result) == [sop_uid(path)] and "FailedSOPSequence" not in result
    stored = stored_paths(server)
    assert list(stored) == [sop_uid(path)]
    assert len(files_in_store(server)) == 1
    assert dataset_bytes(stored[sop_uid(path)]) == dataset_bytes(path)


# --- bad requests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "reason"),
    [
        ("application/dicom", "multipart/related"),
        ('multipart/related; type="application/dicom+json"; boundary=B', "application/dicom+json"),
        ("multipart/form-data; boundary=B", "multipart/related"),
        ("", "multipart/related"),
    ],
    ids=["bare-dicom", "dicom-json-parts", "form-data", "none"],
)
def test_wrong_media_type_is_415(server: LiveServer, tmp_path: Path, media_type: str, reason: str) -> None:
    good = minimal_ct(tmp_path / "a.dcm")
    body = good.read_bytes() if media_type == "application/dicom" else multipart([good.read_bytes()], "B")
    headers = {"Content-Type": media_type, **ADMIN} if media_type else ADMIN
    response = httpx.post(server.url + STOW, content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert reason in response.json()["detail"]
    assert_nothing_stored(server)
    assert_still_serves(server, tmp_path)


def test_missing_boundary_is_400(server: LiveServer, tmp_path: Path) -> None:
    body = multipart([minimal_ct(tmp_path / "a.dcm").read_bytes()], "B")
    response = httpx.post(
        server.url + STOW,
        content=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"', **ADMIN},
    )
    assert response.status_code == 400
    assert "boundary" in response.json()["detail"]
    assert_nothing_stored(server)
    assert_still_serves(server, tmp_path)


@pytest.mark.parametrize(
    "make",
    [
        lambda parts, b: multipart(parts, b, close=False),
        lambda parts, b: multipart(parts, b)[: -len(b) - 30],  # cut inside the last part
        lambda parts, b: b"\x00\xffnot a multipart body at all" * 100,
        lambda parts, b: multipart(parts, b).replace(b"\r\n", b"X", 1),  # a delimiter not ended by CRLF
        lambda parts, b: b"--" + b.encode() + b"--\r\n",  # no part at all
    ],
    ids=["no-closing-boundary", "cut-short", "garbage", "bad-delimiter", "empty"],
)
def test_malformed_multipart_is_400_and_stores_nothing(server: LiveServer, tmp_path: Path, make: Any) -> None:
    parts = [p.read_bytes() for p in series_files(tmp_path, 2)]
    boundary = "4f1ce3e7d3a64b1c"
    body = make(parts, boundary)
    response = httpx.post(server.url + STOW, content=body, headers={"Content-Type": content_type(boundary), **ADMIN})
    assert response.status_code == 400, response.text
    assert response.json()["detail"]
    assert_nothing_stored(server)
    assert_still_serves(server, tmp_path)


def _in_chunks(body: bytes, size: int = 16_384) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413_stores_nothing(custom_server: Any, tmp_path: Path, chunked: bool) -> None:
    limit = 200_000
    server = custom_server(ingest=IngestSettings(stow_max_bytes=limit))
    small = minimal_ct(tmp_path / "small.dcm")
    big = minimal_ct(tmp_path / "big.dcm", Rows=320, Columns=320, PixelData=bytes(320 * 320 * 2))
    boundary = "limit-test"
    body = multipart([small.read_bytes(), big.read_bytes()], boundary)
    assert limit < len(body) < 2 * limit
    content: bytes | Iterator[bytes] = _in_chunks(body) if chunked else body
    headers = {"Content-Type": content_type(boundary), **ADMIN}
    response = httpx.post(server.url + STOW, content=content, headers=headers)
    assert response.status_code == 413, response.text
    assert str(limit) in response.json()["detail"]
    assert_nothing_stored(server)
    assert_still_serves(server, tmp_path)


def test_low_disk_fails_every_instance_with_a700(custom_server: Any, tmp_path: Path) -> None:
    server = custom_server(store=StoreSettings(data_dir=tmp_path / "full", min_free_bytes=1 << 62))
    paths = series_files(tmp_path, 3)
    response = post_files(server, *paths)
    assert response.status_code == 409, response.text
    ds = response_dataset(response)
    assert referenced(ds) == []
    assert [reason for _, reason in failures(ds)] == [0xA700] * 3
    assert_nothing_stored(server)


# --- streaming ----------------------------------------------------------------------------------------------


def test_large_body_is_streamed_not_buffered(server: LiveServer, tmp_path: Path) -> None:
    side = 5600  # 5600 x 5600 x 16 bit: a 60 MB single instance
    big = minimal_ct(tmp_path / "big.dcm", Rows=side, Columns=side, PixelData=bytes(side * side * 2))
    size = big.stat().st_size
    assert size > 60_000_000
    boundary = "streaming-test"
    head = b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
    tail = b"\r\n--" + boundary.encode() + b"--\r\n"

    def body() -> Iterator[bytes]:
        yield head
        with big.open("rb") as fp:
            while chunk := fp.read(1 << 20):
                yield chunk
        yield tail

    tracemalloc.start()
    try:
        response = httpx.post(
            server.url + STOW, content=body(), headers={"Content-Type": content_type(boundary), **ADMIN}, timeout=120
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    assert peak < 20_000_000, f"peak allocations {peak / 1e6:.1f} MB while receiving {size / 1e6:.0f} MB"
    stored = stored_paths(server)[sop_uid(big)]
    assert stored.stat().st_size == size


# --- the receiver itself ------------------------------------------------------------------------------------


def test_receiver_parses_a_body_fed_one_byte_at_a_time(settings: Settings, tmp_path: Path) -> None:
    paths = series_files(tmp_path, 2)
    boundary = "one-byte"
    body = multipart([p.read_bytes() for p in paths], boundary)
    store = InstanceStore(settings.store)
    try:
        receiver = StowReceiver(store, boundary.encode(), max_bytes=len(body))
        for i in range(len(body)):
            receiver.feed(body[i : i + 1])
        result = receiver.finish()
        assert result.http_status == 200
        assert [item.sop_instance_uid for item in result.items] == [sop_uid(p) for p in paths]
        with pytest.raises(StowRequestError) as excinfo:
            StowReceiver(store, boundary.encode(), max_bytes=len(body) - 1).feed(body)
        assert excinfo.value.http_status == 413
    finally:
        store.close()


def test_client_gone_mid_body_stores_nothing(
    server: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    uvicorn_errors = logging.getLogger("uvicorn.error")  # does not propagate to the root logger
    uvicorn_errors.addHandler(caplog.handler)
    try:
        _disconnect_mid_body(server, tmp_path)
    finally:
        uvicorn_errors.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "client disconnected" in caplog.text


def _disconnect_mid_body(server: LiveServer, tmp_path: Path) -> None:
    parts = [p.read_bytes() for p in series_files(tmp_path, 2)]
    boundary = "gone"
    body = multipart(parts, boundary)
    head = (
        f"POST {STOW} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type(boundary)}\r\n"
        f"Authorization: {ADMIN['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body[: len(parts[0]) + 200])  # the whole first part, the start of the second
        tmp = store_of(server).data_dir / "tmp"
        wait_until(lambda: any(tmp.iterdir()), "a part being received")
    wait_until(lambda: files_in_store(server) == [], "the partial files removed")
    assert stored_paths(server) == {}
    assert_still_serves(server, tmp_path)
