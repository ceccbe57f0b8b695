"""WADO-RS: instances byte for byte, Accept negotiation, metadata, errors; TestClient and dicomweb-client."""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.data import get_testdata_file
from requests import HTTPError
from starlette.exceptions import StarletteDeprecationWarning
from test_qido import CT_SMALL_INSTANCE, CT_SMALL_STUDY, Corpus, populate

from gateway.api import wado
from gateway.api.wado import NotAcceptable, negotiate
from gateway.config import Settings
from gateway.store.query import InstanceFile, instance_files
from gateway.store.store import InstanceStore

from conftest import ADMIN, LiveServer, api_client

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app

JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MR_JP2K_INSTANCE_FILE = "MR_small_jp2klossless.dcm"


@pytest.fixture
def corpus(settings: Settings, tmp_path: Path) -> Corpus:
    corpus = populate(settings.store, tmp_path / "work")
    store = InstanceStore(settings.store)
    try:
        src = Path(get_testdata_file(MR_JP2K_INSTANCE_FILE))  # type: ignore[arg-type]
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        shutil.copy(src, tmp_path / "jp2k.orig")
        shutil.copy(src, tmp_path / "jp2k.dcm")
        store.put(tmp_path / "jp2k.dcm", source="test")
        corpus.studies["JP2K"] = ds.StudyInstanceUID
        corpus.series["JP2K"] = ds.SeriesInstanceUID
        corpus.instances["JP2K"] = [ds.SOPInstanceUID]
        corpus.originals[ds.SOPInstanceUID] = tmp_path / "jp2k.orig"
    finally:
        store.close()
    return corpus


@pytest.fixture
def client(corpus: Corpus, settings: Settings) -> Iterator[TestClient]:
    with api_client(create_app(settings, start_dimse=False)) as test_client:
        yield test_client


@pytest.fixture
def dicomweb(corpus: Corpus, settings: Settings) -> Iterator[DICOMwebClient]:
    with LiveServer(settings) as server:
        yield DICOMwebClient(url=f"{server.url}/dicomweb", headers=ADMIN)


def parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related body (RFC 2046) into (headers, content) pairs, independently of wado.py."""
    match = re.search(r"boundary=\"?([^\";]+)\"?", content_type)
    assert match is not None, content_type
    delimiter = b"--" + match.group(1).encode()
    assert body.startswith(delimiter) and body.rstrip(b"\r\n").endswith(delimiter + b"--")
    found = []
    for chunk in body.split(b"\r\n" + delimiter)[:-1]:
        chunk = chunk.removeprefix(delimiter)
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        found.append((headers, content))
    return found


def sop_uid(content: bytes) -> str:
    return str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(content), stop_before_pixels=True).SOPInstanceUID)


# --- retrieve -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["study", "series", "instance"])
def test_retrieve_sends_the_stored_bytes(client: TestClient, corpus: Corpus, level: str) -> None:
    study, series = corpus.studies["A"], corpus.series["A1"]
    url, expected = f"/dicomweb/studies/{study}", corpus.instances["A1"] + corpus.instances["A2"]
    if level != "study":
        url, expected = f"{url}/series/{series}", corpus.instances["A1"]
    if level == "instance":
        url, expected = f"{url}/instances/{expected[1]}", expected[1:2]
    response = client.get(url)
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    received = parts(content_type, response.content)
    assert sorted(sop_uid(content) for _, content in received) == sorted(expected)
    for headers, content in received:
        assert headers["Content-Type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
        assert content == corpus.originals[sop_uid(content)].read_bytes()


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        (None, 200),
        ("*/*", 200),
        ('multipart/related; type="application/dicom"', 200),
        ("multipart/related; type=application/dicom; transfer-syntax=*", 200),
        (f'multipart/related; type="application/dicom"; transfer-syntax={JPEG2000_LOSSLESS}', 200),
        (f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}', 406),
        ('multipart/related; type="application/octet-stream"', 406),
        ("application/dicom", 406),
        ('multipart/related; type="application/dicom"; q=0', 406),
        (f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}, */*;q=0.1', 200),
    ],
)
def test_accept_negotiation(client: TestClient, corpus: Corpus, accept: str | None, status: int) -> None:
    headers = {} if accept is None else {"Accept": accept}
    response = client.get(f"/dicomweb/studies/{corpus.studies['JP2K']}", headers=headers)
    assert response.status_code == status
    if status == 406:
        assert "transcoding is not supported" in response.json()["detail"]
    else:
        ((part_headers, content),) = parts(response.headers["content-type"], response.content)
        assert part_headers["Content-Type"].endswith(JPEG2000_LOSSLESS)
        assert content == corpus.originals[corpus.instances["JP2K"][0]].read_bytes()


def test_negotiate_directly() -> None:
    negotiate('multipart/related; type="application/dicom"; transfer-syntax=1.2.3', ["1.2.3", "1.2.3"])
    with pytest.raises(NotAcceptable, match=r"1\.2\.3, 1\.2\.4"):
        negotiate('multipart/related; type="application/dicom"; transfer-syntax=1.2.3', ["1.2.3", "1.2.4"])


def test_files_are_streamed_in_chunks(settings: Settings, corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wado, "CHUNK_SIZE", 100)
    store = InstanceStore(settings.store)
    try:
        with store.sessions() as session:
            files: list[InstanceFile] = instance_files(session, CT_SMALL_STUDY)
        chunks = list(wado.multipart_stream(store, files, "b0undary"))
    finally:
        store.close()
    assert max(len(chunk) for chunk in chunks) <= 100 + len("--b0undary\r\nContent-Type: ") + 80
    body = b"".join(chunks)
    ((_, content),) = parts("multipart/related; boundary=b0undary", body)
    assert content == corpus.originals[CT_SMALL_INSTANCE].read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/studies/1.2.3",
        "/studies/{A}/series/1.2.3",
        "/studies/{A}/series/{B1}",  # a series of another study
        "/studies/{A}/series/{A1}/instances/1.2.3",
        "/studies/1.2.3/metadata",
        "/studies/{A}/series/{A1}/instances/{A2_0}/metadata",  # an instance of another series
    ],
)
def test_unknown_uids_are_404(client: TestClient, corpus: Corpus, path: str) -> None:
    uids = {"A": corpus.studies["A"], "A1": corpus.series["A1"], "B1": corpus.series["B1"]}
    response = client.get("/dicomweb" + path.format(A2_0=corpus.instances["A2"][0], **uids))
    assert response.status_code == 404
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/studies/abc",
        "/studies/1..2/series/1.2",
        "/studies/1.2/series/1.2/instances/" + "1" * 65,
        "/studies/x/metadata",
    ],
)
def test_malformed_uids_are_400(client: TestClient, path: str) -> None:
    response = client.get("/dicomweb" + path)
    assert response.status_code == 400
    assert "UID" in response.json()["detail"]


# --- metadata -----------------------------------------------------------------------------------------------


def test_metadata_is_dicom_json_without_bulk_data(client: TestClient, corpus: Corpus) -> None:
    response = client.get(f"/dicomweb/studies/{corpus.studies['A']}/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    objects = response.json()
    assert sorted(obj["00080018"]["Value"][0] for obj in objects) == sorted(
        corpus.instances["A1"] + corpus.instances["A2"]
    )
    for obj in objects:
        assert "7FE00010" not in obj
        assert obj["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
        assert obj["00083002"] == {"vr": "UI", "Value": [EXPLICIT_LE]}  # AvailableTransferSyntaxUID
        assert obj["00280010"] == {"vr": "US", "Value": [4]}
        ds = Dataset.from_json(obj)
        assert ds.StudyInstanceUID == corpus.studies["A"]


def test_metadata_of_series_and_instance(client: TestClient, corpus: Corpus) -> None:
    study, series = corpus.studies["A"], corpus.series["A1"]
    series_meta = client.get(f"/dicomweb/studies/{study}/series/{series}/metadata").json()
    assert len(series_meta) == 3
    uid = corpus.instances["A1"][2]
    (instance_meta,) = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{uid}/metadata").json()
    assert instance_meta["00080018"]["Value"] == [uid]
    assert instance_meta["00200013"] == {"vr": "IS", "Value": [3]}


# --- dicomweb-client ----------------------------------------------------------------------------------------


def test_dicomweb_client_retrieves(dicomweb: DICOMwebClient, corpus: Corpus) -> None:
    study = dicomweb.retrieve_study(CT_SMALL_STUDY)
    assert [str(ds.SOPInstanceUID) for ds in study] == [CT_SMALL_INSTANCE]
    original = pydicom.dcmread(corpus.originals[CT_SMALL_INSTANCE])
    assert np.array_equal(study[0].pixel_array, original.pixel_array)
    series = dicomweb.retrieve_series(corpus.studies["A"], corpus.series["A1"])
    assert sorted(str(ds.SOPInstanceUID) for ds in series) == sorted(corpus.instances["A1"])
    uid = corpus.instances["A1"][0]
    instance = dicomweb.retrieve_instance(corpus.studies["A"], corpus.series["A1"], uid)
    assert instance.SOPInstanceUID == uid
    assert instance.PixelData == pydicom.dcmread(corpus.originals[uid]).PixelData


def test_dicomweb_client_negotiates_transfer_syntax(dicomweb: DICOMwebClient, corpus: Corpus) -> None:
    study, series, (uid,) = corpus.studies["JP2K"], corpus.series["JP2K"], corpus.instances["JP2K"]
    instance = dicomweb.retrieve_instance(study, series, uid, media_types=(("application/dicom", JPEG2000_LOSSLESS),))
    assert instance.file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS
    original = pydicom.dcmread(corpus.originals[uid])
    assert instance.PixelData == original.PixelData
    with pytest.raises(HTTPError) as excinfo:
        dicomweb.retrieve_instance(study, series, uid, media_types=(("application/dicom", EXPLICIT_LE),))
    assert excinfo.value.response is not None and excinfo.value.response.status_code == 406


def test_dicomweb_client_metadata(dicomweb: DICOMwebClient, corpus: Corpus) -> None:
    study, series = corpus.studies["A"], corpus.series["A1"]
    study_meta = dicomweb.retrieve_study_metadata(study)
    assert len(study_meta) == 4
    series_meta = [Dataset.from_json(obj) for obj in dicomweb.retrieve_series_metadata(study, series)]
    assert sorted(ds.SOPInstanceUID for ds in series_meta) == sorted(corpus.instances["A1"])
    assert all(ds.InstitutionName == "General Hospital" for ds in series_meta)
    uid = corpus.instances["A1"][0]
    instance_meta = dicomweb.retrieve_instance_metadata(study, series, uid)  # the client unwraps the array
    assert Dataset.from_json(instance_meta).SOPInstanceUID == uid
    with pytest.raises(HTTPError) as excinfo:
        dicomweb.retrieve_study_metadata("1.2.3.4")
    assert excinfo.value.response is not None and excinfo.value.response.status_code == 404
