"""TID 1500 measurement reports: read back with highdicom, checked against the result and the SEG, validated."""

from __future__ import annotations

import math
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from encode_cases import (
    GATEWAY_VERSION,
    THREE_NODULES,
    Case,
    dciodvfy,
    dsrdump,
    labelmap_result,
    run_model,
    synthetic_ct,
    three_nodule_ct,
    tilted_ct,
    truth_nodule_result,
)
from pydicom.sr.codedict import codes

from gateway.encode import EncodedObject, encode_result, write_objects
from gateway.encode.common import Provenance
from gateway.encode.sr import procedure_code, statement
from gateway.infer.lesions import LesionSet
from gateway.infer.measure import for_reading
from gateway.infer.results import ModelResult

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
HU = "[hnsf'U]"


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return synthetic_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def nodules_ct(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return three_nodule_ct(tmp_path_factory.mktemp("nodules"))


@pytest.fixture(scope="module")
def nodules(nodules_ct: Case) -> ModelResult:
    return truth_nodule_result(nodules_ct)


@pytest.fixture(scope="module")
def nodule_objects(nodules: ModelResult, nodules_ct: Case) -> list[EncodedObject]:
    return encode_result(nodules, nodules_ct.sources, series_number=40, gateway_version=GATEWAY_VERSION)


@pytest.fixture(scope="module")
def tissue_objects(ct: Case) -> tuple[ModelResult, list[EncodedObject]]:
    result = run_model("ct-tissue", ct.volume)
    return result, encode_result(result, ct.sources, series_number=40, gateway_version=GATEWAY_VERSION)


def _sr(objects: list[EncodedObject]) -> EncodedObject:
    return next(o for o in objects if o.kind == "SR")


def _read(objects: list[EncodedObject], folder: Path) -> hd.sr.Comprehensive3DSR:
    paths = write_objects(objects, folder)
    return hd.sr.srread(paths[[o.kind for o in objects].index("SR")])


def _numbers(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> dict[tuple[str, str | None], float]:
    """(concept meaning, derivation meaning) -> value of every measurement in a group."""
    out = {}
    for m in group.get_measurements():
        derivation = m.derivation.meaning if m.derivation is not None else None
        out[(m.name.meaning, derivation)] = float(m.value)
    return out


def _comments(item: pydicom.Dataset) -> list[str]:
    return [str(c.TextValue) for c in hd.sr.utils.find_content_items(item, name=codes.DCM.Comment, recursive=True)]


def test_a_seg_is_followed_by_its_report_in_the_next_series(nodule_objects: list[EncodedObject], ct: Case) -> None:
    seg, sr = nodule_objects[:2]
    assert [o.kind for o in nodule_objects] == ["SEG", "SR", "GSPS", "KO"]
    ds = sr.dataset
    source = next(iter(ct.sources.values()))
    assert sr.sop_class_uid == COMPREHENSIVE_3D_SR
    assert ds.SeriesNumber == 41 and sr.series_instance_uid not in (seg.series_instance_uid, source.SeriesInstanceUID)
    assert ds.SeriesDescription == "AI ct-nodule-unet 1.1.0 SR" and ds.Manufacturer == "DICOM AI Gateway"
    assert list(ds.SoftwareVersions) == ["DICOM AI Gateway 0.1.0", "ct-nodule-unet 1.1.0"]
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.sop_instance_uid in evidence


def test_observer_is_the_model_as_a_device(nodule_objects: list[EncodedObject], tmp_path: Path) -> None:
    report = _read(nodule_objects, tmp_path)
    text, _ = dsrdump(tmp_path / f"SR-{_sr(nodule_objects).sop_instance_uid}.dcm")
    assert '(121007,DCM,"Device")' in text
    assert 'Device Observer Name")="ct-nodule-unet 1.1.0"' in text
    assert 'Device Observer Manufacturer")="DICOM AI Gateway"' in text
    assert 'Device Observer Model Name")="ct-nodule-unet"' in text
    assert '(77477000,SCT,"Computed tomography")' in text
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_each_nodule_is_its_own_finding_measured_as_the_truth(
    nodule_objects: list[EncodedObject], nodules: ModelResult, tmp_path: Path
) -> None:
    """Three spheres of known radii: three groups, volumes within 10 %, long and short axis within 1.5 mm."""
    groups = _read(nodule_objects, tmp_path).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["nodule 1", "nodule 2", "nodule 3"]
    truths = sorted(THREE_NODULES, key=lambda n: -n[1])  # numbered by decreasing volume
    for group, (_, radius, _) in zip(groups, truths, strict=True):
        values = _numbers(group)
        assert values[("Volume", None)] == pytest.approx(4 / 3 * math.pi * radius**3 / 1000, rel=0.10)
        assert values[("Long axis", None)] == pytest.approx(2 * radius, abs=1.5)
        assert values[("Short axis", None)] == pytest.approx(2 * radius, abs=1.5)
        assert values[("Short axis", None)] <= values[("Long axis", None)]
        units = {m.name.meaning: m.unit.value for m in group.get_measurements()}
        assert units == {
            "Volume": "ml",
            "Long axis": "mm",
            "Short axis": "mm",
            "Attenuation Coefficient": HU,
            "Probability": "%",
        }
        assert group.finding_type.value == "27925004" and group.finding_category.value == "49755003"
    tracking = [g.tracking_uid for g in groups]
    assert len(set(tracking)) == 3


def test_each_nodule_region_is_its_centre_on_its_largest_image(
    nodule_objects: list[EncodedObject], nodules: ModelResult, nodules_ct: Case, tmp_path: Path
) -> None:
    groups = _read(nodule_objects, tmp_path).content.get_volumetric_roi_measurement_groups()
    truths = sorted(THREE_NODULES, key=lambda n: -n[1])
    found: LesionSet = nodules.lesions[1]
    for group, (centre, _, _), lesion in zip(groups, truths, found.lesions, strict=True):
        assert group.reference_type == codes.DCM.VolumeSurface
        surface = group.roi
        assert surface is not None
        point = surface.graphic_data if not isinstance(surface, list) else surface[0].graphic_data
        assert np.linalg.norm(np.asarray(point).reshape(-1)[:3] - np.array(centre)) < 0.8  # within a voxel
        key = nodules.volume.slices[lesion.key_slice].sop_instance_uid
        cited = hd.sr.utils.find_content_items(group[0], value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
        assert [str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in cited] == [key]
        number = nodules_ct.sources[key].InstanceNumber
        assert f"largest cross-section on image {number} of series 1" in _comments(group[0])


def test_a_classification_is_a_qualitative_evaluation_of_each_nodule(
    nodule_objects: list[EncodedObject], tmp_path: Path
) -> None:
    for group in _read(nodule_objects, tmp_path).content.get_volumetric_roi_measurement_groups():
        evaluations = [(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()]
        category = ("276214006", "49755003")  # highdicom lists the Finding Category item among them
        assert evaluations == [category, ("786838002", "52101004")]
        assert _numbers(group)[("Probability", "Maximum")] == 93


def test_numbers_are_written_as_a_radiologist_reads_them(
    nodule_objects: list[EncodedObject], tissue_objects: tuple[ModelResult, list[EncodedObject]]
) -> None:
    """Volumes to 0.01 ml below 10 ml and 0.1 ml above, HU and mm to 0.1, probabilities to 1 %; the decimal
    string only (no Floating Point Value holding a float's every digit)."""
    decimals = {"Volume": None, "Long axis": 1, "Short axis": 1, "Attenuation Coefficient": 1, "Probability": 0}
    seen = 0
    for objects in (nodule_objects, tissue_objects[1]):
        for item in hd.sr.utils.find_content_items(
            _sr(objects).dataset, value_type=hd.sr.ValueTypeValues.NUM, recursive=True
        ):
            measured = item.MeasuredValueSequence[0]
            assert "FloatingPointValue" not in measured
            text, name = str(measured.NumericValue), item.ConceptNameCodeSequence[0].CodeMeaning
            places = len(text.split(".")[1]) if "." in text else 0
            allowed = decimals[name] if decimals[name] is not None else (2 if abs(float(text)) < 10 else 1)
            assert places <= allowed, (name, text)
            assert re.fullmatch(r"-?\d+(\.\d*[1-9])?", text), f"{text}: no trailing zeros"
            seen += 1
    assert seen > 20


def test_the_report_says_what_it_is(nodule_objects: list[EncodedObject], nodules: ModelResult, tmp_path: Path) -> None:
    ds = _sr(nodule_objects).dataset
    container = next(i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    texts = [str(i.TextValue) for i in container.ContentSequence]
    intended = " ".join(nodules.manifest.intended_use.split())
    assert texts[0] == (
        "Produced automatically by the AI model ct-nodule-unet 1.1.0; not reviewed by a physician. "
        f"Intended use: {intended}"
    )


def test_left_out_and_missing_lesions_are_said(nodules: ModelResult, nodules_ct: Case, tmp_path: Path) -> None:
    import dataclasses

    found = nodules.lesions[1]
    fewer = dataclasses.replace(found, lesions=found.lesions[:2], left_out=4)
    result = dataclasses.replace(nodules, lesions={1: fewer})
    sr = _sr(encode_result(result, nodules_ct.sources, series_number=3, gateway_version="1"))
    assert "nodule: 4 smaller component(s) below 0.03 ml not reported" in _comments(sr.dataset)
    none = dataclasses.replace(nodules, lesions={1: dataclasses.replace(found, lesions=(), left_out=1)})
    objects = encode_result(none, nodules_ct.sources, series_number=3, gateway_version="1")
    assert [o.kind for o in objects] == ["SEG", "SR"], "nothing to outline"
    comments = _comments(_sr(objects).dataset)
    assert "nodule: none found (1 smaller component(s) below 0.03 ml not reported)" in comments
    assert not hd.sr.utils.find_content_items(
        _sr(objects).dataset, name=codes.DCM.ImagingMeasurements, recursive=True
    ), "no empty Imaging Measurements container"
    path = write_objects(objects, tmp_path)[1]
    assert dciodvfy(path).errors == [] and dsrdump(path)[1] == ""


def test_re_running_the_job_repeats_every_uid(nodules: ModelResult, nodules_ct: Case) -> None:
    first = encode_result(nodules, nodules_ct.sources, series_number=40, gateway_version=GATEWAY_VERSION)
    again = encode_result(nodules, nodules_ct.sources, series_number=40, gateway_version=GATEWAY_VERSION)
    assert [o.sop_instance_uid for o in first] == [o.sop_instance_uid for o in again]
    tracking = [
        str(item.UID)
        for item in hd.sr.utils.find_content_items(
            _sr(again).dataset, name=codes.DCM.TrackingUniqueIdentifier, recursive=True
        )
    ]
    assert tracking == [
        str(item.UID)
        for item in hd.sr.utils.find_content_items(
            _sr(first).dataset, name=codes.DCM.TrackingUniqueIdentifier, recursive=True
        )
    ]


def test_each_whole_segment_is_a_group_referencing_its_seg_segment(
    tissue_objects: tuple[ModelResult, list[EncodedObject]], tmp_path: Path
) -> None:
    result, objects = tissue_objects
    seg = objects[0]
    groups = _read(objects, tmp_path).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["body", "air", "fat", "soft tissue", "bone"]
    assert [g.referenced_segment.referenced_segment_numbers for g in groups] == [[1], [2], [3], [4], [5]]  # type: ignore[union-attr]
    for number, group in enumerate(groups, start=1):
        assert group.referenced_segment.referenced_sop_instance_uid == seg.sop_instance_uid  # type: ignore[union-attr]
        assert group.tracking_uid == seg.dataset.SegmentSequence[number - 1].TrackingUID
    for group, measured in zip(groups, result.measurements, strict=True):
        assert _numbers(group)[("Volume", None)] == for_reading("volume", measured.values["volume"])
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
        assert values[("Attenuation Coefficient", statistic)] == for_reading(key, result.measurements[0].values[key])
    assert ("Probability", "Maximum") not in values  # no classification from the lung
    assert _numbers(bone)[("Probability", "Maximum")] == 87


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


def test_the_shipped_nodule_model_reports_each_phantom_nodule(nodules_ct: Case, tmp_path: Path) -> None:
    """The real model on the three-nodule phantom: one group per nodule, as the truth says."""
    result = run_model("ct-nodule-unet", nodules_ct.volume)
    objects = encode_result(result, nodules_ct.sources, series_number=3, gateway_version=GATEWAY_VERSION)
    groups = _read(objects, tmp_path).content.get_volumetric_roi_measurement_groups()
    truths = sorted(THREE_NODULES, key=lambda n: -n[1])
    assert len(groups) == 3
    for group, (_, radius, _) in zip(groups, truths, strict=True):
        assert _numbers(group)[("Volume", None)] == pytest.approx(4 / 3 * math.pi * radius**3 / 1000, rel=0.25)


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


def test_an_intended_use_without_a_full_stop_gets_one(nodules: ModelResult) -> None:
    """A bundle's metadata may end its intended use without a full stop; the report still reads as sentences."""
    provenance = Provenance.of(nodules, "1.0")
    said = statement(provenance, "This is an example,\n not to be used for diagnostic purposes")
    assert said.endswith("Intended use: This is an example, not to be used for diagnostic purposes.")
    assert statement(provenance, "Research only!").endswith("Intended use: Research only!")
