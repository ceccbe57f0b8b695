"""TID 1500 measurement reports: read back with highdicom, checked against the result and the SEG, validated."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest
from encode_cases import (
    GATEWAY_VERSION,
    Case,
    dciodvfy,
    dsrdump,
    labelmap_result,
    run_model,
    synthetic_ct,
    tilted_ct,
)
from pydicom.sr.codedict import codes

from gateway.encode import EncodedObject, encode_result, write_objects
from gateway.encode.sr import procedure_code
from gateway.infer.results import ModelResult

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
HU = "[hnsf'U]"


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return synthetic_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def nodule(ct: Case) -> ModelResult:
    return run_model("ct-nodule-unet", ct.volume)


@pytest.fixture(scope="module")
def nodule_objects(nodule: ModelResult, ct: Case) -> list[EncodedObject]:
    return encode_result(nodule, ct.sources, series_number=40, gateway_version=GATEWAY_VERSION)


@pytest.fixture(scope="module")
def tissue_objects(ct: Case) -> tuple[ModelResult, list[EncodedObject]]:
    result = run_model("ct-tissue", ct.volume)
    return result, encode_result(result, ct.sources, series_number=40, gateway_version=GATEWAY_VERSION)


def _read(objects: list[EncodedObject], folder: Path) -> hd.sr.Comprehensive3DSR:
    paths = write_objects(objects, folder)
    return hd.sr.srread(paths[1])


def _numbers(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> dict[tuple[str, str | None], float]:
    """(concept meaning, derivation meaning) -> value of every measurement in a group."""
    out = {}
    for m in group.get_measurements():
        derivation = m.derivation.meaning if m.derivation is not None else None
        out[(m.name.meaning, derivation)] = float(m.value)
    return out


def test_a_seg_is_followed_by_its_report_in_the_next_series(nodule_objects: list[EncodedObject], ct: Case) -> None:
    seg, sr = nodule_objects
    assert [o.kind for o in nodule_objects] == ["SEG", "SR"]
    ds, source = sr.dataset, next(iter(ct.sources.values()))
    assert sr.sop_class_uid == COMPREHENSIVE_3D_SR
    assert ds.SeriesNumber == 41 and sr.series_instance_uid not in (seg.series_instance_uid, source.SeriesInstanceUID)
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesDescription == "AI ct-nodule-unet 1.0.0 SR" and ds.Manufacturer == "DICOM AI Gateway"
    assert list(ds.SoftwareVersions) == ["DICOM AI Gateway 0.1.0", "ct-nodule-unet 1.0.0"]
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {seg.sop_instance_uid} | {ref.sop_instance_uid for ref in ct.volume.slices}


def test_observer_is_the_model_as_a_device(nodule_objects: list[EncodedObject], tmp_path: Path) -> None:
    report = _read(nodule_objects, tmp_path)
    text, _ = dsrdump(tmp_path / f"SR-{nodule_objects[1].sop_instance_uid}.dcm")
    assert '(121007,DCM,"Device")' in text
    assert 'Device Observer Name")="ct-nodule-unet 1.0.0"' in text
    assert 'Device Observer Manufacturer")="DICOM AI Gateway"' in text
    assert 'Device Observer Model Name")="ct-nodule-unet"' in text
    assert '(77477000,SCT,"Computed tomography")' in text
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_each_segment_is_a_group_referencing_its_seg_segment(
    nodule_objects: list[EncodedObject], nodule: ModelResult, tmp_path: Path
) -> None:
    seg, _ = nodule_objects
    groups = _read(nodule_objects, tmp_path).content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    reference = group.referenced_segment
    assert reference is not None
    assert reference.referenced_sop_instance_uid == seg.sop_instance_uid
    assert reference.referenced_segment_numbers == [1]
    assert group.tracking_identifier == "nodule"
    assert group.tracking_uid == seg.dataset.SegmentSequence[0].TrackingUID
    assert group.finding_type.value == "27925004"
    assert group.finding_category.value == "49755003"
    values, measured = _numbers(group), nodule.measurements[0]
    assert values[("Volume", None)] == pytest.approx(measured.values["volume"])
    assert values[("Attenuation Coefficient", "Mean")] == pytest.approx(measured.values["mean"])
    assert values[("Attenuation Coefficient", "Standard Deviation")] == pytest.approx(measured.values["stddev"])
    units = {m.name.meaning: m.unit.value for m in group.get_measurements()}
    assert units == {"Volume": "ml", "Attenuation Coefficient": HU, "Probability": "1"}


def test_a_classification_is_a_qualitative_evaluation_with_its_probability(
    nodule_objects: list[EncodedObject], nodule: ModelResult, tmp_path: Path
) -> None:
    assert nodule.classifications, "the nodule model found nothing on the phantom"
    finding = nodule.classifications[0]
    group = _read(nodule_objects, tmp_path).content.get_volumetric_roi_measurement_groups()[0]
    evaluations = [(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()]
    category = ("276214006", "49755003")  # highdicom lists the Finding Category item among them
    assert evaluations == [category, (finding.finding.value, "52101004")]
    assert _numbers(group)[("Probability", "Maximum")] == pytest.approx(finding.probability)


def test_every_overlapping_segment_has_its_group(
    tissue_objects: tuple[ModelResult, list[EncodedObject]], tmp_path: Path
) -> None:
    result, objects = tissue_objects
    groups = _read(objects, tmp_path).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["body", "air", "fat", "soft tissue", "bone"]
    assert [g.referenced_segment.referenced_segment_numbers for g in groups] == [[1], [2], [3], [4], [5]]  # type: ignore[union-attr]
    for group, measured in zip(groups, result.measurements, strict=True):
        assert _numbers(group)[("Volume", None)] == pytest.approx(measured.values["volume"])
    body, air = groups[0], groups[1]
    assert [site.value.value for site in body.finding_sites] == ["38266002"]  # anatomical structure: the site is itself
    assert air.finding_sites == []


def test_labelmap_statistics_and_non_contiguous_labels(ct: Case, tmp_path: Path) -> None:
    result = labelmap_result(ct.volume)
    objects = encode_result(result, ct.sources, series_number=3, gateway_version=GATEWAY_VERSION)
    groups = _read(objects, tmp_path).content.get_volumetric_roi_measurement_groups()
    lung, bone = groups
    assert bone.referenced_segment.referenced_segment_numbers == [2]  # type: ignore[union-attr]
    values = _numbers(lung)
    for statistic, key in (("Mean", "mean"), ("Standard Deviation", "stddev"), ("Minimum", "min"), ("Maximum", "max")):
        assert values[("Attenuation Coefficient", statistic)] == pytest.approx(result.measurements[0].values[key])
    assert ("Probability", "Maximum") not in values  # no classification from the lung
    assert _numbers(bone)[("Probability", "Maximum")] == pytest.approx(0.87)


def test_report_passes_dciodvfy_and_dsrdump(
    nodule_objects: list[EncodedObject], tissue_objects: tuple[ModelResult, list[EncodedObject]], tmp_path: Path
) -> None:
    for objects in (nodule_objects, tissue_objects[1]):
        path = write_objects(objects, tmp_path)[1]
        verdict = dciodvfy(path)
        assert verdict.errors == [], verdict.errors
        print("dciodvfy warnings (SR):", verdict.warnings)
        _, stderr = dsrdump(path)
        assert stderr == ""


def test_assembly_qc_is_reported_with_each_group(tmp_path: Path) -> None:
    case = tilted_ct(tmp_path / "tilt")
    objects = encode_result(run_model("ct-tissue", case.volume), case.sources, series_number=3, gateway_version="2.0")
    path = write_objects(objects, tmp_path / "out")[1]
    text, stderr = dsrdump(path)
    assert stderr == "" and text.count('TEXT:(,,"Comment")="gantry-tilt: slices sheared') == 5
    report = hd.sr.srread(path)
    for group in report.content.get_volumetric_roi_measurement_groups():
        comments = hd.sr.utils.find_content_items(group[0], name=codes.DCM.Comment)
        assert [c.TextValue for c in comments] == [f"gantry-tilt: {case.volume.qc[0].message}"]
    assert dciodvfy(path).errors == []


def test_procedure_follows_the_modality() -> None:
    assert procedure_code("CT") == codes.SCT.ComputedTomography
    assert procedure_code("MR").value == "113091000"
    assert procedure_code(None).value == "363679005"
