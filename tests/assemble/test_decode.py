"""Decoding: every transfer syntax, every pixel-data file shipped with pydicom and pydicom-data, refusals, parallel."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from gateway.assemble.decode import (
    DECODERS,
    decode_file_frames,
    decode_frame,
    decode_frames,
    dependency_table,
    is_available,
    plan_chunks,
)
from gateway.errors import DecodeError

Array = npt.NDArray[np.generic]

# -- the shipped test files --------------------------------------------------------------------------------------

#: Files that decode to exactly the pixels of another shipped, uncompressed file: lossless pairs, and lossy files
#: whose decoded reference was made by another toolkit (``*_UNCI`` by GDCM, ``*_dcmd`` by DCMTK's dcmdjpeg).
EXACT: dict[str, str] = {
    "MR_small_implicit.dcm": "MR_small.dcm",
    "MR_small_bigendian.dcm": "MR_small.dcm",
    "MR_small_expb.dcm": "MR_small.dcm",
    "MR_small_RLE.dcm": "MR_small.dcm",
    "MR_small_jp2klossless.dcm": "MR_small.dcm",
    "MR_small_jpeg_ls_lossless.dcm": "MR_small.dcm",
    "emri_small_big_endian.dcm": "emri_small.dcm",
    "emri_small_RLE.dcm": "emri_small.dcm",
    "emri_small_jpeg_2k_lossless.dcm": "emri_small.dcm",
    "emri_small_jpeg_ls_lossless.dcm": "emri_small.dcm",
    "OBXXXX1A_expb.dcm": "OBXXXX1A.dcm",
    "OBXXXX1A_rle.dcm": "OBXXXX1A.dcm",
    "OBXXXX1A_expb_2frame.dcm": "OBXXXX1A_2frame.dcm",
    "OBXXXX1A_rle_2frame.dcm": "OBXXXX1A_2frame.dcm",
    "SC_rgb_expb.dcm": "SC_rgb.dcm",
    "SC_rgb_rle.dcm": "SC_rgb.dcm",
    "SC_rgb_jpeg_gdcm.dcm": "SC_rgb.dcm",
    "SC_rgb_expb_2frame.dcm": "SC_rgb_2frame.dcm",
    "SC_rgb_rle_2frame.dcm": "SC_rgb_2frame.dcm",
    "SC_rgb_expb_16bit.dcm": "SC_rgb_16bit.dcm",
    "SC_rgb_rle_16bit.dcm": "SC_rgb_16bit.dcm",
    "SC_rgb_expb_16bit_2frame.dcm": "SC_rgb_16bit_2frame.dcm",
    "SC_rgb_rle_16bit_2frame.dcm": "SC_rgb_16bit_2frame.dcm",
    "SC_rgb_expb_32bit.dcm": "SC_rgb_32bit.dcm",
    "SC_rgb_rle_32bit.dcm": "SC_rgb_32bit.dcm",
    "SC_rgb_expb_32bit_2frame.dcm": "SC_rgb_32bit_2frame.dcm",
    "SC_rgb_rle_32bit_2frame.dcm": "SC_rgb_32bit_2frame.dcm",
    "SC_rgb_small_odd_big_endian.dcm": "SC_rgb_small_odd.dcm",
    "SC_rgb_gdcm_KY.dcm": "SC_rgb_gdcm2k_uncompressed.dcm",
    "rtdose_expb.dcm": "rtdose.dcm",
    "rtdose_rle.dcm": "rtdose.dcm",
    "rtdose_expb_1frame.dcm": "rtdose_1frame.dcm",
    "rtdose_rle_1frame.dcm": "rtdose_1frame.dcm",
    "liver_expb.dcm": "liver.dcm",
    "liver_expb_1frame.dcm": "liver_1frame.dcm",
    "gdcm-US-ALOKA-16_big.dcm": "gdcm-US-ALOKA-16.dcm",
    "JPEG2000.dcm": "JPEG2000_UNC.dcm",
    "693_J2KR.dcm": "693_UNCR.dcm",
    "693_J2KI.dcm": "693_UNCI.dcm",
    "MR2_J2KR.dcm": "MR2_UNCR.dcm",
    "MR2_J2KI.dcm": "MR2_UNCI.dcm",
    "RG1_J2KR.dcm": "RG1_UNCR.dcm",
    "RG1_J2KI.dcm": "RG1_UNCI.dcm",
    "RG3_J2KR.dcm": "RG3_UNCR.dcm",
    "RG3_J2KI.dcm": "RG3_UNCI.dcm",
    "US1_J2KR.dcm": "US1_UNCR.dcm",
    "US1_J2KI.dcm": "US1_UNCI.dcm",
    "SC_rgb_dcmtk_+eb+cy+n2.dcm": "SC_rgb_dcmtk_ebcyn2_dcmd.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm": "SC_rgb_dcmtk_ebcys2_dcmd.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm": "SC_rgb_dcmtk_ebcys4_dcmd.dcm",
    "color-pl.dcm": "color-px.dcm",  # Planar Configuration 1 and 0
}

#: Lossy files against the uncompressed original or another decoder's output, or a file against a lossy twin:
#: (reference, minimum PSNR in dB). JPEG decoders may differ by an IDCT rounding (a level or two), JPEG coding
#: itself by more.
LOSSY: dict[str, tuple[str, float]] = {
    "JPGExtended.dcm": ("JPEG-LL.dcm", 35.0),  # 12-bit lossy vs the lossless original
    "JPEG-LL.dcm": ("JPEG2000_UNC.dcm", 30.0),  # vs its JPEG 2000 (2097:1) compressed and decoded twin
    "SC_rgb_dcmtk_+eb+cr.dcm": ("SC_rgb_dcmtk_ebcr_dcmd.dcm", 50.0),
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": ("SC_rgb_dcmtk_ebcyn1_dcmd.dcm", 50.0),
    "SC_rgb_dcmtk_+eb+cy+np.dcm": ("SC_rgb_dcmtk_ebcynp_dcmd.dcm", 50.0),
    "SC_rgb_jpeg.dcm": ("SC_rgb_jpeg_dcmd.dcm", 50.0),
    "SC_rgb_jpeg_dcmtk.dcm": ("SC_rgb.dcm", 40.0),
    "SC_rgb_jpeg_lossy_gdcm.dcm": ("SC_rgb.dcm", 25.0),
    "SC_rgb_small_odd_jpeg.dcm": ("SC_rgb_small_odd.dcm", 30.0),
    "SC_ybr_full_uncompressed.dcm": ("SC_rgb.dcm", 40.0),
    "SC_ybr_full_422_uncompressed.dcm": ("SC_rgb.dcm", 40.0),
}

#: JPEG-LS near-lossless files against their original: (reference, largest error allowed, the NEAR parameter).
NEAR_LOSSLESS: dict[str, tuple[str, int]] = {
    "SC_rgb_jls_lossy_line.dcm": ("SC_rgb.dcm", 2),
    "SC_rgb_jls_lossy_sample.dcm": ("SC_rgb.dcm", 2),
}

#: For files without a twin: a second installed decoder, as pydicom's plugin label, and the largest difference
#: allowed (JPEG baseline: IDCT rounding). Pillow wraps libjpeg-turbo and OpenJPEG; pylibjpeg-libjpeg's
#: JPEG-LS decoder is another implementation than the pyjpegls (CharLS) one used here.
SECOND_DECODER: dict[str, tuple[str, int]] = {
    JPEGBaseline8Bit: ("pillow", 8),
    JPEG2000Lossless: ("pillow", 0),
    JPEG2000: ("pillow", 0),
    JPEGLSLossless: ("pylibjpeg", 0),
    JPEGLSNearLossless: ("pylibjpeg", 0),
}

#: Files the second decoder cannot decode, checked another way.
SECOND_DECODER_FAILS: dict[str, str] = {
    "GDCMJ2K_TextGBR.dcm": "Pillow: 'broken data stream'; test_gbr_text_is_in_its_colours checks its content",
}

#: Files refused on purpose, with the reason expected in the DecodeError.
REFUSED: dict[str, str] = {
    # A JPEG Extended stream libjpeg rejects ("misplaced marker segment"); pydicom's own tests expect the same of
    # pylibjpeg (only GDCM decodes it).
    "JPEG-lossy.dcm": r"JPEG Extended .*libjpeg error code '-1038'",
    # pydicom's test of a sequence delimiter inside an encapsulated fragment: no J2K codestream to decode.
    "JPEG2000-embedded-sequence-delimiter.dcm": r"JPEG 2000 Image Compression: .*failed to read the header",
    # Pixel data shorter than Rows x Columns x 2 bytes.
    "MR_truncated.dcm": r"Explicit VR Little Endian: .*less than expected",
    # The file ends before the encapsulated pixel data does.
    "emri_small_jpeg_2k_lossless_too_short.dcm": r"JPEG 2000 Image Compression \(Lossless Only\): .*no pixel data",
    # No file meta information: not a Part 10 file, which the store never holds.
    "OT-PAL-8-face.dcm": r"transfer syntax unknown: cannot read",
    "meta_missing_tsyntax.dcm": r"transfer syntax unknown: .* has no Transfer Syntax UID",
    # Pixel data without an Image Pixel module (no Bits Allocated).
    "nested_priv_SQ.dcm": r"Implicit VR Little Endian: .*Bits Allocated",
    # Number of Frames is "1A".
    "badVR.dcm": r"Explicit VR Little Endian: invalid Number of Frames",
}

#: Odd files whose oddity pydicom reports with a warning while we decode them.
KNOWN_WARNINGS: dict[str, str] = {
    "MR_small_padded.dcm": "excess padding",
    "SC_rgb_jpeg.dcm": "Expected explicit VR, but found implicit VR",
    "badVR.dcm": "Invalid value for VR IS",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "End of file reached before delimiter",
}

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _has_pixels(path: Path) -> bool:
    with warnings.catch_warnings():  # only listing the files here; the test itself runs strict
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            return False
    return any(keyword in ds for keyword in _PIXEL_KEYWORDS)


def _shipped_files() -> dict[str, Path]:
    """Every shipped file with pixel data (or one we refuse), by a unique id: its name, or the path for the
    DICOMDIR test tree whose files have bare numbers for names."""
    files: dict[str, Path] = {}
    for name in get_testdata_files():
        path = Path(name)
        key = path.name if "dicomdirtests" not in path.parts else "/".join(path.parts[-3:])
        if path.is_file() and (path.name in REFUSED or _has_pixels(path)):
            assert key not in files, f"two shipped files named {key}"
            files[key] = path
    return files


FILES = _shipped_files()


def _testdata(name: str) -> Path:
    return Path(get_testdata_file(name))  # type: ignore[arg-type]


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _frames_of(path: Path) -> list[Array]:
    return decode_file_frames(path, range(1, int(_header(path).get("NumberOfFrames") or 1) + 1))


def _expected_warning(key: str) -> contextlib.AbstractContextManager[object]:
    if key in KNOWN_WARNINGS:
        return pytest.warns(UserWarning, match=KNOWN_WARNINGS[key])
    return contextlib.nullcontext()


def _psnr(actual: Array, expected: Array) -> float:
    diff = actual.astype(np.float64) - expected.astype(np.float64)
    mse = float(np.mean(diff**2))
    peak = float(np.ptp(expected.astype(np.float64))) or 1.0
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def _expected_dtype(ds: Dataset) -> tuple[str, int]:
    """The dtype kind and size the header implies (1-bit data come unpacked, a byte a pixel)."""
    if "FloatPixelData" in ds:
        return "f", 32
    if "DoubleFloatPixelData" in ds:
        return "f", 64
    return ("i" if ds.get("PixelRepresentation") else "u"), max(int(ds.BitsAllocated), 8)


def _assert_matches_header(frames: list[Array], ds: Dataset) -> None:
    assert len(frames) == int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    shape = (ds.Rows, ds.Columns) if samples == 1 else (ds.Rows, ds.Columns, samples)
    kind, bits = _expected_dtype(ds)
    for frame in frames:
        assert frame.shape == shape
        assert frame.dtype.kind == kind and frame.dtype.itemsize * 8 == bits, frame.dtype
        assert frame.dtype.isnative


def _assert_second_decoder_agrees(path: Path, frames: list[Array]) -> None:
    """Decode the frames again with another installed decoder, where one handles this syntax."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID not in SECOND_DECODER:
        return
    plugin, tolerance = SECOND_DECODER[ds.file_meta.TransferSyntaxUID]
    if plugin not in get_decoder(ds.file_meta.TransferSyntaxUID).available_plugins:
        pytest.skip(f"no {plugin} to compare with")
    for index, frame in enumerate(frames):
        other = pixel_array(ds, index=index, decoding_plugin=plugin)
        assert np.abs(frame.astype(np.int64) - other.astype(np.int64)).max() <= tolerance


def test_every_listed_file_is_shipped() -> None:
    names = {Path(key).name for key in FILES}
    listed = set(EXACT) | set(EXACT.values()) | set(REFUSED) | set(SECOND_DECODER_FAILS)
    for table in (LOSSY, NEAR_LOSSLESS):
        listed |= set(table) | {reference for reference, _ in table.values()}
    assert listed <= names, listed - names
    assert len(FILES) > 150  # pydicom's and pydicom-data's files are both there


@pytest.mark.parametrize("key", sorted(set(FILES) - set(REFUSED)))
def test_shipped_file_decodes_to_its_reference(key: str) -> None:
    path = FILES[key]
    with _expected_warning(key):
        frames = _frames_of(path)
        _assert_matches_header(frames, pydicom.dcmread(path))
    if key in EXACT:
        reference = _frames_of(_testdata(EXACT[key]))
        assert len(frames) == len(reference)
        for frame, expected in zip(frames, reference, strict=True):
            np.testing.assert_array_equal(frame, expected)
    elif key in LOSSY:
        name, min_psnr = LOSSY[key]
        assert _psnr(np.stack(frames), np.stack(_frames_of(_testdata(name)))) >= min_psnr
    elif key in NEAR_LOSSLESS:
        name, near = NEAR_LOSSLESS[key]
        error = np.abs(np.stack(frames).astype(np.int64) - np.stack(_frames_of(_testdata(name))))
        assert error.max() <= near
    elif key not in SECOND_DECODER_FAILS:
        _assert_second_decoder_agrees(path, frames)


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_shipped_file_is_refused_with_a_reason(key: str) -> None:
    with _expected_warning(key), pytest.raises(DecodeError, match=REFUSED[key]):
        decode_frame(FILES[key])


def test_gbr_text_is_in_its_colours() -> None:
    # The image reads "red", "green" and "blue" on grey, one word a band, each in its colour: a J2K stream with
    # its components in G, B, R order must still come back as RGB.
    frame = decode_frame(_testdata("GDCMJ2K_TextGBR.dcm")).astype(np.int64)
    for channel, rows in enumerate((slice(40, 110), slice(140, 220), slice(240, 310))):
        band = frame[rows].reshape(-1, 3)
        ink = band[np.abs(band - 128).max(axis=1) > 60]
        assert len(ink) > 500
        colour = ink.mean(axis=0)
        assert colour[channel] > 200 and np.delete(colour, channel).max() < 60, colour


# -- dcm2niix's transfer syntax set --------------------------------------------------------------------------------


def test_dcm_qa_ts_every_syntax_decodes_to_the_same_pixels(shared_data: Path) -> None:
    files = sorted((shared_data / "dcm_qa_ts" / "In").glob("*.dcm"))
    syntaxes = {_header(path).file_meta.TransferSyntaxUID for path in files}
    assert len(files) == 9 and len(syntaxes) == 7  # two SV1 and two JPEG-LS lossless encoders
    reference = next(decode_frame(p) for p in files if _header(p).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian)
    assert reference.shape == (384, 384) and reference.any()
    for path in files:
        frame = decode_frame(path)
        assert frame.dtype == reference.dtype, path.name
        np.testing.assert_array_equal(frame, reference, err_msg=path.name)


# -- syntaxes without a shipped sample: made here ----------------------------------------------------------------


def _relabelled(name: str, syntax: UID, dest: Path) -> Path:
    """A shipped file with its pixel data stream kept byte for byte under another Transfer Syntax UID."""
    ds = pydicom.dcmread(_testdata(name))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _compressed(name: str, syntax: UID, dest: Path, **options: object) -> Path:
    ds = pydicom.dcmread(_testdata(name))
    ds.compress(syntax, **options)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_jpeg_lossless_process_14_decodes(tmp_path: Path) -> None:
    # An SV1 stream is a process 14 stream with predictor 1: valid under either UID.
    path = _relabelled("JPEG-LL.dcm", JPEGLossless, tmp_path / "p14.dcm")
    np.testing.assert_array_equal(decode_frame(path), decode_frame(_testdata("JPEG-LL.dcm")))


@pytest.mark.parametrize(
    ("syntax", "source", "reference"),
    [
        (HTJ2KLossless, "MR_small_jp2klossless.dcm", "MR_small.dcm"),
        (HTJ2KLosslessRPCL, "emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        (HTJ2K, "693_J2KI.dcm", "693_UNCI.dcm"),
    ],
)
def test_htj2k_syntaxes_decode(tmp_path: Path, syntax: UID, source: str, reference: str) -> None:
    # No installed library encodes HT code-blocks (OpenJPEG only decodes them) and none of the shipped files has
    # any: these are Part 1 codestreams, which a Part 15 decoder must also decode. This checks the HTJ2K route
    # through pydicom and pylibjpeg-openjpeg, not the HT block decoder itself.
    path = _relabelled(source, syntax, tmp_path / "htj2k.dcm")
    frames = _frames_of(path)
    for frame, expected in zip(frames, _frames_of(_testdata(reference)), strict=True):
        np.testing.assert_array_equal(frame, expected)


def test_jpeg_ls_near_lossless_stays_within_its_error_bound(tmp_path: Path) -> None:
    path = _compressed("MR_small.dcm", JPEGLSNearLossless, tmp_path / "jls.dcm", jls_error=3)
    decoded = decode_frame(path).astype(np.int64)
    original = decode_frame(_testdata("MR_small.dcm")).astype(np.int64)
    error = np.abs(decoded - original)
    assert error.max() <= 3 and error.any()


def test_jpeg2000_lossy_is_close_to_the_original(tmp_path: Path) -> None:
    path = _compressed("MR_small.dcm", JPEG2000, tmp_path / "j2k.dcm", j2k_cr=[10])
    decoded, original = decode_frame(path), decode_frame(_testdata("MR_small.dcm"))
    assert 30.0 <= _psnr(decoded, original) < float("inf")


def test_jpeg_extended_12_bit_decodes() -> None:
    ds = _header(_testdata("JPGExtended.dcm"))
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit and ds.BitsStored == 12
    frame = decode_frame(_testdata("JPGExtended.dcm"))
    assert frame.shape == (1024, 256) and 255 < frame.max() < 4096


def test_big_endian_frames_come_back_in_native_byte_order() -> None:
    assert _header(_testdata("MR_small_bigendian.dcm")).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    frame = decode_frame(_testdata("MR_small_bigendian.dcm"))
    assert frame.dtype == np.dtype("int16")


# -- the dependency table and refusals ------------------------------------------------------------------------------


def test_every_listed_syntax_has_its_plugin_installed() -> None:
    rows = dependency_table()
    assert len(rows) == len(DECODERS) == 16
    assert [row for row in rows if not row[3]] == []


def test_missing_plugin_is_refused_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.delitem(decoder._available, "pylibjpeg")
    assert not is_available(JPEG2000Lossless)
    with pytest.raises(DecodeError, match=r"JPEG 2000 Image Compression \(Lossless Only\).*install pylibjpeg>=2.0 "):
        decode_frame(_testdata("MR_small_jp2klossless.dcm"))


def test_unknown_syntax_is_refused(tmp_path: Path) -> None:
    path = _relabelled("MR_small_RLE.dcm", UID("1.2.840.10008.1.2.4.100"), tmp_path / "mpeg2.dcm")
    assert not is_available("1.2.840.10008.1.2.4.100")
    with pytest.raises(DecodeError, match=r"MPEG2 .*no decoder for this transfer syntax"):
        decode_frame(path)


def test_frame_out_of_range_is_refused() -> None:
    with pytest.raises(DecodeError, match=r"frame 11 requested from emri_small.dcm, which has 10 frame"):
        decode_frame(_testdata("emri_small.dcm"), 11)
    with pytest.raises(DecodeError, match="frame 0"):
        decode_frame(_testdata("MR_small.dcm"), 0)


def test_not_dicom_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(DecodeError, match=r"transfer syntax unknown: cannot read x\.dcm as DICOM"):
        decode_frame(path)


def test_refusal_carries_no_patient_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_testdata("MR_small_RLE.dcm"))
    ds.PatientName, ds.PatientID = "SECRET^NAME", "SECRET-ID"
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    with pytest.raises(DecodeError, match="RLE Lossless") as raised:
        decode_frame(tmp_path / "broken.dcm")
    assert "SECRET" not in str(raised.value)


# -- parallel ------------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_requests() -> list[tuple[Path, int]]:
    """Frames of multi-frame and single-frame files, compressed first (so a process pool runs), out of order."""
    multi = _testdata("emri_small_jpeg_2k_lossless.dcm")
    rle = _testdata("emri_small_RLE.dcm")
    return [(multi, 7), (rle, 2), (multi, 1), (_testdata("MR_small_jpeg_ls_lossless.dcm"), 1), (multi, 7)] + [
        (rle, frame) for frame in (10, 3, 5)
    ]


def _sequential(requests: list[tuple[Path, int]]) -> Iterator[Array]:
    return (decode_frame(path, frame) for path, frame in requests)


def test_parallel_decode_equals_sequential(mixed_requests: list[tuple[Path, int]]) -> None:
    parallel = decode_frames(mixed_requests, workers=2)
    assert len(parallel) == len(mixed_requests)
    for got, expected in zip(parallel, _sequential(mixed_requests), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_parallel_decode_of_native_files_equals_sequential() -> None:
    requests = [(_testdata("emri_small.dcm"), frame) for frame in range(10, 0, -1)] + [(_testdata("CT_small.dcm"), 1)]
    for got, expected in zip(decode_frames(requests, workers=3), _sequential(requests), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_decode_in_a_given_executor(mixed_requests: list[tuple[Path, int]]) -> None:
    with ThreadPoolExecutor(2) as pool:
        got = decode_frames(mixed_requests, workers=2, executor=pool)
    for frame, expected in zip(got, _sequential(mixed_requests), strict=True):
        np.testing.assert_array_equal(frame, expected)


def test_parallel_decode_raises_for_a_bad_frame(mixed_requests: list[tuple[Path, int]]) -> None:
    with pytest.raises(DecodeError, match=re.escape("frame 99 requested from emri_small_RLE.dcm")):
        decode_frames([*mixed_requests, (_testdata("emri_small_RLE.dcm"), 99)], workers=2)


def test_no_requests_no_frames() -> None:
    assert decode_frames([]) == []
    with pytest.raises(ValueError, match="workers"):
        decode_frames([], workers=0)


def test_chunks_keep_frames_of_a_file_together() -> None:
    a, b = Path("a.dcm"), Path("b.dcm")
    requests = [(b, 1), (a, 3), (a, 1), (b, 2), (a, 2)]
    order, chunks = plan_chunks(requests, workers=1)
    assert [requests[i] for i in order] == [(a, 3), (a, 1), (a, 2), (b, 1), (b, 2)]
    assert chunks == [((a, (3, 1)),), ((a, (2,)), (b, (1,))), ((b, (2,)),)]  # ceil(5 / 4) requests a chunk
    _, chunks = plan_chunks(requests, workers=100)
    assert len(chunks) == 5
