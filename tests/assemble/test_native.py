"""Uncompressed pixels read straight from the file: the same stored values as pydicom's decoder, or not used."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import synthetic
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from gateway.assemble.assemble import assemble_series, assemble_sources
from gateway.assemble.decode import decode_file_frames
from gateway.assemble.native import NativePixels, read_header_and_pixels, read_native_frames
from gateway.assemble.sources import read_source
from gateway.errors import DecodeError


def _quiet_header(path: Path) -> tuple[Dataset, NativePixels | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some shipped files are deliberately malformed
        return read_header_and_pixels(path)


def _native_read(path: Path, pixels: NativePixels, ds: Dataset) -> np.ndarray:
    out = np.empty((pixels.frames, int(ds.Rows), int(ds.Columns)), pixels.dtype)
    return read_native_frames([(path, k + 1, pixels) for k in range(pixels.frames)], out)


def _decoded(path: Path, frames: int) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_file_frames(path, list(range(1, frames + 1)))


def test_every_shipped_native_file_reads_as_pydicom_decodes_it() -> None:
    compared = []
    for name in sorted(get_testdata_files()):  # pydicom's files and pydicom-data's
        path = Path(name)
        if not path.is_file():
            continue
        try:
            ds, pixels = _quiet_header(path)
        except Exception:  # not DICOM enough to have a header: never native
            continue
        if pixels is None:
            continue
        got = _native_read(path, pixels, ds)
        expected = _decoded(path, pixels.frames)
        for frame, reference in zip(got, expected, strict=True):
            assert frame.dtype == reference.dtype, path.name
            np.testing.assert_array_equal(frame, reference, err_msg=path.name)
        compared.append(path.name)
    # pydicom's own files: signed 16-bit, implicit VR, padded, 32-bit multi-frame (pydicom-data adds 8-bit, 12-bit
    # in 16 with garbage above, ...: 56 files here)
    must = {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm", "rtdose.dcm"}
    assert must <= set(compared), f"expected native: {sorted(must - set(compared))}"


@pytest.mark.parametrize(
    "name",
    ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "image_dfl.dcm", "SC_rgb.dcm"],
)
def test_other_files_are_left_to_the_decoder(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    _, pixels = _quiet_header(Path(path))
    assert pixels is None


def _image(
    path: Path,
    stored: np.ndarray,
    *,
    bits_stored: int,
    signed: int,
    syntax: str = ExplicitVRLittleEndian,
    frames: int | None = None,
) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8 * stored.itemsize, bits_stored, bits_stored - 1
    ds.PixelRepresentation = signed
    if frames is not None:
        ds.NumberOfFrames = frames
    data = stored.tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    ds["PixelData"].VR = "OB" if stored.itemsize == 1 else "OW"
    ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("signed", [0, 1])
def test_unused_high_bits_are_masked_or_sign_extended_like_pydicom(tmp_path: Path, syntax: str, signed: int) -> None:
    raw = np.random.default_rng(signed).integers(0, 1 << 16, (2, 5, 7), dtype=np.uint16)  # garbage above bit 11
    path = _image(tmp_path / "x.dcm", raw.view("<i2" if signed else "<u2"), bits_stored=12, signed=signed, frames=2)
    ds, pixels = read_header_and_pixels(path)
    assert pixels is not None and pixels.shift == 4 and pixels.frames == 2
    got = _native_read(path, pixels, ds)
    for frame, reference in zip(got, _decoded(path, 2), strict=True):
        np.testing.assert_array_equal(frame, reference)
    low, high = (-2048, 2047) if signed else (0, 4095)
    assert got.min() >= low and got.max() <= high


def test_odd_length_8_bit_frames(tmp_path: Path) -> None:
    stored = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)  # 45 bytes, padded to 46
    path = _image(tmp_path / "odd.dcm", stored, bits_stored=8, signed=0, frames=3)
    ds, pixels = read_header_and_pixels(path)
    assert pixels is not None and pixels.frame_bytes == 15
    np.testing.assert_array_equal(_native_read(path, pixels, ds), stored)


def test_pixel_data_shorter_than_the_image_is_left_to_the_decoder(tmp_path: Path) -> None:
    path = _image(tmp_path / "x.dcm", np.zeros((4, 4), np.uint16), bits_stored=16, signed=0, frames=2)
    _, pixels = read_header_and_pixels(path)
    assert pixels is None, "two frames declared, one present"


def test_a_file_cut_after_its_header_was_read_fails_with_a_decode_error(tmp_path: Path) -> None:
    path = _image(tmp_path / "x.dcm", np.ones((8, 8), np.uint16), bits_stored=16, signed=0)
    ds, pixels = read_header_and_pixels(path)
    assert pixels is not None
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DecodeError, match="cut short"):
        _native_read(path, pixels, ds)
    with pytest.raises(ValueError, match="frame 2"):
        read_native_frames([(path, 2, pixels)], np.empty((1, 8, 8), np.uint16))


def test_native_pixels_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="dtype"):
        NativePixels(0, 2, 1, "<f4", 0)
    with pytest.raises(ValueError, match="shift"):
        NativePixels(0, 2, 1, "<u2", 16)


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, JPEG2000Lossless])
def test_series_in_other_syntaxes_assemble_as_before(tmp_path: Path, syntax: str) -> None:
    slices = synthetic.ct_slices(4)
    native = synthetic.write(slices, tmp_path / "native")
    for ds in slices:
        if syntax == JPEG2000Lossless:
            ds.compress(syntax)
            continue
        if syntax == ExplicitVRBigEndian:
            ds.PixelData = ds.pixel_array.astype(">u2").tobytes()  # pydicom writes pixel bytes as they are
        ds.file_meta.TransferSyntaxUID = syntax
    other = synthetic.write(slices, tmp_path / "other")
    assert all(read_source(p).pixels is None for p in other)
    assert all(read_source(p).pixels is not None for p in native)
    (expected,) = assemble_series(native).volumes
    (volume,) = assemble_series(other).volumes
    np.testing.assert_array_equal(volume.array, expected.array)


def test_native_and_decoded_paths_give_the_same_volume_and_padding(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(6)
    for ds in slices:
        ds.PixelPaddingValue = 0
    paths = synthetic.write(slices, tmp_path / "ct")
    sources = [read_source(p) for p in paths]
    assert all(s.pixels is not None for s in sources)
    (native,) = assemble_sources(sources).volumes
    (decoded,) = assemble_sources([dataclasses.replace(s, pixels=None) for s in sources]).volumes
    np.testing.assert_array_equal(native.array, decoded.array)
    assert native.padding_mask is not None and decoded.padding_mask is not None
    np.testing.assert_array_equal(native.padding_mask, decoded.padding_mask)
    assert native.padding_mask.any()
    np.testing.assert_array_equal(native.array, synthetic.stored_hu(slices[::-1]))


def test_mixed_native_and_compressed_files_in_one_stack(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(6)
    (expected,) = assemble_series(synthetic.write(slices, tmp_path / "all")).volumes
    for ds in slices[::2]:
        ds.compress(JPEG2000Lossless)
    paths = synthetic.write(slices, tmp_path / "mixed")
    assert {read_source(p).pixels is None for p in paths} == {True, False}
    (volume,) = assemble_series(paths).volumes
    np.testing.assert_array_equal(volume.array, expected.array)


def test_a_large_volume_is_a_plain_writeable_array(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(17, size=512)  # 17.8 MB of float32: above the size mapped with pages in place
    (volume,) = assemble_series(synthetic.write(slices, tmp_path / "ct")).volumes
    assert volume.array.flags.writeable and volume.array.flags.c_contiguous and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, synthetic.stored_hu(slices[::-1]))
    volume.array[0, 0, 0] = 1.5
    assert np.asarray(volume.array.copy())[0, 0, 0] == 1.5
