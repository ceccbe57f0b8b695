"""write_objects writes the very bytes pydicom's own writer makes of each object, only faster.

The per-frame functional groups go out encoded once per distinct part (gateway.encode.perframe), and every dataset
has its ambiguous VRs resolved once before writing (gateway.encode.encode): each file is compared byte for byte
with ``save_as`` of a copy of the same object, for every kind of output and on hand-made sequences with the odd
cases (undefined lengths, a nested character set, integers out of range, shared items).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pydicom
import pytest
from encode_cases import (
    GATEWAY_VERSION,
    Case,
    map_result,
    multiframe_ct,
    run_model,
    synthetic_ct,
    tilted_ct,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway.encode import EncodedObject, encode_result, write_objects
from gateway.encode.perframe import encoded_once
from gateway.encode.seg import encode_segmentation


def _pydicom_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    copy.deepcopy(dataset).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _assert_written_as_pydicom_writes(objects: list[EncodedObject], folder: Path) -> None:
    expected = [_pydicom_bytes(obj.dataset) for obj in objects]
    per_frame = [obj.dataset.get("PerFrameFunctionalGroupsSequence") for obj in objects]
    paths = write_objects(objects, folder)
    for obj, path, want, before in zip(objects, paths, expected, per_frame, strict=True):
        assert path.read_bytes() == want, obj.kind
        assert obj.dataset.get("PerFrameFunctionalGroupsSequence") is before  # the object is as it was


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return synthetic_ct(tmp_path_factory.mktemp("ct"))


def test_every_output_of_a_segmentation_is_written_as_pydicom_writes_it(ct: Case, tmp_path: Path) -> None:
    result = run_model("ct-tissue", ct.volume)
    objects = encode_result(result, ct.sources, series_number=10, gateway_version=GATEWAY_VERSION, key_images=True)
    assert {obj.kind for obj in objects} == {"SEG", "SR", "GSPS", "KO", "SC"}
    _assert_written_as_pydicom_writes(objects, tmp_path)
    seg = pydicom.dcmread(tmp_path / f"SEG-{objects[0].sop_instance_uid}.dcm")
    assert len(seg.PerFrameFunctionalGroupsSequence) == seg.NumberOfFrames > 24  # several segments per image


def test_label_map_seg_and_parametric_maps_are_written_as_pydicom_writes_them(ct: Case, tmp_path: Path) -> None:
    result = run_model("ct-tissue", ct.volume)
    labelmap = encode_segmentation(result, ct.sources, series_number=20, gateway_version=GATEWAY_VERSION)
    maps = encode_result(map_result(ct.volume), ct.sources, series_number=30, gateway_version=GATEWAY_VERSION)
    _assert_written_as_pydicom_writes([labelmap, *maps], tmp_path)


def test_segs_of_tilted_and_multiframe_sources_are_written_as_pydicom_writes_them(tmp_path: Path) -> None:
    tilted = tilted_ct(tmp_path / "tilted")
    enhanced = multiframe_ct(synthetic_ct(tmp_path / "single", slices=8, size=64), tmp_path / "enhanced")
    for k, case in enumerate((tilted, enhanced)):
        result = run_model("ct-tissue", case.volume)
        objects = encode_result(result, case.sources, series_number=40 + 10 * k, gateway_version=GATEWAY_VERSION)
        _assert_written_as_pydicom_writes(objects, tmp_path / f"out{k}")


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _odd_per_frame_dataset() -> Dataset:
    shared = _item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID=generate_uid())
    nested_charset = _item(SpecificCharacterSet="ISO_IR 100", LongCodeValue="Grüße")
    undefined_item = _item(ReferencedSegmentNumber=3)
    undefined_item.is_undefined_length_sequence_item = True
    frames = []
    for k in range(6):
        frame = _item(
            FrameContentSequence=[_item(DimensionIndexValues=[1, k + 1])],
            DerivationImageSequence=[_item(SourceImageSequence=[shared])],  # a new item around a shared one
            SegmentIdentificationSequence=[_item(ReferencedSegmentNumber=1 + k % 2)],  # equal by value
            PlanePositionSequence=[_item(ImagePositionPatient=[0.5, -1, 2.25 * k])],
        )
        if k == 2:
            frame.PurposeOfReferenceCodeSequence = [nested_charset, undefined_item]
            frame["PurposeOfReferenceCodeSequence"].is_undefined_length = True
            frame.ReferencedFrameNumber = 70000  # US out of range: left to pydicom
        if k == 3:
            frame.add_new(0x00460050, "SS", [-2, 3])  # signed, several values
            frame.FrameContentSequence = Sequence()  # empty
        frames.append(frame)
    ds = _item(SpecificCharacterSet="ISO_IR 192", PerFrameFunctionalGroupsSequence=frames, PatientName="Ñandú^Zoë")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    return ds


def test_per_frame_groups_with_odd_parts_are_written_as_pydicom_writes_them(tmp_path: Path) -> None:
    ds = _odd_per_frame_dataset()
    obj = EncodedObject("SEG", ds, ds.SOPClassUID, ds.SOPInstanceUID, generate_uid())
    _assert_written_as_pydicom_writes([obj], tmp_path)


def test_per_frame_groups_with_odd_parts_encode_as_pydicom_encodes_them() -> None:
    ds = _odd_per_frame_dataset()
    want = _pydicom_bytes(ds)
    before = ds["PerFrameFunctionalGroupsSequence"]
    got = io.BytesIO()
    with encoded_once(ds):
        ds.save_as(got, enforce_file_format=True)
    assert got.getvalue() == want
    assert ds["PerFrameFunctionalGroupsSequence"] is before
    back = pydicom.dcmread(io.BytesIO(got.getvalue()))
    assert back.PerFrameFunctionalGroupsSequence[2].PurposeOfReferenceCodeSequence[0].LongCodeValue == "Grüße"


def test_an_implicit_vr_dataset_is_left_to_pydicom() -> None:
    ds = _odd_per_frame_dataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    want = _pydicom_bytes(ds)
    got = io.BytesIO()
    with encoded_once(ds):
        assert not ds["PerFrameFunctionalGroupsSequence"].is_raw
        ds.save_as(got, enforce_file_format=True)
    assert got.getvalue() == want
