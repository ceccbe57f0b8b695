"""Pixel values: Modality LUT, MONOCHROME1, signed and masked stored values, Pixel Padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from gateway.assemble.decode import decode_frame
from gateway.assemble.model import Plane, SliceRef
from gateway.assemble.pixels import ModalityLUT, ModalityTransform, modality_values, padding_mask


def _testdata(name: str) -> Path:
    return Path(get_testdata_file(name))  # type: ignore[arg-type]


def _image(raw: np.ndarray, *, bits_stored: int, signed: int, **attrs: object) -> Dataset:
    """A small grayscale image whose Pixel Data holds ``raw`` (16-bit words) as given."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, signed
    ds.PixelData = raw.astype("<u2").tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _saved(ds: Dataset, dest: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _plane(slope: float, intercept: float) -> Plane:
    return Plane(SliceRef("1.2.3"), Path("x.dcm"), 2, 2, None, None, None, slope, intercept)


# -- stored values: what pydicom's decoding already does ----------------------------------------------------------


def test_signed_12_bit_in_16_is_sign_extended_whatever_the_unused_bits_hold(tmp_path: Path) -> None:
    # -5, 5, -2048, 2047 as 12-bit two's complement, with garbage in the 4 unused high bits.
    raw = np.array([[0x5FFB, 0xA005], [0xF800, 0x07FF]])
    path = _saved(_image(raw, bits_stored=12, signed=1), tmp_path / "s12.dcm")
    stored = decode_frame(path)
    assert stored.dtype == np.int16
    np.testing.assert_array_equal(stored, [[-5, 5], [-2048, 2047]])


def test_unsigned_12_bit_in_16_is_masked(tmp_path: Path) -> None:
    raw = np.array([[0x5FFB, 0xA005], [0xF000, 0x0FFF]])
    path = _saved(_image(raw, bits_stored=12, signed=0), tmp_path / "u12.dcm")
    np.testing.assert_array_equal(decode_frame(path), [[0xFFB, 0x005], [0, 0xFFF]])


def test_signed_values_reach_modality_values(tmp_path: Path) -> None:
    raw = np.array([[0x5FFB, 0xA005], [0xF800, 0x07FF]])
    ds = _image(raw, bits_stored=12, signed=1, RescaleSlope=2, RescaleIntercept=-100)
    values, mask = modality_values(decode_frame(_saved(ds, tmp_path / "s.dcm")), ModalityTransform.from_dataset(ds))
    np.testing.assert_array_equal(values, [[-110, -90], [-4196, 3994]])
    assert values.dtype == np.float32 and mask is None


# -- Modality LUT --------------------------------------------------------------------------------------------------


def test_slope_and_intercept() -> None:
    stored = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    values, mask = modality_values(
        stored, ModalityTransform(bits_stored=12, rescale_slope=0.5, rescale_intercept=-1024)
    )
    np.testing.assert_array_equal(values, [[-1024, -524], [-24, 1023.5]])
    assert values.dtype == np.float32 and mask is None


def test_the_plane_s_per_frame_values_win() -> None:
    stored = np.array([[0, 10], [20, 30]], dtype=np.int16)
    transform = ModalityTransform(pixel_representation=1, rescale_slope=1, rescale_intercept=-1024)
    values, _ = modality_values(stored, transform, _plane(2.0, 5.0))
    np.testing.assert_array_equal(values, [[5, 25], [45, 65]])


def test_per_frame_functional_groups_come_first() -> None:
    ds = _image(np.zeros((2, 2)), bits_stored=16, signed=0, NumberOfFrames=2)
    ds.SharedFunctionalGroupsSequence = Sequence([_pvt(1.0, -1024.0)])
    ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset(), _pvt(2.0, -500.0)])
    first, second = ModalityTransform.from_dataset(ds, 1), ModalityTransform.from_dataset(ds, 2)
    assert (first.rescale_slope, first.rescale_intercept) == (1.0, -1024.0)
    assert (second.rescale_slope, second.rescale_intercept) == (2.0, -500.0)
    del ds.SharedFunctionalGroupsSequence
    assert ModalityTransform.from_dataset(ds, 1).rescale_intercept == 0.0


def _pvt(slope: float, intercept: float) -> Dataset:
    item = Dataset()
    item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "HU"
    group = Dataset()
    group.PixelValueTransformationSequence = Sequence([item])
    return group


def test_enhanced_ct_reads_its_shared_functional_group() -> None:
    ds = pydicom.dcmread(_testdata("eCT_Supplemental.dcm"), stop_before_pixels=True)
    transform = ModalityTransform.from_dataset(ds, 2)
    assert (transform.rescale_slope, transform.rescale_intercept) == (1.0, -1024.0)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR2_UNCR.dcm", "mlut_18.dcm"])
def test_matches_pydicom_modality_lut_on_real_files(name: str) -> None:
    ds = pydicom.dcmread(_testdata(name))
    stored = decode_frame(_testdata(name))
    values, _ = modality_values(stored, ModalityTransform.from_dataset(ds))
    np.testing.assert_allclose(values, apply_modality_lut(stored, ds), rtol=1e-6, atol=1e-3)
    if name == "mlut_18.dcm":
        assert ModalityTransform.from_dataset(ds).modality_lut is not None


def test_modality_lut_sequence_clips_at_both_ends() -> None:
    transform = ModalityTransform(bits_stored=8, modality_lut=ModalityLUT(first_mapped=10, data=(100, 200, 300)))
    values, _ = modality_values(np.array([0, 10, 11, 12, 255], dtype=np.uint8), transform)
    np.testing.assert_array_equal(values, [100, 100, 200, 300, 300])


def test_lut_first_mapped_written_unsigned_for_signed_data() -> None:
    ds = _image(np.zeros((1, 3)), bits_stored=16, signed=1)
    item = Dataset()
    item.add_new(0x00283002, "US", [3, 0xFFFE, 16])  # first mapped -2 as an unsigned word
    item.LUTData = [7, 8, 9]
    ds.ModalityLUTSequence = Sequence([item])
    values, _ = modality_values(np.array([-3, -2, 0, 5], dtype=np.int16), ModalityTransform.from_dataset(ds))
    np.testing.assert_array_equal(values, [7, 7, 9, 9])


# -- MONOCHROME1 ---------------------------------------------------------------------------------------------------


def test_monochrome1_is_inverted_within_the_bits_stored_range() -> None:
    stored = np.array([[0, 1], [4000, 4095]], dtype=np.uint16)
    transform = ModalityTransform(photometric_interpretation="MONOCHROME1", bits_stored=12)
    values, _ = modality_values(stored, transform)
    np.testing.assert_array_equal(values, [[4095, 4094], [95, 0]])
    kept, _ = modality_values(stored, transform, invert_monochrome1=False)
    np.testing.assert_array_equal(kept, stored)


def test_monochrome1_is_inverted_after_the_rescale() -> None:
    # 8-bit unsigned with slope 2, intercept 10: modality range 10..520, mirrored onto itself.
    transform = ModalityTransform("MONOCHROME1", bits_stored=8, rescale_slope=2.0, rescale_intercept=10.0)
    values, _ = modality_values(np.array([0, 5, 255], dtype=np.uint8), transform)
    np.testing.assert_array_equal(values, [520, 510, 10])


def test_monochrome1_signed_maps_its_range_onto_itself() -> None:
    transform = ModalityTransform("MONOCHROME1", bits_stored=12, pixel_representation=1)
    values, _ = modality_values(np.array([-2048, -1, 0, 2047], dtype=np.int16), transform)
    np.testing.assert_array_equal(values, [2047, 0, -1, -2048])


def test_real_monochrome1_radiograph_is_inverted() -> None:
    path = _testdata("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = decode_frame(path)
    values, _ = modality_values(stored, ModalityTransform.from_dataset(ds))
    np.testing.assert_array_equal(values, (1 << ds.BitsStored) - 1 - stored.astype(np.float32))


# -- padding -------------------------------------------------------------------------------------------------------


def test_padding_value_gives_a_mask_and_keeps_its_value(tmp_path: Path) -> None:
    raw = np.array([[-2000, 0], [100, -2000]]).astype(np.int16).view(np.uint16)
    ds = _image(raw, bits_stored=16, signed=1, RescaleSlope=1, RescaleIntercept=-1024, PixelPaddingValue=-2000)
    path = _saved(ds, tmp_path / "pad.dcm", ImplicitVRLittleEndian)  # PixelPaddingValue read back as US or SS
    back = pydicom.dcmread(path)
    values, mask = modality_values(decode_frame(path), ModalityTransform.from_dataset(back))
    assert mask is not None
    np.testing.assert_array_equal(mask, [[True, False], [False, True]])
    np.testing.assert_array_equal(values, [[-3024, -1024], [-924, -3024]])


def test_padding_value_written_unsigned_for_signed_data_still_matches() -> None:
    ds = _image(np.zeros((1, 3)), bits_stored=16, signed=1)
    ds.add_new(0x00280120, "US", 0xF830)  # -2000 as an unsigned 16-bit word
    transform = ModalityTransform.from_dataset(ds)
    assert transform.pixel_padding_value == -2000
    mask = padding_mask(np.array([[-2000, 0, 63536 - 65536]], dtype=np.int16), transform)
    assert mask is not None and mask.tolist() == [[True, False, True]]


def test_padding_range_limit_masks_the_range_inclusive() -> None:
    ds = _image(np.zeros((1, 5)), bits_stored=12, signed=0, PixelPaddingValue=4095, PixelPaddingRangeLimit=4000)
    transform = ModalityTransform.from_dataset(ds)
    mask = padding_mask(np.array([[3999, 4000, 4050, 4095, 0]], dtype=np.uint16), transform)
    assert mask is not None and mask.tolist() == [[False, True, True, True, False]]


def test_padding_is_found_before_monochrome1_inversion() -> None:
    transform = ModalityTransform("MONOCHROME1", bits_stored=8, pixel_padding_value=0)
    values, mask = modality_values(np.array([0, 255], dtype=np.uint8), transform)
    assert mask is not None and mask.tolist() == [True, False]
    assert values.tolist() == [255, 0]


def test_real_ct_padding() -> None:
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    transform = ModalityTransform.from_dataset(ds)
    assert transform.pixel_padding_value == -2000
    stored = decode_frame(_testdata("CT_small.dcm"))
    _, mask = modality_values(stored, transform)
    assert mask is not None and mask.shape == stored.shape
    np.testing.assert_array_equal(mask, stored == -2000)


# -- colour and validation -----------------------------------------------------------------------------------------


def test_colour_passes_through_as_float32() -> None:
    rgb = decode_frame(_testdata("SC_rgb.dcm"))
    ds = pydicom.dcmread(_testdata("SC_rgb.dcm"), stop_before_pixels=True)
    values, mask = modality_values(rgb, ModalityTransform.from_dataset(ds))
    assert values.dtype == np.float32 and mask is None
    np.testing.assert_array_equal(values, rgb)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"bits_stored": 0}, "bits_stored"),
        ({"pixel_representation": 2}, "pixel_representation"),
        ({"pixel_padding_range_limit": 5}, "pixel_padding_range_limit"),
    ],
)
def test_invalid_transform_is_refused(kwargs: dict[str, int], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        ModalityTransform(**kwargs)  # type: ignore[arg-type]


def test_frame_is_one_based() -> None:
    with pytest.raises(ValueError, match="frame"):
        ModalityTransform.from_dataset(_image(np.zeros((1, 1)), bits_stored=8, signed=0), 0)


def test_empty_lut_is_refused() -> None:
    with pytest.raises(ValueError, match="data"):
        ModalityLUT(first_mapped=0, data=())
