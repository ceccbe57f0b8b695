"""Sources without the Type 2 Patient and General Study attributes (no PatientID, StudyID, AccessionNumber...):
every object still encodes, carries them empty, reads back, and validates no worse than from complete sources."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from encode_cases import GATEWAY_VERSION, Case, dciodvfy, labelmap_result, map_result, read_case, synthetic_ct

from gateway.encode import encode_result, write_objects
from gateway.encode.common import SOURCE_TYPE2_KEYWORDS
from gateway.infer.results import ModelResult


@pytest.fixture(scope="module")
def complete(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return synthetic_ct(tmp_path_factory.mktemp("ct"), slices=8, size=64)


@pytest.fixture(scope="module")
def stripped(complete: Case, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The same series, written again without any of the Type 2 attributes the objects copy."""
    folder = tmp_path_factory.mktemp("stripped")
    paths = []
    for path in complete.paths:
        ds = pydicom.dcmread(path)
        for keyword in SOURCE_TYPE2_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(folder / path.name, enforce_file_format=True)
        paths.append(folder / path.name)
    return read_case(paths)


def written(result: ModelResult, case: Case, folder: Path) -> dict[str, list[Path]]:
    objects = encode_result(result, case.sources, series_number=7, gateway_version=GATEWAY_VERSION, key_images=True)
    out: dict[str, list[Path]] = {}
    for obj, path in zip(objects, write_objects(objects, folder), strict=True):
        out.setdefault(obj.kind, []).append(path)
    return out


def errors(paths: dict[str, list[Path]]) -> dict[str, set[str]]:
    return {kind: {line for path in files for line in dciodvfy(path).errors} for kind, files in paths.items()}


@pytest.mark.parametrize("outputs", ["segmentation", "parametric map"])
def test_missing_type2_attributes_are_written_empty(
    complete: Case, stripped: Case, outputs: str, tmp_path: Path
) -> None:
    assert not any(kw in ds for ds in stripped.sources.values() for kw in SOURCE_TYPE2_KEYWORDS)
    make = labelmap_result if outputs == "segmentation" else map_result
    from_stripped = written(make(stripped.volume), stripped, tmp_path / "stripped")
    expected = ["SEG", "SR", "GSPS", "KO", "SC"] if outputs == "segmentation" else ["PM"]
    assert list(from_stripped) == expected
    for kind, paths in from_stripped.items():
        for path in paths:
            ds = pydicom.dcmread(path)
            for keyword in SOURCE_TYPE2_KEYWORDS:
                assert keyword in ds, f"{kind} lacks {keyword}"
                assert ds[keyword].value in ("", None), f"{kind} {keyword} is not empty"
    baseline = errors(written(make(complete.volume), complete, tmp_path / "complete"))
    for kind, found in errors(from_stripped).items():
        assert found <= baseline[kind], (
            f"{kind}: dciodvfy errors new with empty Type 2 attributes: {found - baseline[kind]}"
        )


def test_the_sources_are_left_as_they_were(stripped: Case, tmp_path: Path) -> None:
    written(labelmap_result(stripped.volume), stripped, tmp_path)
    assert not any(kw in ds for ds in stripped.sources.values() for kw in SOURCE_TYPE2_KEYWORDS)
