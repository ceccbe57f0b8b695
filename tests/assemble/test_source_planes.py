"""Source planes of resampled volumes: where each source image lies on the grid, and outputs taken back onto it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import synthetic

from gateway.assemble.assemble import assemble_series
from gateway.assemble.geometry import resample_stack, stack_geometry
from gateway.assemble.model import SliceRef, SourcePlane, Volume
from gateway.assemble.source_grid import on_planes, plane_of_slice, source_planes, source_stack, to_source_plane

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PIXEL = 360 / synthetic.SIZE  # the synthetic CT's pixel spacing, mm


def _volume(tmp_path: Path, slices: list) -> Volume:  # type: ignore[type-arg]
    (volume,) = assemble_series(synthetic.write(slices, tmp_path)).volumes
    return volume


def _sheared(slices: list, rows_per_slice: float) -> None:  # type: ignore[type-arg]
    """Move each slice's origin along y by ``rows_per_slice`` pixels per slice (feet to head), as a tilt does."""
    for k, ds in enumerate(reversed(slices)):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, round(y + k * rows_per_slice * PIXEL, 6), z]


def test_stack_geometry_places_each_source_slice_on_the_grid() -> None:
    regular = stack_geometry([(0.0, 0.0, 2.5 * k) for k in range(4)], AXIAL, (1.0, 1.0))
    gap = stack_geometry([(0.0, 0.0, z) for z in (0.0, 2.5, 7.5, 10.0)], AXIAL, (1.0, 1.0))
    assert regular.planes is None and gap.planes is None  # slice k is source slice k
    tilted = stack_geometry([(0.0, 0.5 * k, 2.5 * k) for k in range(3)], AXIAL, (1.0, 1.0))
    assert tilted.planes == ((0, True), (1, True), (2, True))
    uneven = stack_geometry([(0.0, 0.0, z) for z in (0.0, 2.5, 5.2, 12.5, 15.0)], AXIAL, (1.0, 1.0))
    assert uneven.sources is not None and len(uneven.sources) == 7  # 2.5 mm apart, two slices in the gap
    assert uneven.planes == ((0, True), (1, True), (2, False), (5, True), (6, True))


def test_volumes_not_resampled_have_no_source_planes(tmp_path: Path) -> None:
    plain = _volume(tmp_path / "plain", synthetic.ct_slices(6))
    slices = synthetic.ct_slices(8)
    del slices[4]
    gap = _volume(tmp_path / "gap", slices)
    assert plain.source_planes == () and gap.source_planes == ()
    assert [f.code for f in gap.qc] == ["missing-slices"]
    assert source_planes(gap) == tuple(SourcePlane(ref, k) for k, ref in enumerate(gap.slices))


def test_tilt_gives_one_exact_plane_per_slice_with_its_shift(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(6)
    synthetic.tilt(slices, 20.0)
    volume = _volume(tmp_path, slices)
    planes = volume.source_planes
    assert [p.ref for p in planes] == list(volume.slices) == [SliceRef(ds.SOPInstanceUID) for ds in slices[::-1]]
    assert [p.slice for p in planes] == list(range(6)) and all(p.exact for p in planes)
    drift = np.tan(np.radians(20.0)) * synthetic.SPACING / PIXEL  # rows per slice, y grows with z
    np.testing.assert_allclose([p.shift for p in planes], [(k * drift, 0.0) for k in range(6)], atol=1e-4)


def test_uneven_spacing_maps_each_plane_to_its_nearest_slice(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(6)
    synthetic.set_z(slices, [10.0, 7.0, 5.0, 2.5, 0.5, -2.0])  # along the normal: 0, 2.5, 4.5, 7, 9, 12
    volume = _volume(tmp_path, slices)
    # the uniform grid steps 2.4 mm: the planes lie at slices 0, 1.04, 1.875, 2.92, 3.75, 5
    assert [p.slice for p in volume.source_planes] == [0, 1, 2, 3, 4, 5]
    assert [p.exact for p in volume.source_planes] == [True, False, False, False, False, True]
    assert [p.ref.sop_instance_uid for p in volume.source_planes] == [ds.SOPInstanceUID for ds in slices[::-1]]
    assert all(p.shift == (0.0, 0.0) for p in volume.source_planes)


def test_uneven_spacing_with_a_gap_leaves_the_gap_slices_without_a_plane(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(5)
    synthetic.set_z(slices, [15.0, 12.5, 5.2, 2.5, 0.0])  # steps 2.5, 2.7, 7.3 (a gap), 2.5
    volume = _volume(tmp_path, slices)
    assert [f.code for f in volume.qc] == ["missing-slices", "uneven-spacing"]
    assert len(volume.slices) == 7 and volume.spacing[0] == pytest.approx(2.5)
    assert [(p.slice, p.exact) for p in volume.source_planes] == [
        (0, True),
        (1, True),
        (2, False),
        (5, True),
        (6, True),
    ]
    assert plane_of_slice(volume, 3).slice == 2 and plane_of_slice(volume, 4).slice == 5


def test_tilt_with_a_gap_keeps_slice_k_on_plane_k(tmp_path: Path) -> None:
    slices = synthetic.ct_slices(8)
    del slices[3]
    synthetic.tilt(slices, 15.0)
    volume = _volume(tmp_path, slices)
    assert [f.code for f in volume.qc] == ["missing-slices", "gantry-tilt"]
    assert [(p.slice, p.exact) for p in volume.source_planes] == [(k, True) for k in range(7)]
    assert [p.ref for p in volume.source_planes] == list(volume.slices)
    shifts = [p.shift[0] for p in volume.source_planes]
    steps = np.diff(shifts)
    assert steps[3] == pytest.approx(2 * steps[0])  # the gap doubles the drift between its two sides


def test_a_4d_volume_lists_the_first_volumes_planes(tmp_path: Path) -> None:
    base = synthetic.ct_slices(5)
    synthetic.tilt(base, 10.0)
    phases = [base, synthetic.renew_uids(base)]
    for number, phase in enumerate(phases, start=1):
        for ds in phase:
            ds.TemporalPositionIdentifier = number
    (volume,) = assemble_series(synthetic.write([ds for p in phases for ds in p], tmp_path)).volumes
    assert volume.array.ndim == 4
    assert [p.ref.sop_instance_uid for p in volume.source_planes] == [ds.SOPInstanceUID for ds in base[::-1]]


def test_source_stack_undoes_the_tilt_shift(tmp_path: Path) -> None:
    """Whole-pixel shifts make resampling exact, so going back must give the stored images (the sign convention)."""
    slices = synthetic.ct_slices(6)
    _sheared(slices, 1.0)
    volume = _volume(tmp_path, slices)
    np.testing.assert_allclose([p.shift for p in volume.source_planes], [(k, 0.0) for k in range(6)], atol=1e-6)
    stored = synthetic.stored_hu(slices[::-1])
    for linear in (False, True):
        back = source_stack(volume.array, volume, linear=linear, fill=np.nan)
        for k in range(6):
            inside = slice(0, synthetic.SIZE - k)  # source rows whose volume row r + k is still in the volume
            np.testing.assert_allclose(back[k, inside], stored[k, inside], atol=1e-3)
            assert np.isnan(back[k, synthetic.SIZE - k :]).all()


def test_source_pixel_shows_volume_pixel_plus_shift() -> None:
    geometry = stack_geometry([(0.0, 0.0, 0.0), (0.0, 1.0, 2.0)], AXIAL, (2.0, 2.0))  # half a row per slice
    assert geometry.shifts is not None
    ramp = np.tile(np.arange(8, dtype=np.float32)[:, None], (2, 1, 4)).reshape(2, 8, 4)
    volume = resample_stack(ramp, geometry, fill=-1.0)  # volume[i] = source[i - 0.5] on slice 1
    plane = SourcePlane(SliceRef("1"), 1, (float(geometry.shifts[1, 0]), 0.0))
    back = to_source_plane(volume[1], plane, linear=True, fill=-1.0)
    np.testing.assert_allclose(back[1:7, 0], np.arange(1, 7))  # linear of linear: exact away from the edges
    assert back[7, 0] == -1.0  # source row 7 shows volume row 7.5, outside
    nearest = to_source_plane(np.arange(8)[:, None] * np.ones((1, 4)), SourcePlane(SliceRef("1"), 0, (2.0, -1.0)))
    np.testing.assert_array_equal(nearest[:6, 1:], np.arange(2, 8)[:, None] * np.ones((1, 3)))
    assert (nearest[6:] == 0).all() and (nearest[:, 0] == 0).all()


def test_on_planes_moves_channels_alike() -> None:
    array = np.zeros((2, 6, 6, 3), dtype=np.uint8)
    array[1, 3, 3] = [1, 2, 3]
    planes = [SourcePlane(SliceRef("a"), 1, (1.0, 0.0)), SourcePlane(SliceRef("b"), 1, (0.0, -2.0))]
    out = on_planes(array, planes)
    assert out.shape == (2, 6, 6, 3) and out.dtype == np.uint8
    assert out[0, 2, 3].tolist() == [1, 2, 3] and out[1, 3, 5].tolist() == [1, 2, 3]
    assert int(out.astype(int).sum()) == 12
