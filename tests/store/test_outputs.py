"""The gateway's own outputs in the index (gateway.store.outputs), on SQLite and PostgreSQL: recorded as an upsert (a
re-run writes the same UIDs), forgotten, searched with C-FIND matching beside the received instances, and counted
in their study's attributes."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from gateway.ingest.completion import complete_quiet_series
from gateway.store.index import Output
from gateway.store.outputs import (
    OutputRecord,
    count_output_instances,
    count_output_series,
    forget_job_outputs,
    output_files,
    record_job_outputs,
    search_output_instances,
    search_output_series,
    study_outputs,
    with_outputs,
)
from gateway.store.query import InvalidQuery, search_studies
from gateway.store.store import InstanceStore

from dicom_files import minimal_ct

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"


def received_study(store: InstanceStore, tmp_path: Path, name: str = "DOE^JANE") -> tuple[str, int]:
    """A stored CT instance and its completed series' job: ``(study UID, job id)``."""
    study = generate_uid()
    store.put(minimal_ct(tmp_path / f"{study}.dcm", patient_name=name, StudyInstanceUID=study), source="test", now=0.0)
    (done,) = [c for c in complete_quiet_series(store.write_sessions, 0.0, now=100.0) if c.study_instance_uid == study]
    return study, done.job_id


def record(study: str, modality: str, *, sop_class: str = SEG, series: str | None = None) -> OutputRecord:
    return OutputRecord(
        sop_instance_uid=generate_uid(),
        series_instance_uid=series or generate_uid(),
        study_instance_uid=study,
        sop_class_uid=sop_class,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        modality=modality,
        series_number=9000,
        series_description=f"AI test 1.0.0 {modality}",
        instance_number=1,
        rows=8,
        columns=8,
        number_of_frames=1,
        path=f"outputs/job-1/{modality}.dcm",
        size=100,
    )


def owned(store: InstanceStore) -> dict[str, int]:
    with store.sessions() as session:
        return {uid: job for uid, job in session.execute(select(Output.sop_instance_uid, Output.job_id))}


def test_recording_again_replaces_a_jobs_outputs(index_store: InstanceStore, tmp_path: Path) -> None:
    study, job = received_study(index_store, tmp_path)
    seg, sr = record(study, "SEG"), record(study, "SR", sop_class=SR)
    with index_store.write_sessions.begin() as session:
        record_job_outputs(session, job, [seg, sr], now=1.0)
    assert owned(index_store) == {seg.sop_instance_uid: job, sr.sop_instance_uid: job}
    again = OutputRecord(**{**vars(seg), "series_description": "changed", "size": 200})
    with index_store.write_sessions.begin() as session:  # a re-run: the same SEG, no SR this time
        record_job_outputs(session, job, [again], now=2.0)
    with index_store.sessions() as session:
        (row,) = session.scalars(select(Output)).all()
    assert (row.sop_instance_uid, row.series_description, row.size, row.created_at) == (
        seg.sop_instance_uid,
        "changed",
        200,
        2.0,
    )


def test_a_uid_written_by_a_later_job_moves_to_it_and_forgetting_takes_only_its_own(
    index_store: InstanceStore, tmp_path: Path
) -> None:
    study, first = received_study(index_store, tmp_path)
    _, second = received_study(index_store, tmp_path)
    shared, own = record(study, "SEG"), record(study, "KO")
    with index_store.write_sessions.begin() as session:
        record_job_outputs(session, first, [shared, own])
    with index_store.write_sessions.begin() as session:
        record_job_outputs(session, second, [shared])
    assert owned(index_store) == {shared.sop_instance_uid: second, own.sop_instance_uid: first}
    with index_store.write_sessions.begin() as session:
        assert forget_job_outputs(session, first) == 1
    assert owned(index_store) == {shared.sop_instance_uid: second}


def test_a_record_of_a_written_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "outputs" / "job-3").mkdir(parents=True)
    path = minimal_ct(data / "outputs" / "job-3" / "x.dcm", Modality="SEG", SeriesNumber=9000, InstanceNumber=1)
    dataset = pydicom.dcmread(path)
    made = OutputRecord.of(dataset, path, data)
    assert made.path == "outputs/job-3/x.dcm" and made.size == path.stat().st_size
    assert (made.modality, made.series_number, made.instance_number, made.rows) == ("SEG", 9000, 1, 8)
    assert made.transfer_syntax_uid == ExplicitVRLittleEndian
    elsewhere = OutputRecord.of(dataset, path, tmp_path / "other")
    assert elsewhere.path == str(path.resolve()), "outside the data folder: the absolute path"
    del dataset.file_meta
    with pytest.raises(ValueError, match="dataset"):
        OutputRecord.of(dataset, path, data)


def test_searches_match_like_c_find_beside_the_received(index_store: InstanceStore, tmp_path: Path) -> None:
    study, job = received_study(index_store, tmp_path, "DOE^JANE")
    other, other_job = received_study(index_store, tmp_path, "ROE^RICHARD")
    seg_series = generate_uid()
    records = [record(study, "SEG", series=seg_series), record(study, "SR", sop_class=SR), record(other, "SEG")]
    with index_store.write_sessions.begin() as session:
        record_job_outputs(session, job, records[:2])
        record_job_outputs(session, other_job, records[2:])
    with index_store.sessions() as session:
        assert count_output_series(session, {}) == 3
        assert count_output_series(session, {"PatientName": "doe*"}) == 2, "PN: case-insensitive wild card"
        (seg,) = search_output_series(session, {"Modality": "SEG"}, study_instance_uid=study)
        assert (seg.series_instance_uid, seg.attributes["SeriesInstanceUID"]) == (seg_series, seg_series)
        assert seg.attributes["PatientName"] == "DOE^JANE" and seg.attributes["NumberOfSeriesRelatedInstances"] == 1
        assert seg.path == "outputs/job-1/SEG.dcm"
        assert search_output_series(session, {"Modality": "seg"}) == [], "CS: case-sensitive"
        assert search_output_series(session, {"BodyPartExamined": "CHEST"}) == [], "not recorded: no match"
        assert count_output_series(session, {"ModalitiesInStudy": "SR"}) == 2, "a study with an SR output"
        assert count_output_instances(session, {"SOPClassUID": SR}) == 1
        (sr,) = search_output_instances(session, {"InstanceNumber": "1", "Modality": "SR"}, study_instance_uid=study)
        assert sr.sop_instance_uid == records[1].sop_instance_uid and sr.attributes["SOPClassUID"] == SR
        paged = search_output_instances(session, {}, limit=1, offset=1) + search_output_instances(session, {}, offset=2)
        assert len(paged) == 2
        with pytest.raises(InvalidQuery):
            search_output_series(session, {"StudyDate": "2020"})
        assert [f.sop_instance_uid for f in output_files(session, study, seg_series)] == [records[0].sop_instance_uid]
        assert output_files(session, study, generate_uid()) == []


def test_study_attributes_count_the_outputs(index_store: InstanceStore, tmp_path: Path) -> None:
    study, job = received_study(index_store, tmp_path)
    with index_store.write_sessions.begin() as session:
        record_job_outputs(session, job, [record(study, "SEG"), record(study, "SR", sop_class=SR)])
    with index_store.sessions() as session:
        (found,) = with_outputs(session, search_studies(session, {"StudyInstanceUID": study}))
        assert study_outputs(session, [study])[study].modalities == ("SEG", "SR")
        total = session.scalar(select(func.count()).select_from(Output))
    assert total == 2
    attributes = found.attributes
    assert (attributes["NumberOfStudyRelatedSeries"], attributes["NumberOfStudyRelatedInstances"]) == (3, 3)
    assert attributes["ModalitiesInStudy"] == ["CT", "SEG", "SR"]
