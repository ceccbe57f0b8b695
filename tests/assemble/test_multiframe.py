"""Multi-frame files to planes: functional groups (per-frame over shared) and classic multi-frame objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

from gateway.assemble.model import SliceRef
from gateway.assemble.multiframe import enhanced_planes, is_enhanced
from gateway.errors import AssemblyError

SHARED_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # coronal
OVERRIDDEN_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Two echoes of three slices, then one diffusion-weighted frame: (position, echo time, b-value or None).
FRAMES = [((-100.0, 20.0 + 2.5 * k, 50.0), echo, None) for echo in (10.0, 30.0) for k in range(3)] + [
    ((-100.0, 20.0, 50.0), 10.0, 800.0)
]


def pydicom_file(name: str) -> Path:
    """A file shipped with pydicom or pydicom-data."""
    path = get_testdata_file(name)
    if not isinstance(path, str):
        pytest.skip(f"{name} not found (pydicom-data not installed?)")
    return Path(path)


def item(**attributes: object) -> Sequence:
    """A one-item sequence holding the given attributes."""
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return Sequence([ds])


def frame_group(index: int) -> Dataset:
    position, echo_time, b_value = FRAMES[index]
    group = Dataset()
    group.FrameContentSequence = item(
        StackID="1",
        InStackPositionNumber=index % 3 + 1,
        TemporalPositionIndex=1,
        DimensionIndexValues=[1, index % 3 + 1],
    )
    group.PlanePositionSequence = item(ImagePositionPatient=list(position))
    group.MREchoSequence = item(EffectiveEchoTime=echo_time)
    group.MRImageFrameTypeSequence = item(FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"])
    if b_value is not None:
        group.MRDiffusionSequence = item(
            DiffusionBValue=b_value,
            DiffusionDirectionality="DIRECTIONAL",
            DiffusionGradientDirectionSequence=item(DiffusionGradientOrientation=[0.0, 0.70710678, 0.70710678]),
        )
    if index == 1:  # per-frame macros win over the shared ones
        group.PixelValueTransformationSequence = item(RescaleSlope=2.0, RescaleIntercept=-5.0, RescaleType="US")
        group.PlaneOrientationSequence = item(ImageOrientationPatient=list(OVERRIDDEN_ORIENTATION))
    return group


def shared_group() -> Dataset:
    group = Dataset()
    group.PlaneOrientationSequence = item(ImageOrientationPatient=list(SHARED_ORIENTATION))
    group.PixelMeasuresSequence = item(PixelSpacing=[0.5, 0.75], SliceThickness=2.5)
    group.PixelValueTransformationSequence = item(RescaleSlope=1.5, RescaleIntercept=3.0, RescaleType="US")
    return group


def enhanced_mr(path: Path, frames: int | None = None) -> Path:
    """An Enhanced MR Image with per-frame positions, echoes and diffusion, written as a Part 10 file."""
    count = len(FRAMES)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MIXED"]
    ds.NumberOfFrames = count if frames is None else frames
    ds.Rows, ds.Columns = 4, 5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SharedFunctionalGroupsSequence = Sequence([shared_group()])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame_group(k) for k in range(count)])
    ds.PixelData = np.arange(count * 4 * 5, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def enhanced(tmp_path: Path) -> Path:
    return enhanced_mr(tmp_path / "enhanced_mr.dcm")


def test_one_plane_per_frame_with_one_based_frame_numbers(enhanced: Path) -> None:
    planes = enhanced_planes(enhanced)
    uid = str(pydicom.dcmread(enhanced, stop_before_pixels=True).SOPInstanceUID)
    assert [p.ref for p in planes] == [SliceRef(uid, frame=k) for k in range(1, len(FRAMES) + 1)]
    assert all((p.rows, p.columns, p.path) == (4, 5, enhanced) for p in planes)


def test_positions_come_from_each_frame(enhanced: Path) -> None:
    assert [p.position for p in enhanced_planes(enhanced)] == [position for position, _, _ in FRAMES]


def test_per_frame_orientation_wins_over_shared(enhanced: Path) -> None:
    orientations = [p.orientation for p in enhanced_planes(enhanced)]
    assert orientations[1] == OVERRIDDEN_ORIENTATION
    assert orientations[:1] + orientations[2:] == [SHARED_ORIENTATION] * (len(FRAMES) - 1)


def test_per_frame_rescale_wins_over_shared(enhanced: Path) -> None:
    rescale = [(p.rescale_slope, p.rescale_intercept) for p in enhanced_planes(enhanced)]
    assert rescale[1] == (2.0, -5.0)
    assert rescale[:1] + rescale[2:] == [(1.5, 3.0)] * (len(FRAMES) - 1)


def test_pixel_measures_come_from_the_shared_group(enhanced: Path) -> None:
    planes = enhanced_planes(enhanced)
    assert {(p.pixel_spacing, p.slice_thickness) for p in planes} == {((0.5, 0.75), 2.5)}


def test_keys_carry_what_splits_stacks(enhanced: Path) -> None:
    planes = enhanced_planes(enhanced)
    series_uid = str(pydicom.dcmread(enhanced, stop_before_pixels=True).SeriesInstanceUID)
    keys = [dict(p.keys) for p in planes]
    assert {k["SeriesInstanceUID"] for k in keys} == {series_uid}
    assert {k["StackID"] for k in keys} == {"1"}
    assert {k["TemporalPositionIndex"] for k in keys} == {1}
    assert {k["ImageType"] for k in keys} == {("ORIGINAL", "PRIMARY", "M", "NONE")}
    assert [k["EffectiveEchoTime"] for k in keys] == [echo for _, echo, _ in FRAMES]
    assert [k.get("Diffusion") for k in keys] == [None] * 6 + [(800.0, (0.0, 0.7071, 0.7071))]


def test_in_stack_position_is_not_a_key(enhanced: Path) -> None:
    # Slices of one stack must share their keys, or every frame would become its own stack.
    first_echo = enhanced_planes(enhanced)[:3]
    assert len({p.keys for p in first_echo}) == 1


def test_is_enhanced(enhanced: Path) -> None:
    assert is_enhanced(pydicom.dcmread(enhanced, stop_before_pixels=True))
    assert not is_enhanced(pydicom.dcmread(pydicom_file("rtdose.dcm"), stop_before_pixels=True))


def test_per_frame_groups_must_match_the_frame_count(tmp_path: Path) -> None:
    path = enhanced_mr(tmp_path / "short.dcm", frames=len(FRAMES) + 1)
    with pytest.raises(AssemblyError, match="PerFrameFunctionalGroupsSequence has 7 items for 8 frames"):
        enhanced_planes(path)


def test_real_enhanced_ct() -> None:
    planes = enhanced_planes(pydicom_file("eCT_Supplemental.dcm"))  # from pydicom-data
    assert [p.ref.frame for p in planes] == [1, 2]
    assert [p.position for p in planes] == [(99.5, -301.5, -159.0), (99.5, -301.5, -149.0)]
    assert {p.orientation for p in planes} == {(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}
    assert {(p.pixel_spacing, p.slice_thickness) for p in planes} == {((0.388672, 0.388672), 10.0)}
    assert {(p.rescale_slope, p.rescale_intercept) for p in planes} == {(1.0, -1024.0)}
    assert {dict(p.keys)["StackID"] for p in planes} == {"1"}


def test_enhanced_mr_without_functional_groups_has_no_geometry() -> None:
    # emri_small.dcm is an Enhanced MR Image whose functional groups were stripped: honest planes, no positions.
    planes = enhanced_planes(pydicom_file("emri_small.dcm"))
    assert [p.ref.frame for p in planes] == list(range(1, 11))
    assert {(p.position, p.orientation, p.pixel_spacing) for p in planes} == {(None, None, None)}


def test_classic_ultrasound_cine_has_no_geometry() -> None:
    planes = enhanced_planes(pydicom_file("examples_ybr_color.dcm"))
    assert len(planes) == 30
    assert {(p.rows, p.columns, p.position) for p in planes} == {(240, 320, None)}


def test_rt_dose_frames_follow_the_grid_frame_offsets() -> None:
    planes = enhanced_planes(pydicom_file("rtdose.dcm"))
    assert len(planes) == 15
    expected = [(189.43125, 199.43125, -761.87 + 5.0 * k) for k in range(15)]
    np.testing.assert_allclose(np.array([p.position for p in planes], dtype=float), expected, atol=1e-9)
    assert {p.orientation for p in planes} == {(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}
    assert [p.rescale_slope for p in planes] == pytest.approx([1e-6] * 15)  # DoseGridScaling


def test_single_frame_image_gives_one_plane_at_its_position() -> None:
    planes = enhanced_planes(pydicom_file("CT_small.dcm"))
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"), stop_before_pixels=True)
    assert len(planes) == 1
    assert planes[0].ref == SliceRef(str(ds.SOPInstanceUID), frame=1)
    assert planes[0].position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert planes[0].rescale_intercept == float(ds.RescaleIntercept)


def test_unreadable_file_is_an_assembly_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not dicom")
    with pytest.raises(AssemblyError, match="cannot read"):
        enhanced_planes(path)


def test_non_image_is_an_assembly_error(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(AssemblyError, match="not an image"):
        enhanced_planes(path)
