"""Presentation states: outlines on the source images, read back by highdicom and by DCMTK, validated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from encode_cases import GATEWAY_VERSION, Case, dciodvfy, labelmap_result, synthetic_ct
from presentation import off_boundary, render
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage

from gateway.encode import EncodedObject, encode_result, write_objects
from gateway.encode.gsps import layer_name
from gateway.infer.measure import for_reading
from gateway.infer.results import ModelResult


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return synthetic_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def labels(ct: Case) -> ModelResult:
    return labelmap_result(ct.volume)


@pytest.fixture(scope="module")
def written(labels: ModelResult, ct: Case, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    objects = encode_result(labels, ct.sources, series_number=40, gateway_version=GATEWAY_VERSION)
    paths = write_objects(objects, tmp_path_factory.mktemp("out"))
    return {o.kind: p for o, p in zip(objects, paths, strict=True)}


def _path_of(case: Case) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in case.paths}


def test_a_segmentation_gets_a_presentation_state_over_every_source_image(written: dict[str, Path], ct: Case) -> None:
    ds = pydicom.dcmread(written["GSPS"])
    assert ds.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage and ds.Modality == "PR"
    assert ds.SeriesNumber == 42 and ds.SeriesDescription == "AI phantom-labels 2.1.0 outlines"
    source = next(iter(ct.sources.values()))
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    referenced = {
        str(image.ReferencedSOPInstanceUID)
        for series in ds.ReferencedSeriesSequence
        for image in series.ReferencedImageSequence
    }
    assert referenced == {ref.sop_instance_uid for ref in ct.volume.slices}
    layers = {layer.GraphicLayer: layer for layer in ds.GraphicLayerSequence}
    assert list(layers) == ["LUNG", "BONE"]
    assert layers["LUNG"].GraphicLayerRecommendedDisplayGrayscaleValue == 0xFFFF
    assert len(layers["BONE"].GraphicLayerRecommendedDisplayCIELabValue) == 3


def test_the_presentation_state_is_valid(written: dict[str, Path]) -> None:
    verdict = dciodvfy(written["GSPS"])
    assert verdict.errors == [], verdict.errors


def test_each_slice_has_the_outline_of_each_segment_it_shows(written: dict[str, Path], labels: ModelResult) -> None:
    ds = pydicom.dcmread(written["GSPS"])
    by_slice = {ref.sop_instance_uid: k for k, ref in enumerate(labels.volume.slices)}
    drawn: dict[tuple[int, str], int] = {}
    for annotation in ds.GraphicAnnotationSequence:
        k = by_slice[str(annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID)]
        drawn[(k, annotation.GraphicLayer)] = len(annotation.get("GraphicObjectSequence", []))
    assert labels.labelmap is not None
    for value, name in ((1, "LUNG"), (3, "BONE")):
        touched = {k for k in range(labels.labelmap.shape[0]) if (labels.labelmap[k] == value).any()}
        assert {k for k, layer in drawn if layer == name} == touched
        assert all(drawn[(k, name)] >= 1 for k in touched)


def test_dcmtk_reads_outlines_that_lie_on_the_segment_boundary(
    written: dict[str, Path], labels: ModelResult, ct: Case, tmp_path: Path
) -> None:
    """dcmp2pgm renders each slice under the GSPS; every outline point DCMTK read lies within a pixel of the
    boundary of the segment on that slice, and the bitmap shows the presentation state's window."""
    paths = _path_of(ct)
    assert labels.labelmap is not None
    checked = 0
    for k in (4, 12, 20):
        ref = labels.volume.slices[k]
        rendering = render(written["GSPS"], paths[ref.sop_instance_uid], tmp_path / f"{k}.pgm")
        for value, name in ((1, "LUNG"), (3, "BONE")):
            mask = labels.labelmap[k] == value
            polylines = rendering.layers[name].polylines() if name in rendering.layers else []
            assert bool(polylines) == bool(mask.any()), (k, name)
            for points in polylines:
                assert np.array_equal(points[0], points[-1]), "closed"
                assert off_boundary(points, mask) <= 1.0
                checked += 1
        _check_window(rendering.bitmap, labels.volume.array[k], rendering.log)
    assert checked >= 4


def _check_window(bitmap: np.ndarray, hu: np.ndarray, log: str) -> None:
    """The bitmap is the image through the GSPS's VOI window (what DCMTK printed): linear, clipped to 0-255."""
    line = next(line for line in log.splitlines() if "VOI transformation: window center=" in line)
    centre = float(line.split("center=")[1].split()[0])
    width = float(line.split("width=")[1].split()[0])
    expected = np.clip((hu - (centre - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    assert bitmap.shape == hu.shape
    assert np.abs(bitmap.astype(float) - expected).mean() < 2.0


def test_labels_of_findings_on_their_key_image(written: dict[str, Path], labels: ModelResult) -> None:
    ds = pydicom.dcmread(written["GSPS"])
    texts = {
        (annotation.GraphicLayer, str(annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID)): [
            t.UnformattedTextValue for t in annotation.TextObjectSequence
        ]
        for annotation in ds.GraphicAnnotationSequence
        if "TextObjectSequence" in annotation
    }
    assert labels.labelmap is not None
    lung_key = int(np.argmax((labels.labelmap == 1).sum(axis=(1, 2))))
    key_uid = labels.volume.slices[lung_key].sop_instance_uid
    volume = labels.measurements[0].values["volume"]
    assert texts[("LUNG", key_uid)] == [f"lung: {for_reading('volume', volume)} ml"]
    assert sum(1 for layer, _ in texts if layer == "BONE") == 1, "one label per finding"


def test_re_encoding_the_same_result_repeats_every_uid(labels: ModelResult, ct: Case) -> None:
    def uids(objects: list[EncodedObject]) -> list[tuple[str, str, str]]:
        return [(o.kind, o.series_instance_uid, o.sop_instance_uid) for o in objects]

    first = encode_result(labels, ct.sources, series_number=40, gateway_version=GATEWAY_VERSION)
    again = encode_result(labels, ct.sources, series_number=40, gateway_version="9.9.9")
    assert uids(first) == uids(again)
    assert len({uid for _, _, uid in uids(first)}) == len(first)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("nodule", "NODULE"), ("soft tissue", "SOFT TISSUE"), ("air-in-body", "AIR_IN_BODY"), ("é", "_"), ("", "FINDING")],
)
def test_layer_names_are_code_strings(name: str, expected: str) -> None:
    assert layer_name(name) == expected


def test_outlines_on_the_frames_of_a_multiframe_source(ct: Case, tmp_path: Path) -> None:
    from encode_cases import multiframe_ct

    case = multiframe_ct(ct, tmp_path / "mf")
    result = labelmap_result(case.volume)
    objects = encode_result(result, case.sources, series_number=40, gateway_version=GATEWAY_VERSION)
    gsps = next(o for o in objects if o.kind == "GSPS").dataset
    (instance,) = case.sources
    assert result.labelmap is not None
    for annotation in gsps.GraphicAnnotationSequence:
        reference = annotation.ReferencedImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == instance
        k = [ref.frame for ref in case.volume.slices].index(int(reference.ReferencedFrameNumber))
        value = {"LUNG": 1, "BONE": 3}[annotation.GraphicLayer]
        mask = result.labelmap[k] == value
        for item in annotation.GraphicObjectSequence:
            points = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
            assert off_boundary(points, mask) <= 1.0
    ko = next(o for o in objects if o.kind == "KO").dataset
    frames = [i.ReferencedSOPSequence[0].ReferencedFrameNumber for i in ko.ContentSequence if i.ValueType == "IMAGE"]
    assert frames and all(frames)
    for obj in objects[2:]:
        path = write_objects([obj], tmp_path / "out")[0]
        assert dciodvfy(path).errors == [], obj.kind
