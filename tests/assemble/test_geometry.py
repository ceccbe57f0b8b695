"""Geometry QC: spacing from positions, missing slices, uneven spacing, gantry tilt, NIfTI export."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import synthetic

from gateway.assemble.assemble import assemble_series
from gateway.assemble.geometry import resample_stack, stack_geometry
from gateway.assemble.nifti import write_nifti
from gateway.errors import AssemblyError

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_spacing_comes_from_positions_not_thickness(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(5)
    for ds in slices:
        ds.SliceThickness = 1.0
    (volume,) = assemble_series(synthetic.write(slices, tmp_path)).volumes
    assert volume.spacing == pytest.approx((2.5, 360 / 32, 360 / 32))


def test_missing_slice_flagged_not_resampled(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(8)
    del slices[4]
    (volume,) = assemble_series(synthetic.write(slices, tmp_path)).volumes
    assert [f.code for f in volume.qc] == ["missing-slices"]
    assert not volume.resampled
    assert volume.array.shape[0] == 7
    np.testing.assert_array_equal(volume.array, synthetic.stored_hu(slices[::-1]))


def test_uneven_spacing_resampled_and_flagged(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(6)
    synthetic.set_z(slices, [10.0, 7.0, 5.0, 2.5, 0.5, -2.0])
    (volume,) = assemble_series(synthetic.write(slices, tmp_path)).volumes
    assert [f.code for f in volume.qc] == ["uneven-spacing"]
    assert volume.resampled
    assert volume.array.shape[0] == 6
    assert volume.spacing[0] == pytest.approx(12.0 / 5)
    source = synthetic.stored_hu(slices[::-1])
    np.testing.assert_allclose(volume.array[0], source[0])
    np.testing.assert_allclose(volume.array[-1], source[-1])
    # output slice 1 at z = -2 + 2.4 = 0.4 lies between z = -2 (w 0.04) and z = 0.5
    np.testing.assert_allclose(volume.array[1], source[0] * 0.04 + source[1] * 0.96, rtol=1e-5, atol=1e-3)


def test_tilt_shift_moves_voxels_by_the_drift() -> None:
    positions = [(0.0, 0.0, 0.0), (0.0, 1.0, 2.0), (0.0, 2.0, 4.0)]  # 1 mm in y per slice = 0.5 rows at 2 mm
    geometry = stack_geometry(positions, AXIAL, (2.0, 2.0))
    assert geometry.shifts is not None
    np.testing.assert_allclose(geometry.shifts[:, 0], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(geometry.affine[:3, 0], [0.0, 0.0, 2.0])
    ramp = np.tile(np.arange(8, dtype=np.float32)[:, None], (3, 1, 4)).reshape(3, 8, 4)
    out = resample_stack(ramp, geometry, fill=-1.0)
    np.testing.assert_allclose(out[1, 1:, 0], np.arange(7) + 0.5)
    assert out[2, 0, 0] == -1.0


def test_positions_off_a_line_refused() -> None:
    positions = [(0.0, 0.0, 0.0), (0.0, 3.0, 2.0), (0.0, 0.0, 4.0)]
    with pytest.raises(AssemblyError, match="do not lie on a line"):
        stack_geometry(positions, AXIAL, (1.0, 1.0))


def test_repeated_positions_refused() -> None:
    with pytest.raises(AssemblyError, match="repeat"):
        stack_geometry([(0.0, 0.0, 0.0), (0.0, 0.0, 0.0)], AXIAL, (1.0, 1.0))


def test_single_slice_without_thickness_is_one_millimetre() -> None:
    geometry = stack_geometry([(1.0, 2.0, 3.0)], AXIAL, (0.5, 0.5))
    np.testing.assert_allclose(geometry.affine[:3, 0], [0.0, 0.0, 1.0])
    assert geometry.qc[0].code == "single-slice"


def test_nifti_sidecar_records_geometry_and_sources(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(6)
    synthetic.set_z(slices, [10.0, 7.0, 5.0, 2.5, 0.5, -2.0])
    (volume,) = assemble_series(synthetic.write(slices, tmp_path / "in")).volumes
    image_path, sidecar_path = write_nifti(volume, tmp_path / "out.nii")
    image = nib.Nifti1Image.from_filename(image_path)
    assert image.header["qform_code"] == image.header["sform_code"] == 1
    assert np.asarray(image.dataobj).dtype == np.float32
    side = json.loads(sidecar_path.read_text())
    assert side["resampled"] is True
    assert [q["code"] for q in side["qc"]] == ["uneven-spacing"]
    assert side["description"]["source_slices"] == [ds.SOPInstanceUID for ds in slices[::-1]]
    assert len(side["slices"]) == 6
    np.testing.assert_allclose(side["affine_ras_nifti"], image.affine, atol=1e-5)
    assert "PatientName" not in sidecar_path.read_text()
