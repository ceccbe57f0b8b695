"""QIDO-RS and WADO-RS serve the gateway's own results (gateway.store.outputs), so that a DICOMweb viewer pointed at the
gateway finds them: dicomweb-client against a live gateway over a job run through the real stages
(tests/finished_job.py), study-level counts, paging across outputs and received series, retrieval read back with
highdicom, and retention taking them out of both."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from requests import HTTPError
from sqlalchemy import func, select

from gateway.config import RetentionSettings
from gateway.store.index import Instance, Job, Output, SeriesRevision
from gateway.store.retention import DAY_S, Retention
from gateway.store.store import InstanceStore
from gateway.ui.report import read_report, report_of

from conftest import ADMIN, LiveServer
from finished_job import SLICES, FinishedJob, run_job

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: The modality of each kind of output (a Parametric Map's and key images' are OT, as highdicom writes them).
MODALITIES = {"SEG": "SEG", "SR": "SR", "GSPS": "PR", "KO": "KO", "PM": "OT"}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> FinishedJob:
    return run_job(tmp_path_factory.mktemp("qido-outputs"), maps=True)


@pytest.fixture(scope="module")
def server(job: FinishedJob) -> Iterator[LiveServer]:
    with LiveServer(job.settings()) as live:
        yield live


@pytest.fixture(scope="module")
def dicomweb(server: LiveServer) -> DICOMwebClient:
    return DICOMwebClient(url=f"{server.url}/dicomweb", headers=ADMIN)


def qido(server: LiveServer, path: str, **params: Any) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/dicomweb{path}", params=params, headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def output(job: FinishedJob, kind: str) -> dict[str, Any]:
    ((_, found),) = job.outputs(kind)
    return found


def test_a_viewer_finds_the_result_series_of_the_study(dicomweb: DICOMwebClient, job: FinishedJob) -> None:
    series = [Dataset.from_json(s) for s in dicomweb.search_for_series(job.ct.study_instance_uid)]
    by_uid = {str(s.SeriesInstanceUID): s for s in series}
    assert len(series) == 1 + len(job.detail["outputs"])
    assert by_uid[job.ct.series_instance_uid].Modality == "CT"
    for item in job.detail["outputs"]:
        found = by_uid[item["SeriesInstanceUID"]]
        assert found.Modality == MODALITIES[item["kind"]]
        assert found.NumberOfSeriesRelatedInstances == 1
        assert str(found.SeriesDescription).startswith("AI ")
        assert found.SeriesNumber >= 9000
        assert found.RetrieveURL.endswith(f"/studies/{job.ct.study_instance_uid}/series/{item['SeriesInstanceUID']}")
    seg = dicomweb.search_for_series(search_filters={"Modality": "SEG"})
    assert [Dataset.from_json(s).SeriesInstanceUID for s in seg] == [output(job, "SEG")["SeriesInstanceUID"]]


def test_study_counts_and_modalities_include_the_results(dicomweb: DICOMwebClient, job: FinishedJob) -> None:
    (study,) = [Dataset.from_json(s) for s in dicomweb.search_for_studies()]
    outputs = len(job.detail["outputs"])
    assert study.NumberOfStudyRelatedSeries == 1 + outputs
    assert study.NumberOfStudyRelatedInstances == SLICES + outputs
    assert set(study.ModalitiesInStudy) == {"CT", *(MODALITIES[o["kind"]] for o in job.detail["outputs"])}
    for modalities in ("SEG", "SR,MR", "C?", "KO\\PR"):
        (matched,) = dicomweb.search_for_studies(search_filters={"ModalitiesInStudy": modalities})
        assert Dataset.from_json(matched).StudyInstanceUID == job.ct.study_instance_uid, modalities
    assert dicomweb.search_for_studies(search_filters={"ModalitiesInStudy": "MR"}) == []
    elsewhere = {"ModalitiesInStudy": "SEG", "StudyInstanceUID": "1.2.3"}
    assert dicomweb.search_for_studies(search_filters=elsewhere) == []
    (series,) = dicomweb.search_for_series(search_filters={"Modality": "SR"})
    assert Dataset.from_json(series).NumberOfStudyRelatedSeries == 1 + outputs, "at the series level too"


def test_instances_of_the_results_are_searched_and_matched(dicomweb: DICOMwebClient, job: FinishedJob) -> None:
    study = job.ct.study_instance_uid
    (seg,) = dicomweb.search_for_instances(study, search_filters={"SOPClassUID": SEG_CLASS})
    assert Dataset.from_json(seg).SOPInstanceUID == output(job, "SEG")["SOPInstanceUID"]
    sr = output(job, "SR")
    (found,) = dicomweb.search_for_instances(study, sr["SeriesInstanceUID"], fields=["ContentDate", "ValueType"])
    ds = Dataset.from_json(found)
    assert (ds.SOPInstanceUID, ds.InstanceNumber, ds.ValueType) == (sr["SOPInstanceUID"], 1, "CONTAINER")
    assert ds.ContentDate, "a header attribute read from the output's file"
    everything = dicomweb.search_for_instances(study, get_remaining=True)
    assert len(everything) == SLICES + len(job.detail["outputs"])
    assert dicomweb.search_for_instances(study, search_filters={"Modality": "SEG", "InstanceNumber": "2"}) == []
    assert dicomweb.search_for_series(search_filters={"BodyPartExamined": "CHEST", "Modality": "SEG"}) == []


def test_pages_run_through_the_results_then_the_received_series(server: LiveServer, job: FinishedJob) -> None:
    path = f"/studies/{job.ct.study_instance_uid}/series"
    everything = [s["0020000E"]["Value"][0] for s in qido(server, path)]
    assert everything[-1] == job.ct.series_instance_uid, "the results first, then what was received"
    for size in (1, 2, 4):
        paged = []
        for offset in range(0, len(everything) + size, size):
            paged += [s["0020000E"]["Value"][0] for s in qido(server, path, limit=size, offset=offset)]
        assert paged == everything, size
    outputs = len(job.detail["outputs"])
    instances = qido(server, f"/studies/{job.ct.study_instance_uid}/instances", limit=3, offset=outputs - 1)
    assert [i["00080060"]["Value"][0] for i in instances][1:] == ["CT", "CT"], "the results, then the images"
    assert instances[0]["00080060"]["Value"][0] != "CT"


def test_the_sr_is_retrieved_and_reads_with_highdicom(dicomweb: DICOMwebClient, job: FinishedJob) -> None:
    sr = output(job, "SR")
    retrieved = dicomweb.retrieve_instance(job.ct.study_instance_uid, sr["SeriesInstanceUID"], sr["SOPInstanceUID"])
    report = hd.sr.Comprehensive3DSR.from_dataset(retrieved)
    content = hd.sr.MeasurementReport.from_sequence([report])
    groups = content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["nodule 1", "nodule 2"]
    assert report_of(retrieved) == read_report(job.data_dir / "outputs" / sr["file"])
    on_disk = pydicom.dcmread(job.data_dir / "outputs" / sr["file"])
    assert retrieved.file_meta.TransferSyntaxUID == on_disk.file_meta.TransferSyntaxUID


def test_the_seg_and_the_map_are_retrieved_with_their_metadata(dicomweb: DICOMwebClient, job: FinishedJob) -> None:
    study = job.ct.study_instance_uid
    seg = output(job, "SEG")
    (ds,) = dicomweb.retrieve_series(study, seg["SeriesInstanceUID"])
    segmentation = hd.seg.Segmentation.from_dataset(ds)
    assert segmentation.get_segment_description(1).segment_label == "nodule"
    pm = output(job, "PM")
    (meta,) = dicomweb.retrieve_series_metadata(study, pm["SeriesInstanceUID"])
    header = Dataset.from_json(meta)
    assert header.SOPInstanceUID == pm["SOPInstanceUID"] and "FloatPixelData" not in header
    whole = dicomweb.retrieve_study(study)
    assert len(whole) == SLICES + len(job.detail["outputs"])


def test_results_never_become_received_instances(job: FinishedJob) -> None:
    store = InstanceStore(job.settings().store)
    try:
        with store.sessions() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == SLICES
            assert session.scalar(select(func.count()).select_from(SeriesRevision)) == 1
            assert session.scalar(select(func.count()).select_from(Job)) == 1, "no job made of the results"
            assert session.scalar(select(func.count()).select_from(Output)) == len(job.detail["outputs"])
    finally:
        store.close()


def test_purged_results_leave_qido_and_wado(job: FinishedJob, tmp_path: Path) -> None:
    copy = FinishedJob(shutil.copytree(job.data_dir, tmp_path / "data"), job.job_id, job.ct, job.detail)
    store = InstanceStore(copy.settings().store)
    try:
        settings = RetentionSettings(instances_days=None, outputs_days=1, failed_days=None, disk_high_watermark=1.0)
        report = Retention(store, settings, 0).run(now=time.time() + 2 * DAY_S)
        assert report.outputs == 1
    finally:
        store.close()
    with LiveServer(copy.settings()) as server:
        client = DICOMwebClient(url=f"{server.url}/dicomweb", headers=ADMIN)
        (series,) = client.search_for_series(job.ct.study_instance_uid)
        assert Dataset.from_json(series).SeriesInstanceUID == job.ct.series_instance_uid
        (study,) = [Dataset.from_json(s) for s in client.search_for_studies()]
        assert (study.NumberOfStudyRelatedSeries, study.ModalitiesInStudy) == (1, "CT")
        sr = output(job, "SR")
        with pytest.raises(HTTPError) as excinfo:
            client.retrieve_instance(job.ct.study_instance_uid, sr["SeriesInstanceUID"], sr["SOPInstanceUID"])
        assert excinfo.value.response is not None and excinfo.value.response.status_code == 404
