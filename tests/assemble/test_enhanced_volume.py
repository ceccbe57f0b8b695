"""An enhanced multi-frame CT, end to end: the same volume as the single-frame series it was built from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway.assemble.assemble import assemble_series
from gateway.synth.ct import write_synthetic_ct

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _item(**attributes: object) -> Sequence:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return Sequence([ds])


def enhanced_from(files: list[Path], dest: Path, order: list[int]) -> Path:
    """One Enhanced CT object holding the given slices as frames, in ``order`` (not their spatial order)."""
    slices = [pydicom.dcmread(files[k]) for k in order]
    first = slices[0]
    ds = Dataset()
    for keyword in (
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "Modality",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    ):
        setattr(ds, keyword, first.get(keyword))
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    shared.PixelMeasuresSequence = _item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)
    shared.PlaneOrientationSequence = _item(ImageOrientationPatient=first.ImageOrientationPatient)
    shared.PixelValueTransformationSequence = _item(
        RescaleSlope=first.RescaleSlope, RescaleIntercept=first.RescaleIntercept, RescaleType="HU"
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset() for _ in slices])
    for group, s in zip(ds.PerFrameFunctionalGroupsSequence, slices, strict=True):
        group.PlanePositionSequence = _item(ImagePositionPatient=s.ImagePositionPatient)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_enhanced_ct_assembles_like_its_single_frame_series(tmp_path: Path) -> None:
    write_synthetic_ct(tmp_path / "ct", 9, rows=32, columns=32)
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    order = [4, 0, 8, 2, 6, 1, 7, 3, 5]  # frames stored out of spatial order
    enhanced = enhanced_from(files, tmp_path / "enhanced.dcm", order)

    (single,) = assemble_series(files).volumes
    (multi,) = assemble_series([enhanced]).volumes

    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    uid = pydicom.dcmread(enhanced, stop_before_pixels=True).SOPInstanceUID
    assert {ref.sop_instance_uid for ref in multi.slices} == {uid}
    by_file = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(files)}
    expected_frames = [order.index(by_file[ref.sop_instance_uid]) + 1 for ref in single.slices]
    assert [ref.frame for ref in multi.slices] == expected_frames, "each slice names the frame it came from"
