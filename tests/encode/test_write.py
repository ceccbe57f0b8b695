"""write_objects: Part 10 files named by kind and SOP Instance UID, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from encode_cases import GATEWAY_VERSION, Case, map_result, synthetic_ct

from gateway.encode import EncodedObject, encode_result, object_filename, write_objects


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[EncodedObject]:
    case: Case = synthetic_ct(tmp_path_factory.mktemp("ct"), slices=4, size=32)
    return encode_result(map_result(case.volume), case.sources, series_number=3, gateway_version=GATEWAY_VERSION)


def test_files_are_named_by_kind_and_uid_and_read_back(objects: list[EncodedObject], tmp_path: Path) -> None:
    folder = tmp_path / "new" / "folder"
    paths = write_objects(objects, folder)
    assert [p.name for p in paths] == [f"PM-{objects[0].sop_instance_uid}.dcm"] == [object_filename(objects[0])]
    assert os.listdir(folder) == [paths[0].name]  # no temporary file left behind
    ds = pydicom.dcmread(paths[0])
    assert ds.preamble is not None and ds.file_meta.MediaStorageSOPInstanceUID == objects[0].sop_instance_uid
    assert ds.SOPInstanceUID == objects[0].sop_instance_uid


def test_rewriting_replaces_the_file(objects: list[EncodedObject], tmp_path: Path) -> None:
    first = write_objects(objects, tmp_path)[0]
    first.write_bytes(b"stale")
    second = write_objects(objects, tmp_path)[0]
    assert second == first and pydicom.dcmread(second).SOPInstanceUID == objects[0].sop_instance_uid


def test_a_failed_write_leaves_nothing(objects: list[EncodedObject], tmp_path: Path) -> None:
    broken = EncodedObject("PM", pydicom.Dataset(), "1.2", "1.2.3", "1.2.4")  # no file meta: cannot be written
    with pytest.raises(Exception):  # noqa: B017 - whatever pydicom raises, no file may remain
        write_objects([broken], tmp_path)
    assert os.listdir(tmp_path) == []
