"""The Siemens mosaic diffusion series, end to end through ``assemble_series`` and NIfTI, against dcm2niix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gateway.assemble.assemble import assemble_series
from gateway.assemble.nifti import write_nifti

DCM2NIIX = Path(sys.executable).with_name("dcm2niix")


def test_mosaic_diffusion_series_matches_dcm2niix(shared_data: Path, tmp_path: Path) -> None:
    if not DCM2NIIX.exists():
        pytest.skip("dcm2niix is not installed (make test installs it)")
    folder = shared_data / "dcm_qa_decubitus" / "In" / "HFS" / "4_ep2d_diff_mddw_20_p2"
    subprocess.run([DCM2NIIX, "-z", "n", "-o", tmp_path, folder], check=True, capture_output=True, timeout=120)
    (reference_path,) = tmp_path.glob("*.nii")
    reference = nib.load(reference_path)
    bvals = [float(b) for b in reference_path.with_suffix(".bval").read_text().split()]

    result = assemble_series(sorted(folder.glob("*.dcm")))
    assert result.refused == ()
    (volume,) = result.volumes
    (tmp_path / "ours").mkdir()
    ours = nib.load(write_nifti(volume, tmp_path / "ours" / "dwi.nii")[0])
    assert ours.shape == reference.shape == (128, 128, 25, 13)
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-3)
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(reference.dataobj).astype(np.float32))
    assert [value[0] for _, value in volume.dimension_4] == bvals, "volumes in acquisition order, like dcm2niix"
