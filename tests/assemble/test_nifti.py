"""NIfTI output: int16 when every voxel fits exactly, else float32; the values read back are the volume's."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gateway.assemble.model import SliceRef, Volume
from gateway.assemble.nifti import nifti_affine, to_nifti, write_nifti

AFFINE = np.array([[0.0, 0.0, 0.7, -100.0], [0.0, 0.8, 0.0, -50.0], [2.5, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 1.0]])


def _volume(array: np.ndarray) -> Volume:
    refs = tuple(SliceRef(f"1.2.3.{k}") for k in range(array.shape[-3]))
    return Volume(array.astype(np.float32), AFFINE, refs, "1.2.3", "1.2", None, "CT")


def _written(volume: Volume, tmp_path: Path) -> tuple[nib.Nifti1Image, dict[str, object], Path]:
    image_path, sidecar_path = write_nifti(volume, tmp_path / "out.nii")
    return nib.Nifti1Image.from_filename(image_path), json.loads(sidecar_path.read_text()), image_path


def _reads_back(image: nib.Nifti1Image, volume: Volume) -> None:
    order = (3, 2, 1, 0) if volume.array.ndim == 4 else (2, 1, 0)
    expected = np.transpose(volume.array, order)[:, ::-1]
    np.testing.assert_array_equal(image.get_fdata(), expected)
    np.testing.assert_allclose(image.affine, nifti_affine(volume), atol=1e-6)
    assert image.dataobj.slope == 1.0 and image.dataobj.inter == 0.0


@pytest.mark.parametrize("shape", [(5, 7, 6), (3, 4, 5, 6)])
def test_integral_values_in_range_are_written_as_int16(tmp_path: Path, shape: tuple[int, ...]) -> None:
    volume = _volume(np.random.default_rng(0).integers(-32768, 32768, shape))
    image, side, path = _written(volume, tmp_path)
    assert image.get_data_dtype() == np.int16
    assert side["nifti_data_type"] == "int16"
    assert path.stat().st_size == 352 + volume.array.size * 2
    _reads_back(image, volume)


@pytest.mark.parametrize("case", ["fractional", "above int16", "below int16", "nan"])
def test_anything_else_is_written_as_float32(tmp_path: Path, case: str) -> None:
    array = np.random.default_rng(1).integers(-1024, 3000, (4, 6, 5)).astype(np.float32)
    if case == "fractional":
        array += 0.5
    elif case == "above int16":
        array[2, 3, 1] = 32768
    elif case == "below int16":
        array[0, 0, 0] = -32769
    else:
        array[1, 1, 1] = np.nan
    volume = _volume(array)
    image, side, path = _written(volume, tmp_path)
    assert image.get_data_dtype() == np.float32
    assert side["nifti_data_type"] == "float32"
    assert path.stat().st_size == 352 + array.size * 4, "the int16 attempt is truncated away"
    np.testing.assert_array_equal(image.get_fdata(), np.transpose(array, (2, 1, 0))[:, ::-1])


def test_late_fractional_plane_restarts_as_float32(tmp_path: Path) -> None:
    array = np.zeros((6, 4, 4), np.float32)
    array[-1, 0, 0] = 0.5  # the last plane written
    volume = _volume(array)
    image, _, path = _written(volume, tmp_path)
    assert image.get_data_dtype() == np.float32 and path.stat().st_size == 352 + array.size * 4
    _reads_back(image, volume)


def test_float32_file_is_what_nibabel_writes(tmp_path: Path) -> None:
    volume = _volume(np.random.default_rng(2).normal(size=(4, 5, 6)))
    path, _ = write_nifti(volume, tmp_path / "ours.nii")
    nib.save(to_nifti(volume), tmp_path / "nibabel.nii")
    assert path.read_bytes() == (tmp_path / "nibabel.nii").read_bytes()


def test_int16_file_is_nibabel_header_with_int16_data(tmp_path: Path) -> None:
    volume = _volume(np.arange(4 * 5 * 6).reshape(4, 5, 6) - 60)
    path, _ = write_nifti(volume, tmp_path / "ours.nii")
    with path.open("rb") as fp:
        header = nib.Nifti1Header.from_fileobj(fp)
    reference = to_nifti(volume).header
    reference.set_data_dtype(np.int16)
    different = [key for key in header if header[key].tobytes() != reference[key].tobytes()]
    assert different == ["vox_offset"]  # set on writing (352), as nibabel sets it
    assert header["vox_offset"] == 352 and header["qform_code"] == header["sform_code"] == 1
