"""Geometry and voxels against dcm2niix, the reference converter, on real and synthetic series."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import synthetic

from gateway.assemble.assemble import assemble_series
from gateway.assemble.model import Volume
from gateway.assemble.nifti import write_nifti
from gateway.synth.ct import synth_ct_datasets, write_synthetic_ct

DECUBITUS = ["HFS", "HFP", "HFDL", "HFDR"]


def dcm2niix(folder: Path, out: Path) -> dict[str, nib.Nifti1Image]:
    """Run dcm2niix (uncompressed) on a folder; the images it wrote, by file name."""
    exe = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix)")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "n", "-f", "ref", "-o", str(out), str(folder)], check=True, capture_output=True)
    return {p.name: nib.Nifti1Image.from_filename(p) for p in sorted(out.glob("*.nii"))}


def ours(volume: Volume, out: Path) -> nib.Nifti1Image:
    image_path, _ = write_nifti(volume, out / "ours.nii")
    return nib.Nifti1Image.from_filename(image_path)


def only_volume(paths: list[Path]) -> Volume:
    result = assemble_series(paths)
    assert result.refused == ()
    assert len(result.volumes) == 1
    return result.volumes[0]


@pytest.mark.parametrize("position", DECUBITUS)
def test_decubitus_matches_dcm2niix(shared_data: Path, tmp_path: Path, position: str) -> None:
    (folder,) = (shared_data / "dcm_qa_decubitus" / "In" / position).glob("*t1_fl2d_sag")
    volume = only_volume(sorted(folder.glob("*.dcm")))
    assert volume.array.shape == (35, 256, 256)
    assert volume.qc == ()
    (reference,) = dcm2niix(folder, tmp_path / "ref").values()
    mine = ours(volume, tmp_path)
    np.testing.assert_allclose(mine.affine, reference.affine, atol=1e-3)
    np.testing.assert_array_equal(mine.get_fdata(), reference.get_fdata())


def test_synthetic_ct_round_trips_and_matches_dcm2niix(tmp_path: Path) -> None:
    desc = write_synthetic_ct(tmp_path / "ct", 10, rows=48, columns=48, n_nodules=1)
    volume = only_volume(sorted((tmp_path / "ct").glob("*.dcm")))
    _, datasets = synth_ct_datasets(10, 48, 48, n_nodules=1)
    expected = list(datasets)[::-1]  # InstanceNumber 1 is the highest z: ascending z is the reverse
    assert [r.sop_instance_uid for r in volume.slices] == list(desc.sop_instance_uids[::-1])
    np.testing.assert_array_equal(volume.array, synthetic.stored_hu(expected))
    assert volume.array.dtype == np.float32
    assert volume.array.min() >= -1024
    np.testing.assert_allclose(volume.affine[:3, 3], [float(v) for v in expected[0].ImagePositionPatient])
    # [slice, row, column] -> LPS: slices step up in z, rows in y, columns in x
    spacing = desc.pixel_spacing[0]
    np.testing.assert_allclose(volume.affine[:3, :3], [[0, 0, spacing], [0, spacing, 0], [desc.slice_spacing, 0, 0]])
    (reference,) = dcm2niix(tmp_path / "ct", tmp_path / "ref").values()
    mine = ours(volume, tmp_path)
    np.testing.assert_allclose(mine.affine, reference.affine, atol=1e-3)
    np.testing.assert_array_equal(mine.get_fdata(), reference.get_fdata())


def _tilted(tmp_path: Path) -> list[Path]:
    _, datasets = synth_ct_datasets(8, 48, 48, seed=1, pixel_spacing=4.0, n_nodules=0)
    slices = list(datasets)
    synthetic.tilt(slices, 20.0)
    return synthetic.write(slices, tmp_path / "tilt")


def test_gantry_tilt_resampled_like_dcm2niix(tmp_path: Path) -> None:
    volume = only_volume(_tilted(tmp_path))
    assert [f.code for f in volume.qc] == ["gantry-tilt"]
    assert volume.resampled
    np.testing.assert_allclose(volume.affine[:3, :3], [[0, 0, 4.0], [0, 4.0, 0], [2.5, 0, 0]], atol=1e-9)
    images = dcm2niix(tmp_path / "tilt", tmp_path / "ref")
    (tilt_name,) = [name for name in images if "Tilt" in name]
    reference, mine = images[tilt_name], ours(volume, tmp_path)
    np.testing.assert_allclose(reference.affine[:3, :3], mine.affine[:3, :3], atol=1e-3)
    # dcm2niix pads rows to hold the sheared slices; its origin (v1.0.20260724) moves by the padded rows
    # although the unpadded slice keeps its voxels, so align voxels by its padding, then compare in world space.
    padded = reference.shape[1] - mine.shape[1]
    offset = (np.linalg.inv(reference.affine) @ mine.affine)[1, 3] - padded
    assert 0 <= offset <= padded
    ref = reference.get_fdata()
    rows = np.arange(mine.shape[1]) + offset
    low = np.floor(rows).astype(int)
    weight = (rows - low)[None, :, None]
    inside = low + 1 < ref.shape[1]
    sampled = ref[:, low[inside], :] * (1 - weight[:, inside]) + ref[:, low[inside] + 1, :] * weight[:, inside]
    difference = np.abs(sampled - mine.get_fdata()[:, inside, :])[:, 2:-2, :]
    assert float(np.median(difference)) < 10.0
