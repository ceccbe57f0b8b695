"""Test inputs: real files shipped with pydicom / pydicom-data, and deliberately broken variants of them."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

#: One small real file per transfer syntax, from pydicom's test data.
SAMPLES: dict[str, str] = {
    "1.2.840.10008.1.2": "MR_small_implicit.dcm",
    "1.2.840.10008.1.2.1": "CT_small.dcm",
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",
    "1.2.840.10008.1.2.4.50": "SC_rgb_small_odd_jpeg.dcm",
    "1.2.840.10008.1.2.4.51": "JPEG-lossy.dcm",
    "1.2.840.10008.1.2.4.70": "JPEG-LL.dcm",
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_08.dcm",  # has no Study/Series UIDs: see prepared()
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",
    "1.2.840.10008.1.2.4.91": "SC_rgb_gdcm_KY.dcm",
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",
}

#: Syntaxes without a shipped sample: an encapsulated file is relabelled (the gateway stores, never decodes).
RELABELLED: dict[str, str] = {
    "1.2.840.10008.1.2.4.57": "JPEG-LL.dcm",
    "1.2.840.10008.1.2.4.201": "MR_small_jp2klossless.dcm",
    "1.2.840.10008.1.2.4.202": "MR_small_jp2klossless.dcm",
    "1.2.840.10008.1.2.4.203": "SC_rgb_gdcm_KY.dcm",
}


def sample(ts: str) -> Path:
    """Path of the shipped sample for transfer syntax ``ts``."""
    return Path(get_testdata_file(SAMPLES[ts]))  # type: ignore[arg-type]


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: everything after the file meta information."""
    raw = path.read_bytes()
    group_length = struct.unpack("<I", raw[140:144])[0]
    return raw[144 + group_length :]


def prepared(ts: str, dest: Path) -> Path:
    """A sample of transfer syntax ``ts`` with a fresh SOP Instance UID and all filing UIDs present.

    Syntaxes without a shipped sample get an encapsulated file relabelled (the gateway stores, never decodes);
    the pixel data stream is kept byte for byte.
    """
    name = RELABELLED.get(ts) or SAMPLES[ts]
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def minimal_ct_header(*, patient_name: str = "DOE^JANE", patient_id: str = "PID-12345") -> Dataset:
    """The attributes of a small CT image (8x8, 16 bits) before its pixel data, with fresh UIDs."""
    ds = Dataset()
    ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def minimal_ct(dest: Path, *, patient_name: str = "DOE^JANE", drop: tuple[str, ...] = (), **attrs: object) -> Path:
    """Write a small valid CT instance (8x8 pixels), optionally without some attributes."""
    ds = minimal_ct_header(patient_name=patient_name)
    ds.PixelData = bytes(range(128))
    with warnings.catch_warnings():  # values may be deliberately invalid
        warnings.simplefilter("ignore")
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
    for keyword in drop:
        delattr(ds, keyword)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(dest, enforce_file_format=True)
    return dest


def truncated(src: Path, dest: Path, drop_bytes: int = 40) -> Path:
    """A copy of ``src`` with its last ``drop_bytes`` bytes cut off."""
    data = src.read_bytes()
    dest.write_bytes(data[:-drop_bytes])
    return dest


def overlong_element(src: Path, dest: Path) -> Path:
    """A copy of an explicit-VR LE file whose PatientName declares more bytes than the file holds."""
    data = bytearray(src.read_bytes())
    at = data.find(b"\x10\x00\x10\x00PN")
    assert at > 0, "sample has no explicit-VR PatientName"
    data[at + 6 : at + 8] = struct.pack("<H", 0xFFF0)
    dest.write_bytes(bytes(data[: at + 8 + 0x100]))
    return dest


def garbage_body(src: Path, dest: Path) -> Path:
    """A copy of ``src`` keeping its file meta but replacing the data set by bytes that are not DICOM."""
    raw = src.read_bytes()
    group_length = struct.unpack("<I", raw[140:144])[0]
    dest.write_bytes(raw[: 144 + group_length] + b"\xff\xfe\xfd\xfc" * 64)
    return dest
