"""``gateway volume``'s conversion: each file's header is read once, and the volumes are those of assemble_series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import synthetic
from pydicom.uid import JPEG2000Lossless

from gateway.assemble.assemble import assemble_series
from gateway.assemble.convert import convert, read_series


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    real = pydicom.dcmread

    def counting(fp: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(Path(getattr(fp, "name", fp)))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return reads


def test_each_uncompressed_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = synthetic.write(synthetic.ct_slices(8), tmp_path / "ct")
    reads = _count_reads(monkeypatch)
    report = convert([tmp_path / "ct"], tmp_path / "out")
    assert len(report.written) == 1
    assert sorted(reads) == sorted(paths), "one header read per file; the pixels are read without pydicom"
    (expected,) = assemble_series(paths).volumes
    np.testing.assert_array_equal(report.written[0].volume.array, expected.array)
    image = nib.Nifti1Image.from_filename(report.written[0].image)
    assert image.get_data_dtype() == np.int16, "CT in HU is written as int16, as dcm2niix does"
    np.testing.assert_array_equal(image.get_fdata(), np.transpose(expected.array, (2, 1, 0))[:, ::-1])


def test_compressed_files_are_read_again_only_to_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slices = synthetic.ct_slices(4)
    for ds in slices:
        ds.compress(JPEG2000Lossless)
    paths = synthetic.write(slices, tmp_path / "ct")
    reads = _count_reads(monkeypatch)
    series, skipped = read_series([tmp_path / "ct"])
    assert sorted(reads) == sorted(paths) and skipped == []
    (files,) = series.values()
    assert all(source.pixels is None for source in files.sources)


def test_non_images_are_refused_and_non_dicom_skipped(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(4)
    paths = synthetic.write(slices, tmp_path / "ct")
    document = pydicom.dcmread(paths[0])
    for keyword in ("Rows", "Columns", "PixelData"):
        delattr(document, keyword)
    document.SOPInstanceUID = document.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    document.save_as(tmp_path / "ct" / "doc.dcm", enforce_file_format=True)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")
    series, skipped = read_series([tmp_path / "ct"])
    assert skipped == [tmp_path / "ct" / "notes.txt"]
    (files,) = series.values()
    assert len(files.sources) == 4
    (refusal,) = files.refused
    assert "not an image" in refusal.reason and refusal.paths == (tmp_path / "ct" / "doc.dcm",)
    report = convert([tmp_path / "ct"], tmp_path / "out")
    assert len(report.written) == 1 and [r.reason for _, r in report.refused] == [refusal.reason]
