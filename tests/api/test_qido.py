"""QIDO-RS: matching, return keys and paging through TestClient and the real dicomweb-client."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from requests import HTTPError
from starlette.exceptions import StarletteDeprecationWarning

from gateway.api import qido
from gateway.api.qido import parse_search
from gateway.config import Settings, StoreSettings
from gateway.store.query import InvalidQuery, search_studies
from gateway.store.store import InstanceStore

from conftest import ADMIN, LiveServer, api_client
from dicom_files import minimal_ct

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app


@dataclass
class Corpus:
    """What the test store holds: UIDs by name, and a pristine copy of every stored file by SOP UID."""

    studies: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    instances: dict[str, list[str]] = field(default_factory=dict)
    originals: dict[str, Path] = field(default_factory=dict)


def write_instance(dest: Path, study: str, series: str, **attrs: Any) -> str:
    """Write a small valid image of ``study``/``series`` with ``attrs`` (and no patient data unless given)."""
    sop_class = CTImageStorage if attrs.get("Modality", "CT") == "CT" else MRImageStorage
    unasked = tuple(k for k in ("PatientName", "PatientID", "Modality") if k not in attrs)
    image = {"Rows": 4, "Columns": 4, "PixelData": bytes(range(32))}
    minimal_ct(
        dest, drop=unasked, SOPClassUID=sop_class, StudyInstanceUID=study, SeriesInstanceUID=series, **image, **attrs
    )
    return str(pydicom.dcmread(dest, stop_before_pixels=True).SOPInstanceUID)


_STUDIES: dict[str, dict[str, Any]] = {
    "A": {
        "PatientName": "Doe^Jane",
        "PatientID": "PID-A",
        "StudyDate": "20200115",
        "StudyTime": "101500",
        "AccessionNumber": "AC%B_1",
        "StudyDescription": "Chest",
        "PatientAge": "042Y",
        "PatientSex": "F",
    },
    "B": {
        "PatientName": "Smith^John",
        "PatientID": "PID-B",
        "StudyDate": "20210620",
        "StudyTime": "143000",
        "AccessionNumber": "ACXBX1",
        "StudyDescription": "Head",
    },
    "C": {
        "PatientName": "DOE^JOHN",
        "PatientID": "pid-a",
        "StudyDate": "20191231",
        "StudyTime": "080000",
        "AccessionNumber": "C-3",
    },
}
#: (study, series name, modality, series number, instance count, extra series attributes)
_SERIES = [
    ("A", "A1", "CT", 1, 3, {"BodyPartExamined": "CHEST", "InstitutionName": "General Hospital"}),
    ("A", "A2", "MR", 2, 1, {"SeriesDescription": "T1"}),
    ("B", "B1", "CT", 1, 2, {}),
    ("C", "C1", "CT", 7, 1, {}),
]


CT_SMALL_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
CT_SMALL_INSTANCE = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


def populate(settings: StoreSettings, work: Path) -> Corpus:
    """Store the synthetic studies of ``_STUDIES``/``_SERIES`` and pydicom's CT_small.dcm (study "CT")."""
    corpus = Corpus()
    store = InstanceStore(settings)
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name in _STUDIES:
            corpus.studies[name] = generate_uid()
        for study, name, modality, number, count, extra in _SERIES:
            corpus.series[name] = generate_uid()
            corpus.instances[name] = []
            for i in range(count):
                path = work / f"{name}-{i}.dcm"
                uid = write_instance(
                    path,
                    corpus.studies[study],
                    corpus.series[name],
                    Modality=modality,
                    SeriesNumber=number,
                    InstanceNumber=i + 1,
                    **_STUDIES[study],
                    **extra,
                )
                _put(store, path, uid, corpus)
                corpus.instances[name].append(uid)
        ct = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
        shutil.copy(ct, work / "ct_small.dcm")
        _put(store, work / "ct_small.dcm", CT_SMALL_INSTANCE, corpus)
        corpus.studies["CT"] = CT_SMALL_STUDY
    finally:
        store.close()
    return corpus


def _put(store: InstanceStore, path: Path, uid: str, corpus: Corpus) -> None:
    original = path.with_suffix(".orig")
    shutil.copy(path, original)
    corpus.originals[uid] = original
    store.put(path, source="test")


@pytest.fixture
def corpus(settings: Settings, tmp_path: Path) -> Corpus:
    return populate(settings.store, tmp_path / "work")


@pytest.fixture
def client(corpus: Corpus, settings: Settings) -> Iterator[TestClient]:
    with api_client(create_app(settings, start_dimse=False)) as test_client:
        yield test_client


@pytest.fixture
def dicomweb(corpus: Corpus, settings: Settings) -> Iterator[DICOMwebClient]:
    with LiveServer(settings) as server:
        yield DICOMwebClient(url=f"{server.url}/dicomweb", headers=ADMIN)


def values(objects: list[dict[str, Any]], tag: str) -> list[Any]:
    """The first value of ``tag`` in each object (``None`` when empty)."""
    return [obj[tag]["Value"][0] if "Value" in obj.get(tag, {}) else None for obj in objects]


def study_uids(client: TestClient, **params: Any) -> set[str]:
    response = client.get("/dicomweb/studies", params=params)
    assert response.status_code == 200, response.text
    return set(values(response.json(), "0020000D"))


# --- matching -----------------------------------------------------------------------------------------------


def test_all_studies_carry_the_standard_return_keys_with_their_vrs(client: TestClient, corpus: Corpus) -> None:
    response = client.get("/dicomweb/studies")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    by_uid = {obj["0020000D"]["Value"][0]: obj for obj in response.json()}
    assert len(by_uid) == 4
    a = by_uid[corpus.studies["A"]]
    assert a["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert a["00080020"] == {"vr": "DA", "Value": ["20200115"]}
    assert a["00201206"] == {"vr": "IS", "Value": [2]}  # NumberOfStudyRelatedSeries
    assert a["00201208"] == {"vr": "IS", "Value": [4]}  # NumberOfStudyRelatedInstances
    assert a["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}  # ModalitiesInStudy
    assert a["00080090"] == {"vr": "PN"}  # ReferringPhysicianName: required, empty
    assert a["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{corpus.studies['A']}")
    assert "00080060" not in a and "00200011" not in a  # no series attributes at the study level
    assert list(a) == sorted(a)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"PatientName": "doe*"}, {"A", "C"}),  # PN: wild card, case-insensitive
        ({"PatientName": "DOE^JANE"}, {"A"}),
        ({"PatientName": "?mith*"}, {"B"}),
        ({"PatientID": "PID-A"}, {"A"}),  # LO: case-sensitive
        ({"PatientID": "PID*"}, {"A", "B"}),
        ({"00100020": "pid-a"}, {"C"}),  # by tag
        ({"AccessionNumber": "AC%B_1"}, {"A"}),  # % and _ are literal
        ({"AccessionNumber": "AC%*"}, {"A"}),
        ({"AccessionNumber": "AC?B?1"}, {"A", "B"}),
        ({"StudyDate": "20200115"}, {"A"}),
        ({"StudyDate": "20200101-20211231"}, {"A", "B"}),
        ({"StudyDate": "-20200115"}, {"A", "C", "CT"}),
        ({"StudyDate": "20200116-"}, {"B"}),
        ({"StudyTime": "1015-1430"}, {"A", "B"}),
        ({"StudyTime": "08"}, {"C"}),
        ({"ModalitiesInStudy": "MR"}, {"A"}),
        ({"ModalitiesInStudy": "CT", "PatientName": "*john"}, {"B", "C"}),
        ({"PatientName": "nobody"}, set()),
    ],
)
def test_study_matching(client: TestClient, corpus: Corpus, params: dict[str, str], expected: set[str]) -> None:
    assert study_uids(client, **params) == {corpus.studies[name] for name in expected}


def test_uid_list_matching(client: TestClient, corpus: Corpus) -> None:
    a, b = corpus.studies["A"], corpus.studies["B"]
    assert study_uids(client, StudyInstanceUID=f"{a},{b}") == {a, b}
    response = client.get("/dicomweb/studies", params=[("StudyInstanceUID", a), ("StudyInstanceUID", b)])
    assert set(values(response.json(), "0020000D")) == {a, b}


def test_series_search_of_a_study_and_of_all(client: TestClient, corpus: Corpus) -> None:
    response = client.get(f"/dicomweb/studies/{corpus.studies['A']}/series")
    assert response.status_code == 200
    series = {obj["0020000E"]["Value"][0]: obj for obj in response.json()}
    assert set(series) == {corpus.series["A1"], corpus.series["A2"]}
    a1 = series[corpus.series["A1"]]
    assert a1["00080060"]["Value"] == ["CT"] and a1["00200011"] == {"vr": "IS", "Value": [1]}
    assert a1["00201209"] == {"vr": "IS", "Value": [3]}  # NumberOfSeriesRelatedInstances
    assert a1["0020000D"]["Value"] == [corpus.studies["A"]]
    assert "00100010" not in a1  # study attributes only for All Series
    everything = client.get("/dicomweb/series", params={"Modality": "CT", "PatientID": "PID*"}).json()
    assert set(values(everything, "0020000E")) == {corpus.series["A1"], corpus.series["B1"]}
    assert all("00100010" in obj for obj in everything)


def test_instance_search_filters_and_levels(client: TestClient, corpus: Corpus) -> None:
    a, a1 = corpus.studies["A"], corpus.series["A1"]
    response = client.get(f"/dicomweb/studies/{a}/series/{a1}/instances", params={"InstanceNumber": "2"})
    assert values(response.json(), "00080018") == [corpus.instances["A1"][1]]
    obj = response.json()[0]
    assert obj["00280010"] == {"vr": "US", "Value": [4]}
    assert obj["00200013"] == {"vr": "IS", "Value": [2]}
    assert obj["0020000E"]["Value"] == [a1] and obj["0020000D"]["Value"] == [a]
    in_study = client.get(f"/dicomweb/studies/{a}/instances", params={"SOPClassUID": str(MRImageStorage)}).json()
    assert values(in_study, "00080018") == corpus.instances["A2"]
    assert in_study[0]["00080060"]["Value"] == ["MR"]  # series attributes for Study's Instances
    everywhere = client.get("/dicomweb/instances", params={"SeriesNumber": "7"}).json()
    assert values(everywhere, "00080018") == corpus.instances["C1"]
    assert everywhere[0]["00100020"]["Value"] == ["pid-a"]  # study attributes for All Instances


# --- includefield -------------------------------------------------------------------------------------------


def test_includefield_reads_header_attributes_at_the_right_level(client: TestClient, corpus: Corpus) -> None:
    params = [("PatientID", "PID-A"), ("includefield", "PatientAge,00080080"), ("includefield", "Modality")]
    study = client.get("/dicomweb/studies", params=params).json()[0]
    assert study["00101010"] == {"vr": "AS", "Value": ["042Y"]}  # PatientAge, from the file
    assert "00080080" not in study and "00080060" not in study  # series-level attributes stay out
    series = client.get(f"/dicomweb/studies/{corpus.studies['A']}/series", params={"includefield": "00080080"})
    names = values(series.json(), "00080080")
    assert sorted(names, key=str) == sorted(["General Hospital", None], key=str)


def test_includefield_all(client: TestClient, corpus: Corpus) -> None:
    obj = client.get("/dicomweb/studies", params={"PatientID": "PID-A", "includefield": "all"}).json()[0]
    assert obj["00101010"]["Value"] == ["042Y"]
    assert "00080080" not in obj and "7FE00010" not in obj
    instance = client.get("/dicomweb/instances", params={"PatientID": "PID-B", "includefield": "all"}).json()[0]
    assert instance["00280100"] == {"vr": "US", "Value": [16]}  # BitsAllocated
    assert "7FE00010" not in instance


def test_empty_value_is_a_return_key(client: TestClient) -> None:
    obj = client.get("/dicomweb/series", params={"InstitutionName": "", "Modality": "CT", "SeriesNumber": "1"})
    names = values(obj.json(), "00080080")
    assert "General Hospital" in names


# --- paging, errors -----------------------------------------------------------------------------------------


def test_limit_and_offset_page_through_stable_results(client: TestClient) -> None:
    everything = values(client.get("/dicomweb/instances").json(), "00080018")
    assert len(everything) == 8
    pages = [
        values(client.get("/dicomweb/instances", params={"limit": 3, "offset": o}).json(), "00080018")
        for o in (0, 3, 6)
    ]
    assert [uid for page in pages for uid in page] == everything
    assert client.get("/dicomweb/instances", params={"offset": 100}).json() == []


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "1.5"}, "offset"),
        ({"NoSuchKeyword": "x"}, "NoSuchKeyword"),
        ({"FFFF0001": "x"}, "FFFF0001"),
        ({"InstitutionName": "x"}, "InstitutionName"),  # known, but the index cannot match on it
        ({"StudyDate": "2020-01-01"}, "StudyDate"),
        ({"StudyInstanceUID": "1.2.abc"}, "StudyInstanceUID"),
        ({"includefield": "NotAnAttribute"}, "NotAnAttribute"),
        ({"fuzzymatching": "maybe"}, "fuzzymatching"),
    ],
)
def test_bad_queries_get_400_with_a_reason(client: TestClient, params: dict[str, str], reason: str) -> None:
    response = client.get("/dicomweb/studies", params=params)
    assert response.status_code == 400
    assert reason in response.json()["detail"]


def test_bad_uid_in_path_is_400(client: TestClient) -> None:
    assert client.get("/dicomweb/studies/1.2.x/series").status_code == 400
    assert client.get("/dicomweb/studies/1.2.3/series").json() == []


def test_unacceptable_accept_is_406(client: TestClient) -> None:
    response = client.get("/dicomweb/studies", headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert response.status_code == 406


def test_fuzzymatching_is_ignored_with_a_warning(client: TestClient, corpus: Corpus) -> None:
    response = client.get("/dicomweb/studies", params={"PatientName": "doe*", "fuzzymatching": "true"})
    assert response.status_code == 200 and len(response.json()) == 2
    assert "fuzzymatching" in response.headers["warning"]


def test_results_beyond_the_cap_are_announced(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qido, "MAX_RESULTS", 3)
    capped = client.get("/dicomweb/studies")
    assert len(capped.json()) == 3
    assert "additional results" in capped.headers["warning"]
    asked = client.get("/dicomweb/studies", params={"limit": 2})
    assert len(asked.json()) == 2 and "warning" not in asked.headers
    last = client.get("/dicomweb/studies", params={"offset": 3})
    assert len(last.json()) == 1 and "warning" not in last.headers


def test_search_functions_directly(settings: Settings, corpus: Corpus) -> None:
    store = InstanceStore(settings.store)
    try:
        with store.sessions() as session:
            found = search_studies(session, {"PatientName": "doe*"}, limit=1, offset=1)
            assert len(found) == 1 and found[0].study_instance_uid in {
                corpus.studies["A"],
                corpus.studies["C"],
            }
            with pytest.raises(InvalidQuery, match="SeriesNumber"):
                search_studies(session, {"SeriesNumber": "1"})
    finally:
        store.close()
    with pytest.raises(InvalidQuery, match="more than once"):
        parse_search([("PatientID", "a"), ("PatientID", "b")], "study")
    assert parse_search([("StudyInstanceUID", "1.2"), ("StudyInstanceUID", "1.3")], "study").filters == {
        "StudyInstanceUID": "1.2,1.3"
    }


# --- dicomweb-client ----------------------------------------------------------------------------------------


def test_dicomweb_client_searches(dicomweb: DICOMwebClient, corpus: Corpus) -> None:
    found = dicomweb.search_for_studies(
        search_filters={"PatientName": "doe*"}, fuzzymatching=False, fields=["StudyDescription", "PatientAge"]
    )
    assert {Dataset.from_json(obj).StudyInstanceUID for obj in found} == {
        corpus.studies["A"],
        corpus.studies["C"],
    }
    a = next(Dataset.from_json(o) for o in found if o["0020000D"]["Value"][0] == corpus.studies["A"])
    assert a.PatientName == "Doe^Jane" and a.StudyDescription == "Chest" and a.PatientAge == "042Y"
    assert a.NumberOfStudyRelatedInstances == 4
    page = dicomweb.search_for_studies(limit=2, offset=1)
    assert len(page) == 2
    assert dicomweb.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    series = dicomweb.search_for_series(corpus.studies["A"], search_filters={"Modality": "MR"})
    assert [Dataset.from_json(s).SeriesInstanceUID for s in series] == [corpus.series["A2"]]
    instances = dicomweb.search_for_instances(corpus.studies["A"], corpus.series["A1"], fields=["00080080"])
    uids = [Dataset.from_json(i).SOPInstanceUID for i in instances]
    assert uids == corpus.instances["A1"]
    assert Dataset.from_json(instances[0]).InstitutionName == "General Hospital"
    assert len(dicomweb.search_for_instances(get_remaining=True)) == 8


def test_dicomweb_client_sees_400(dicomweb: DICOMwebClient) -> None:
    with pytest.raises(HTTPError) as excinfo:
        dicomweb.search_for_studies(search_filters={"NoSuchKeyword": "x"})
    assert excinfo.value.response is not None and excinfo.value.response.status_code == 400
