"""Key Object Selection documents and burned-in key images: what they flag and show, validated."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from encode_cases import GATEWAY_VERSION, Case, dciodvfy, labelmap_result, synthetic_ct
from pydicom.uid import KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage

from gateway.encode import encode_result, write_objects
from gateway.encode.findings import outlines
from gateway.infer.results import ModelResult


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return synthetic_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def labels(ct: Case) -> ModelResult:
    return labelmap_result(ct.volume)


@pytest.fixture(scope="module")
def written(labels: ModelResult, ct: Case, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    objects = encode_result(labels, ct.sources, series_number=40, gateway_version=GATEWAY_VERSION, key_images=True)
    paths = write_objects(objects, tmp_path_factory.mktemp("out"))
    out: dict[str, list[Path]] = {}
    for o, p in zip(objects, paths, strict=True):
        out.setdefault(o.kind, []).append(p)
    return out


def _key_slice(labels: ModelResult, value: int) -> int:
    assert labels.labelmap is not None
    return int(np.argmax((labels.labelmap == value).sum(axis=(1, 2))))


def test_objects_in_order_each_in_its_series(written: dict[str, list[Path]]) -> None:
    assert [kind for kind in written] == ["SEG", "SR", "GSPS", "KO", "SC"]
    numbers = {kind: {int(pydicom.dcmread(p).SeriesNumber) for p in paths} for kind, paths in written.items()}
    assert numbers == {"SEG": {40}, "SR": {41}, "GSPS": {42}, "KO": {43}, "SC": {44}}
    assert len(written["SC"]) == 2, "one key image per finding (lung, bone)"


def test_without_key_images_no_secondary_capture(labels: ModelResult, ct: Case) -> None:
    kinds = [o.kind for o in encode_result(labels, ct.sources, series_number=4, gateway_version=GATEWAY_VERSION)]
    assert kinds == ["SEG", "SR", "GSPS", "KO"]


def test_key_objects_flag_each_findings_largest_image_with_its_outlines(
    written: dict[str, list[Path]], labels: ModelResult
) -> None:
    ds = pydicom.dcmread(written["KO"][0])
    assert ds.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert ds.SeriesDescription == "AI phantom-labels 2.1.0 key images"
    root = ds.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("113000", "DCM")
    gsps = pydicom.dcmread(written["GSPS"][0])
    sr = pydicom.dcmread(written["SR"][0])
    images = [item for item in ds.ContentSequence if item.ValueType == "IMAGE"]
    flagged = [str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in images]
    expected = [labels.volume.slices[_key_slice(labels, v)].sop_instance_uid for v in (1, 3)]
    assert flagged == list(dict.fromkeys(expected))
    for item in images:
        state = item.ReferencedSOPSequence[0].ReferencedSOPSequence[0]
        assert state.ReferencedSOPInstanceUID == gsps.SOPInstanceUID
    composites = {
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in ds.ContentSequence
        if i.ValueType == "COMPOSITE"
    }
    assert composites == {gsps.SOPInstanceUID, sr.SOPInstanceUID}
    description = next(
        i.TextValue for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113012"
    )  # Key Object Description
    assert "lung: image" in description and "bone: image" in description and "not reviewed" in description
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {*flagged, gsps.SOPInstanceUID, sr.SOPInstanceUID}


def test_highdicom_reads_the_key_objects_back(written: dict[str, list[Path]]) -> None:
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(written["KO"][0]))
    assert len(document.content.get_references(value_type=hd.sr.ValueTypeValues.IMAGE)) == 2
    assert len(document.content.get_references(value_type=hd.sr.ValueTypeValues.COMPOSITE)) == 2  # SR and GSPS


def test_key_objects_and_key_images_are_valid(written: dict[str, list[Path]]) -> None:
    for path in (*written["KO"], *written["SC"]):
        verdict = dciodvfy(path)
        assert verdict.errors == [], (path.name, verdict.errors)


def test_a_key_image_burns_in_the_outline_and_the_warning(written: dict[str, list[Path]], labels: ModelResult) -> None:
    ds = pydicom.dcmread(written["SC"][0])
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.BurnedInAnnotation == "YES" and ds.PhotometricInterpretation == "RGB"
    assert "NOT FOR DIAGNOSTIC USE" in ds.ImageComments
    key = _key_slice(labels, 1)
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == labels.volume.slices[key].sop_instance_uid
    pixels = ds.pixel_array
    scale = pixels.shape[0] // labels.volume.array.shape[1]
    assert scale >= 2, "a 128-pixel source is enlarged so that the text is legible"
    assert labels.labelmap is not None
    mask = labels.labelmap[key] == 1
    points = np.vstack(list(outlines(mask)))
    columns = np.rint(points[:, 0] * scale - 0.5).astype(int)
    rows = np.rint(points[:, 1] * scale - 0.5).astype(int)
    lung = np.all(pixels == np.array([80, 160, 255], dtype=np.uint8), axis=-1)
    near = [lung[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].any() for r, c in zip(rows, columns, strict=True)]
    assert np.mean(near) > 0.95, "the lung's outline is drawn in the lung's colour"
    banner = pixels[: pixels.shape[0] // 8]
    assert ((banner[..., 0] > 200) & (banner[..., 1] > 180) & (banner[..., 2] < 60)).sum() > 50, "yellow text"
