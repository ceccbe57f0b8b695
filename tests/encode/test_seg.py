"""SEG from real model results: segments, codes, references and frame geometry, read back and validated."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from encode_cases import (
    GATEWAY_VERSION,
    IRREGULAR,
    Case,
    affine_positions,
    assert_frames_on_their_sources,
    blurred_labels,
    dciodvfy,
    derivation_sources,
    dsrdump,
    dwi_case,
    frame_positions,
    geometric_result,
    irregular_ct,
    labelmap_result,
    large_labelmap_case,
    map_result,
    multiframe_ct,
    off_grid_mm,
    phantom_labels,
    pixel_positions,
    referenced_instances,
    run_model,
    slice_index,
    synthetic_ct,
    threshold_result,
    tilted_ct,
)
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from gateway.encode import EncodedObject, encode_result, write_objects
from gateway.encode.common import copying_source_names
from gateway.encode.seg import encode_segmentation, segment_numbers
from gateway.errors import EncodeError
from gateway.infer.results import ModelResult
from gateway.registry.manifest import Manifest

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
# What dicom3tools' dciodvfy of 2022 says of a Label Map SEG: it predates the SOP class (DICOM 2024b) and its
# background segment 0, so it cannot check the object at all.
PRE_2024B_DCIODVFY = ("Error - Information Object Not found", "Error - SegmentNumber not monotonically increasing")


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return synthetic_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def tissue(ct: Case) -> ModelResult:
    return run_model("ct-tissue", ct.volume)


@pytest.fixture(scope="module")
def tissue_seg(tissue: ModelResult, ct: Case) -> EncodedObject:
    return encode_result(tissue, ct.sources, series_number=700, gateway_version=GATEWAY_VERSION)[0]


def _written(item: EncodedObject, folder: Path) -> Path:
    return write_objects([item], folder)[0]


def _frame_segments(ds: pydicom.Dataset) -> list[int]:
    """The segment number of every frame (in the shared functional groups when there is one segment)."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    return [
        int(
            (f if "SegmentIdentificationSequence" in f else shared)
            .SegmentIdentificationSequence[0]
            .ReferencedSegmentNumber
        )
        for f in ds.PerFrameFunctionalGroupsSequence
    ]


def test_overlapping_channels_are_a_binary_seg_with_every_segment(
    tissue_seg: EncodedObject, tissue: ModelResult
) -> None:
    ds = tissue_seg.dataset
    assert tissue_seg.kind == "SEG" and tissue_seg.sop_class_uid == SEGMENTATION_STORAGE
    assert ds.SegmentationType == "BINARY"
    labels = tissue.manifest.outputs.segmentation.labels  # type: ignore[union-attr]
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2, 3, 4, 5]
    for item, label in zip(ds.SegmentSequence, labels, strict=True):
        assert item.SegmentLabel == label.name
        category, kind = item.SegmentedPropertyCategoryCodeSequence[0], item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == (label.category.value, "SCT")
        assert (kind.CodeValue, kind.CodeMeaning) == (label.type.value, label.type.meaning)
        assert tuple(item.RecommendedDisplayCIELabValue) == hd.color.CIELabColor.from_rgb(*label.color).value
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ct-tissue", "1.0.0")
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator, family.CodeMeaning) == (
            "123110",
            "DCM",
            "Artificial Intelligence",
        )
        assert item.TrackingID == label.name and item.TrackingUID


def test_new_series_in_the_source_study_and_frame_of_reference(tissue_seg: EncodedObject, ct: Case) -> None:
    ds, source = tissue_seg.dataset, next(iter(ct.sources.values()))
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.SeriesInstanceUID not in (source.SeriesInstanceUID, tissue_seg.sop_instance_uid)
    assert ds.SeriesNumber == 700 and ds.InstanceNumber == 1
    assert ds.SeriesDescription == "AI ct-tissue 1.0.0 SEG"
    assert ds.Manufacturer == "DICOM AI Gateway" and ds.ManufacturerModelName == "ct-tissue"
    assert list(ds.SoftwareVersions) == ["DICOM AI Gateway 0.1.0", "ct-tissue 1.0.0"]
    assert ds.DeviceSerialNumber == "ab" * 32


def test_every_frame_cites_its_source_slice(tissue_seg: EncodedObject, ct: Case) -> None:
    ds, volume = tissue_seg.dataset, ct.volume
    positions = frame_positions(ds)
    indices = slice_index(volume, positions)
    for k, cited, position in zip(indices, derivation_sources(ds), positions, strict=True):
        assert cited == [(volume.slices[k].sop_instance_uid, None, "YES")]
        source = ct.sources[volume.slices[k].sop_instance_uid]
        np.testing.assert_allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-4)
    assert referenced_instances(ds) == {ref.sop_instance_uid for ref in volume.slices}
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid


def test_empty_frames_are_left_out_and_the_masks_round_trip(
    tissue_seg: EncodedObject, tissue: ModelResult, ct: Case, tmp_path: Path
) -> None:
    seg = hd.seg.segread(_written(tissue_seg, tmp_path))
    numbers = segment_numbers(tissue.manifest)
    expected_frames = sum(int(np.count_nonzero(mask.any(axis=(1, 2)))) for mask in tissue.masks.values())
    assert seg.NumberOfFrames == expected_frames
    indices = slice_index(ct.volume, frame_positions(seg))
    pixels = seg.pixel_array
    for frame, (number, k) in enumerate(zip(_frame_segments(seg), indices, strict=True)):
        label = next(value for value, n in numbers.items() if n == number)
        np.testing.assert_array_equal(pixels[frame].astype(bool), tissue.masks[label][k])


def _highdicom_reference(
    result: ModelResult, ds: pydicom.Dataset, sources: dict[str, pydicom.Dataset]
) -> hd.seg.Segmentation:
    """The same masks handed to highdicom as its documentation shows: one C-ordered ``[S, R, C, n]`` uint8 stack,
    and highdicom's own checks."""
    labels = result.manifest.outputs.segmentation.labels  # type: ignore[union-attr]
    with copying_source_names():
        return hd.seg.Segmentation(
            source_images=[sources[ref.sop_instance_uid] for ref in result.volume.slices],
            pixel_array=np.stack([result.masks[label.value] for label in labels], axis=-1).astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[hd.seg.SegmentDescription.from_dataset(item) for item in ds.SegmentSequence],
            series_instance_uid=hd.UID(),
            series_number=1,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="reference",
            manufacturer_model_name="reference",
            software_versions="0",
            device_serial_number="0",
            omit_empty_frames=True,
        )


def _frames_of(ds: pydicom.Dataset) -> list[tuple[int, tuple[float, ...], str]]:
    """Per frame: segment number, position, cited source image."""
    positions = [tuple(float(v) for v in p) for p in frame_positions(ds)]
    cited = [
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    return list(zip(_frame_segments(ds), positions, cited, strict=True))


@pytest.mark.parametrize("overlapping", [True, False], ids=["overlapping", "disjoint"])
def test_the_frames_are_those_highdicom_makes_of_the_masks(overlapping: bool, tissue: ModelResult, ct: Case) -> None:
    """The segment-major stack and the cheaper overlap check change nothing in the SEG: the same frames, in the same
    order, with the same pixels, references and SegmentsOverlap as highdicom's own path."""
    result = tissue if overlapping else dataclasses.replace(tissue, masks=_disjoint(tissue))
    item = encode_segmentation(result, ct.sources, series_number=5, gateway_version=GATEWAY_VERSION)
    ds, reference = item.dataset, _highdicom_reference(result, item.dataset, dict(ct.sources))
    assert ds.SegmentsOverlap == reference.SegmentsOverlap == ("YES" if overlapping else "NO")
    assert ds.NumberOfFrames == reference.NumberOfFrames
    assert _frames_of(ds) == _frames_of(reference)
    assert ds.PixelData == reference.PixelData


def _disjoint(result: ModelResult) -> dict[int, np.ndarray]:
    """The result's masks, each voxel kept in the last segment that holds it only."""
    taken = np.zeros(result.volume.array.shape, dtype=bool)
    masks = {}
    for value in reversed(list(result.masks)):
        masks[value] = result.masks[value] & ~taken
        taken |= masks[value]
    return {value: masks[value] for value in result.masks}


def test_binary_seg_passes_dciodvfy(tissue_seg: EncodedObject, tmp_path: Path) -> None:
    verdict = dciodvfy(_written(tissue_seg, tmp_path))
    assert verdict.errors == [], verdict.errors
    print("dciodvfy warnings (SEG, BINARY):", verdict.warnings)


def test_a_single_segment_label_map_is_binary(ct: Case, tmp_path: Path) -> None:
    nodule = run_model("ct-nodule-unet", ct.volume)
    item = encode_segmentation(nodule, ct.sources, series_number=5, gateway_version=GATEWAY_VERSION)
    ds = item.dataset
    assert ds.SegmentationType == "BINARY" and len(ds.SegmentSequence) == 1
    assert ds.SegmentSequence[0].SegmentLabel == "nodule"
    assert set(_frame_segments(ds)) <= {1}
    assert ds.NumberOfFrames == int(np.count_nonzero(nodule.masks[1].any(axis=(1, 2))))
    assert dciodvfy(_written(item, tmp_path)).errors == []


def test_several_labels_are_binary_by_default_numbered_in_manifest_order(ct: Case, tmp_path: Path) -> None:
    result = labelmap_result(ct.volume)  # labels 1 (lung) and 3 (bone) become segments 1 and 2
    item = encode_segmentation(result, ct.sources, series_number=5, gateway_version=GATEWAY_VERSION)
    ds = hd.seg.segread(_written(item, tmp_path))
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["lung", "bone"]
    indices, pixels = slice_index(ct.volume, frame_positions(ds)), ds.pixel_array
    for frame, (number, k) in enumerate(zip(_frame_segments(ds), indices, strict=True)):
        np.testing.assert_array_equal(pixels[frame].astype(bool), result.labelmap[k] == {1: 1, 2: 3}[number])
    assert dciodvfy(tmp_path / f"SEG-{item.sop_instance_uid}.dcm").errors == []


def test_labelmap_seg_holds_segment_numbers_rle_compressed(ct: Case, tmp_path: Path) -> None:
    result = labelmap_result(ct.volume)
    item = encode_segmentation(result, ct.sources, series_number=5, gateway_version=GATEWAY_VERSION, labelmap=True)
    path = _written(item, tmp_path)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE and ds.SegmentationType == "LABELMAP"
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in ds.SegmentSequence] == [
        (0, "Background"),
        (1, "lung"),
        (2, "bone"),
    ]
    numbered = np.zeros_like(result.labelmap)
    numbered[result.labelmap == 1], numbered[result.labelmap == 3] = 1, 2
    indices = slice_index(ct.volume, frame_positions(ds))
    np.testing.assert_array_equal(ds.pixel_array, numbered[indices])
    native = encode_segmentation(result, ct.sources, series_number=5, gateway_version=GATEWAY_VERSION)
    print(f"LABELMAP RLE {path.stat().st_size} bytes, BINARY {len(native.dataset.PixelData)} bytes of pixel data")
    errors = dciodvfy(path).errors
    assert all(error.startswith(PRE_2024B_DCIODVFY) for error in errors), errors


def test_gantry_tilt_frames_are_the_source_images(tmp_path: Path) -> None:
    """A tilted series is resampled onto an orthogonal grid, but its SEG's frames are the scanner's own images."""
    case = tilted_ct(tmp_path / "tilt")
    assert case.volume.resampled and case.volume.qc[0].code == "gantry-tilt"
    result = run_model("ct-tissue", case.volume)
    item = encode_result(result, case.sources, series_number=9, gateway_version=GATEWAY_VERSION)[0]
    ds = item.dataset
    cited = assert_frames_on_their_sources(ds, case.sources)
    assert {str(image.SOPInstanceUID) for image in cited} <= set(case.sources)
    orientation = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [1, 0, 0, 0, 1, 0], atol=1e-6)
    assert dciodvfy(_written(item, tmp_path)).errors == []


@pytest.mark.parametrize("name", sorted(IRREGULAR))
def test_seg_frames_of_an_irregular_series_are_its_images(name: str, tmp_path: Path) -> None:
    """Tilt, missing slices and uneven spacing together: every frame is a source image at its own position, citing
    it alone, and the segments land on the pixels of that image where the phantom's labels lie."""
    case = irregular_ct(tmp_path / name, **IRREGULAR[name])
    volume = case.volume
    result = geometric_result(volume, case.sources)
    item = encode_result(result, case.sources, series_number=61, gateway_version=GATEWAY_VERSION)[0]
    path = _written(item, tmp_path)
    ds = pydicom.dcmread(path)
    cited = assert_frames_on_their_sources(ds, case.sources)
    uniform = any(flag.code == "uneven-spacing" for flag in volume.qc)
    seg = hd.seg.Segmentation.from_dataset(ds)
    for image in {str(image.SOPInstanceUID): image for image in cited}.values():
        uid = str(image.SOPInstanceUID)
        pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2], combine_segments=True)[0]
        expected = phantom_labels(pixel_positions(image))
        written = np.where(pixels == 2, 3, pixels)  # segment 2 is label 3 (bone)
        # nearest neighbour along the normal may take a slice up to the image's distance from the uniform grid
        undecided = blurred_labels(image, off_grid_mm(volume, image) + 1e-3 if uniform else 1e-3)
        inside = written != 0
        assert np.array_equal(written[~undecided & inside], expected[~undecided & inside])
        assert (expected[~undecided & ~inside] == 0).mean() > 0.97  # 0 only where a tilt shifted out of the volume
    assert verdict_errors(path) == []


def test_missing_slices_alone_keep_each_frame_on_its_image(tmp_path: Path) -> None:
    case = irregular_ct(tmp_path / "gap", drop=(5, 6))
    volume = case.volume
    assert [flag.code for flag in volume.qc] == ["missing-slices"] and not volume.resampled
    item = encode_result(
        geometric_result(volume, case.sources), case.sources, series_number=61, gateway_version=GATEWAY_VERSION
    )[0]
    cited = assert_frames_on_their_sources(item.dataset, case.sources)
    assert len({str(image.SOPInstanceUID) for image in cited}) > 1
    assert verdict_errors(_written(item, tmp_path)) == []


def test_a_resampled_volume_without_source_planes_is_refused(tmp_path: Path) -> None:
    case = tilted_ct(tmp_path / "tilt")
    bare = dataclasses.replace(case.volume, source_planes=())
    result = geometric_result(bare, case.sources)
    with pytest.raises(EncodeError, match="recorded no source planes"):
        encode_result(result, case.sources, series_number=5, gateway_version=GATEWAY_VERSION)


def verdict_errors(path: Path) -> list[str]:
    return dciodvfy(path).errors


def test_multiframe_source_frames_are_cited_by_frame_number(ct: Case, tmp_path: Path) -> None:
    case = multiframe_ct(ct, tmp_path / "mf")
    assert [ref.frame for ref in case.volume.slices] == list(range(24, 0, -1))
    result = run_model("ct-tissue", case.volume)
    item = encode_result(result, case.sources, series_number=9, gateway_version=GATEWAY_VERSION)[0]
    ds = item.dataset
    uid = case.volume.slices[0].sop_instance_uid
    for k, cited in zip(slice_index(case.volume, frame_positions(ds)), derivation_sources(ds), strict=True):
        assert cited == [(uid, case.volume.slices[k].frame, "YES")]
    assert dciodvfy(_written(item, tmp_path)).errors == []


def test_mosaic_tiles_get_positions_from_the_affine(shared_data: Path, tmp_path: Path) -> None:
    case = dwi_case(shared_data)
    volume = case.volume
    result = threshold_result(volume)
    objects = encode_result(result, case.sources, series_number=9, gateway_version=GATEWAY_VERSION)
    seg_path, sr_path = write_objects(objects, tmp_path)
    ds = pydicom.dcmread(seg_path)
    positions = frame_positions(ds)
    np.testing.assert_allclose(positions, affine_positions(volume, slice_index(volume, positions)), atol=1e-4)
    assert all(cited == [] for cited in derivation_sources(ds))  # no source frame is a tile: cited as a whole
    assert referenced_instances(ds) == {ref.sop_instance_uid for refs in volume.slices_4d for ref in refs}
    assert dciodvfy(seg_path).errors == [] and dciodvfy(sr_path).errors == []
    assert dsrdump(sr_path)[1] == ""


def test_an_empty_segmentation_still_encodes(tissue: ModelResult, ct: Case) -> None:
    empty = dataclasses.replace(tissue, masks={value: np.zeros_like(mask) for value, mask in tissue.masks.items()})
    ds = encode_segmentation(empty, ct.sources, series_number=5, gateway_version=GATEWAY_VERSION).dataset
    assert not ds.pixel_array.any()  # highdicom keeps the frames when every one is empty


def test_a_missing_source_is_an_encode_error(tissue: ModelResult, ct: Case) -> None:
    sources = dict(ct.sources)
    del sources[ct.volume.slices[3].sop_instance_uid]
    with pytest.raises(EncodeError, match="slice 3"):
        encode_result(tissue, sources, series_number=5, gateway_version=GATEWAY_VERSION)


def test_a_mask_of_the_wrong_shape_is_an_encode_error(tissue: ModelResult, ct: Case) -> None:
    cropped = dataclasses.replace(tissue, masks={value: mask[:-1] for value, mask in tissue.masks.items()})
    with pytest.raises(EncodeError, match="shape"):
        encode_segmentation(cropped, ct.sources, series_number=5, gateway_version=GATEWAY_VERSION)


def test_a_map_model_has_no_segmentation_to_encode(ct: Case) -> None:
    with pytest.raises(EncodeError, match="no segmentation"):
        encode_segmentation(map_result(ct.volume), ct.sources, series_number=5, gateway_version=GATEWAY_VERSION)


@pytest.mark.slow
def test_encode_time_of_a_large_label_map() -> None:
    """512x512x300 with 5 segments (the issue's target: under 10 s on this CPU); printed, not asserted."""
    result, sources = large_labelmap_case()
    data = result.manifest.model_dump()
    data["outputs"]["segmentation"]["kind"] = "channels"
    channels = dataclasses.replace(result, manifest=Manifest.model_validate(data), labelmap=None)
    for name, case, labelmap in (
        ("label map", result, False),
        ("label map", result, True),
        ("channels", channels, False),
    ):
        began = time.perf_counter()
        item = encode_segmentation(case, sources, series_number=5, gateway_version=GATEWAY_VERSION, labelmap=labelmap)
        seconds = time.perf_counter() - began
        ds = item.dataset
        syntax = ds.file_meta.TransferSyntaxUID
        print(
            f"SEG {ds.SegmentationType} from {name} 512x512x300, 5 segments: {seconds:.2f} s, "
            f"{ds.NumberOfFrames} frames, {len(ds.PixelData) / 2**20:.1f} MiB pixel data, {syntax.name}"
        )
        assert syntax == (RLELossless if labelmap else ExplicitVRLittleEndian)
