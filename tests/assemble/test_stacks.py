"""Stacking: order, splits, 4D, and the series refused with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import synthetic

from gateway.assemble.assemble import assemble_series
from gateway.assemble.planes import _plane, read_header, read_plane
from gateway.assemble.stacks import split_stacks


def test_shuffled_files_give_the_same_volume(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(8)
    ordered = assemble_series(synthetic.write(slices, tmp_path / "a")).volumes
    shuffled = assemble_series(synthetic.write(slices, tmp_path / "b", shuffle_seed=3)).volumes
    assert len(ordered) == len(shuffled) == 1
    np.testing.assert_array_equal(ordered[0].array, shuffled[0].array)
    np.testing.assert_array_equal(ordered[0].affine, shuffled[0].affine)
    assert ordered[0].slices == shuffled[0].slices
    zs = [ordered[0].affine @ [k, 0, 0, 1] for k in range(8)]
    assert np.all(np.diff([z[2] for z in zs]) > 0)  # ascending along the normal, not InstanceNumber


def test_sorting_ignores_instance_number(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(6)
    for ds, number in zip(slices, [4, 1, 6, 2, 5, 3], strict=True):
        ds.InstanceNumber = number
    (volume,) = assemble_series(synthetic.write(slices, tmp_path)).volumes
    assert [r.sop_instance_uid for r in volume.slices] == [ds.SOPInstanceUID for ds in slices[::-1]]


def test_two_echoes_give_two_volumes(tmp_path: Path) -> None:
    first = synthetic.ct_slices(6)
    second = synthetic.renew_uids(first)
    for echo, group in ((1, first), (2, second)):
        for ds in group:
            ds.EchoNumbers = echo
    interleaved = [ds for pair in zip(first, second, strict=True) for ds in pair]
    result = assemble_series(synthetic.write(interleaved, tmp_path, shuffle_seed=1))
    assert result.refused == ()
    assert len(result.volumes) == 2
    assert {len(v.slices) for v in result.volumes} == {6}
    assert all(v.qc == () for v in result.volumes)


def test_two_orientations_give_two_volumes(tmp_path: Path) -> None:
    axial = synthetic.ct_slices(5)
    other = synthetic.renew_uids(synthetic.ct_slices(4, seed=2))
    synthetic.sagittal(other)
    result = assemble_series(synthetic.write(axial + other, tmp_path, shuffle_seed=2))
    assert result.refused == ()
    assert sorted(len(v.slices) for v in result.volumes) == [4, 5]


def test_regular_phases_give_a_4d_volume(tmp_path: Path) -> None:
    base = synthetic.ct_slices(5)
    phases = [base, synthetic.renew_uids(base), synthetic.renew_uids(base)]
    for number, phase in enumerate(phases, start=1):
        for ds in phase:
            ds.TemporalPositionIdentifier = number
    result = assemble_series(synthetic.write([ds for p in phases for ds in p], tmp_path, shuffle_seed=4))
    (volume,) = result.volumes
    assert volume.array.shape == (3, 5, 32, 32)
    assert volume.dimension_4 == (
        ("TemporalPositionIdentifier", 1),
        ("TemporalPositionIdentifier", 2),
        ("TemporalPositionIdentifier", 3),
    )
    assert [refs[0].sop_instance_uid for refs in volume.slices_4d] == [p[-1].SOPInstanceUID for p in phases]


def test_irregular_phases_split_into_stacks(tmp_path: Path) -> None:
    first = synthetic.ct_slices(5)
    second = synthetic.renew_uids(first[:3])
    for number, phase in ((1, first), (2, second)):
        for ds in phase:
            ds.TemporalPositionIdentifier = number
    result = assemble_series(synthetic.write(first + second, tmp_path))
    assert sorted(len(v.slices) for v in result.volumes) == [3, 5]
    assert all(v.qc[0].code == "split" for v in result.volumes)


def test_single_slice_volume(tmp_path: Path) -> None:
    (volume,) = assemble_series(synthetic.write(synthetic.ct_slices(1), tmp_path)).volumes
    assert volume.array.shape == (1, 32, 32)
    assert [f.code for f in volume.qc] == ["single-slice"]
    assert volume.spacing[0] == pytest.approx(synthetic.SPACING)  # SliceThickness


def test_mixed_frame_sizes_refused(tmp_path: Path) -> None:
    small = synthetic.ct_slices(4, size=32)
    large = synthetic.renew_uids(synthetic.ct_slices(4, size=48), series_uid=small[0].SeriesInstanceUID)
    synthetic.set_z(large, [1.25 + 2.5 * k for k in range(4)])
    result = assemble_series(synthetic.write(small + large, tmp_path))
    assert result.volumes == ()
    (refusal,) = result.refused
    assert "inconsistent frame sizes: 32x32, 48x48" in refusal.reason
    assert len(refusal.sop_instance_uids) == 8


def test_missing_position_refused(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(5)
    del slices[2].ImagePositionPatient
    result = assemble_series(synthetic.write(slices, tmp_path))
    assert result.volumes == ()
    assert "ImagePositionPatient missing in 1 of 5 slices" in result.refused[0].reason


def test_non_parallel_slices_refused(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(6)
    synthetic.rotate_orientation(slices[3], 4.0)
    result = assemble_series(synthetic.write(slices, tmp_path))
    assert result.volumes == ()
    assert "non-parallel slices" in result.refused[0].reason


def test_siemens_diffusion_keys(shared_data: Path) -> None:
    folder = shared_data / "dcm_qa_decubitus" / "In" / "HFS" / "4_ep2d_diff_mddw_20_p2"
    paths = sorted(folder.glob("*.dcm"))
    keys = [dict(_plane(p, read_header(p)).keys)["Diffusion"] for p in paths]
    (volume,) = assemble_series(paths).volumes  # mosaics: 13 diffusion volumes of 25 tiles at the same positions
    assert volume.array.shape == (13, 25, 128, 128)
    assert [name for name, _ in volume.dimension_4] == ["Diffusion"] * 13
    assert sorted(value for _, value in volume.dimension_4) == sorted(keys)
    assert keys[0] == (0.0, None)
    assert keys[1] == (1000.0, (0.8624, -0.3624, 0.3533))
    assert len(set(keys)) == len(keys)


def test_split_stacks_on_planes_directly(tmp_path: Path) -> None:
    planes = [read_plane(p)[0] for p in synthetic.write(synthetic.ct_slices(4), tmp_path)]
    stacks, refused = split_stacks(planes[::-1])
    assert refused == []
    assert [p.ref for p in stacks[0].planes] == [p.ref for p in planes[::-1]]
