"""Lesions: connected components of a segment, each measured (volume, long and short axis, statistics, centre)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from tiny_models import CODE, make_volume

from gateway.infer.lesions import Lesion, LesionSet, find_lesions
from gateway.registry.manifest import SegmentLabel

SPACING = (1.25, 0.7, 0.7)  # slice, row, column (mm)
SHAPE = (40, 96, 96)


def axial(spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    """Slices towards the feet, rows towards the back, columns towards the left (IPL), as a head-first axial CT."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]]) * np.array(spacing)
    affine[:3, 3] = (-30.0, -40.0, 25.0)
    return affine


def nodule(**fields: Any) -> SegmentLabel:
    base: dict[str, Any] = {
        "value": 1,
        "name": "nodule",
        "category": CODE,
        "type": CODE,
        "measurements": ["volume", "mean", "stddev", "min", "max"],
        "lesions": True,
    }
    return SegmentLabel.model_validate({**base, **fields})


def distance_mm(shape: tuple[int, int, int], centre: tuple[float, float, float], spacing: Any = SPACING) -> np.ndarray:
    index = np.indices(shape, dtype=np.float64)
    return np.sqrt(sum(((index[i] - centre[i]) * spacing[i]) ** 2 for i in range(3)))


def ball(centre: tuple[float, float, float], radius: float, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return distance_mm(shape, centre) <= radius


def lung(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Lung (-850 HU) around soft-tissue nodules (30 HU), both with noise."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 1.0, mask.shape)
    return np.where(mask, 30.0 + 15.0 * noise, -850.0 + 40.0 * noise).astype(np.float32)


def sphere_ml(radius: float) -> float:
    return 4.0 / 3.0 * math.pi * radius**3 / 1000.0


def in_mm(ends: tuple[tuple[float, float], tuple[float, float]], spacing: Any = SPACING) -> np.ndarray:
    """The vector from one end point to the other, in mm (row, column)."""
    (r0, c0), (r1, c1) = ends
    return np.array([(r1 - r0) * spacing[1], (c1 - c0) * spacing[2]])


SPHERES = (((12.3, 30.4, 28.2), 5.0), ((22.6, 60.1, 62.7), 8.0), ((30.2, 25.5, 70.4), 3.0))  # centre (index), mm


@pytest.fixture(scope="module")
def spheres() -> tuple[np.ndarray, Any, LesionSet]:
    truth = [ball(centre, radius) for centre, radius in SPHERES]
    mask = np.logical_or.reduce(truth)
    volume = make_volume(lung(mask), axial())
    return np.stack(truth), volume, find_lesions(mask, volume, nodule())


def test_three_spheres_three_lesions(spheres: tuple[np.ndarray, Any, LesionSet]) -> None:
    truth, volume, found = spheres
    assert (found.label, found.name, found.left_out, found.min_volume_ml) == (1, "nodule", 0, 0.0)
    assert [lesion.number for lesion in found.lesions] == [1, 2, 3]
    by_radius = sorted(zip(SPHERES, truth, strict=True), key=lambda item: -item[0][1])  # numbered by volume
    for lesion, ((centre, radius), mask) in zip(found.lesions, by_radius, strict=True):
        assert lesion.volume_ml == pytest.approx(sphere_ml(radius), rel=0.1)
        assert lesion.voxels == int(mask.sum())
        assert lesion.values["long_axis"] == pytest.approx(2 * radius, abs=1.5)
        assert lesion.values["short_axis"] == pytest.approx(2 * radius, abs=1.5)
        assert lesion.values["short_axis"] <= lesion.values["long_axis"]
        np.testing.assert_allclose(lesion.centre_index, centre, atol=0.15)
        np.testing.assert_allclose(lesion.centre, (volume.affine @ [*lesion.centre_index, 1.0])[:3])
        assert abs(lesion.key_slice - centre[0]) <= 1
        assert lesion.probability is None


def test_statistics_are_those_of_the_lesion_voxels(spheres: tuple[np.ndarray, Any, LesionSet]) -> None:
    truth, volume, found = spheres
    by_radius = sorted(zip(SPHERES, truth, strict=True), key=lambda item: -item[0][1])
    for lesion, (_, mask) in zip(found.lesions, by_radius, strict=True):
        inside = volume.array[mask].astype(np.float64)
        expected = {"mean": inside.mean(), "stddev": inside.std(), "min": inside.min(), "max": inside.max()}
        for name, value in expected.items():
            assert lesion.values[name] == pytest.approx(value, rel=1e-6), name
        assert 20.0 < lesion.values["mean"] < 40.0  # the nodule's HU, not the lung's
    assert found.lesions[0].units == {
        "volume": "ml",
        "long_axis": "mm",
        "short_axis": "mm",
        "mean": "[hnsf'U]",
        "stddev": "[hnsf'U]",
        "min": "[hnsf'U]",
        "max": "[hnsf'U]",
    }


def test_masks_and_boxes_give_back_the_segment(spheres: tuple[np.ndarray, Any, LesionSet]) -> None:
    truth, _, found = spheres
    rebuilt = np.zeros(SHAPE, dtype=np.int32)
    for lesion in found.lesions:
        assert lesion.mask.dtype == np.bool_
        for k in lesion.slices():
            rebuilt[k] += lesion.mask_on(k, SHAPE[1:])
    np.testing.assert_array_equal(rebuilt, truth.sum(axis=0))  # each voxel in exactly one lesion
    assert found.as_dict()["lesions"][0]["number"] == 1


def test_only_the_listed_statistics() -> None:
    mask = ball((10.0, 20.0, 20.0), 4.0, (20, 40, 40))
    volume = make_volume(lung(mask), axial(), modality="MR")
    (lesion,) = find_lesions(mask, volume, nodule(measurements=["volume", "mean"])).lesions
    assert set(lesion.values) == {"volume", "long_axis", "short_axis", "mean"}
    assert lesion.units["mean"] == "1"  # MR signal: no unit


def test_26_connectivity() -> None:
    mask = np.zeros((12, 12, 12), dtype=np.bool_)
    mask[2:5, 2:5, 2:5] = True
    mask[5:8, 5:8, 5:8] = True  # meets the first only at a corner: (4, 4, 4) and (5, 5, 5)
    volume = make_volume(np.zeros(mask.shape, np.float32), axial())
    (lesion,) = find_lesions(mask, volume, nodule()).lesions
    assert lesion.voxels == 54
    assert lesion.box == (2, 2, 2) and lesion.mask.shape == (6, 6, 6)
    mask[5:8, 5:8, 5:8] = False
    mask[6:9, 6:9, 6:9] = True  # one empty voxel between them
    assert [lesion.voxels for lesion in find_lesions(mask, volume, nodule()).lesions] == [27, 27]


def test_components_separated_by_an_empty_plane_in_a_box_of_another() -> None:
    """A ring around a blob: the blob lies inside the ring's box, separated from it in every direction."""
    mask = np.zeros((3, 20, 20), dtype=np.bool_)
    mask[1, 2:18, 2:18] = True
    mask[1, 4:16, 4:16] = False
    mask[1, 8:12, 8:12] = True
    volume = make_volume(np.zeros(mask.shape, np.float32), axial())
    found = find_lesions(mask, volume, nodule())
    assert [lesion.voxels for lesion in found.lesions] == [16 * 16 - 12 * 12, 16]
    ring, blob = found.lesions
    np.testing.assert_allclose(ring.centre_index, blob.centre_index)  # both centred on (1, 9.5, 9.5)
    assert not np.logical_and(ring.mask_on(1, (20, 20)), blob.mask_on(1, (20, 20))).any()


def test_small_components_are_left_out_and_counted() -> None:
    shape = (20, 40, 40)
    mask = ball((10.0, 20.0, 20.0), 4.0, shape)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels: 4.9 mm3
    mask[17, 37, 37] = True
    mask[1, 37:39, 1] = True
    voxel_ml = 1.25 * 0.7 * 0.7 / 1000
    volume = make_volume(lung(mask), axial())
    found = find_lesions(mask, volume, nodule(min_volume_ml=0.01))
    assert (len(found.lesions), found.left_out, found.min_volume_ml) == (1, 3, 0.01)
    assert found.lesions[0].volume_ml == pytest.approx(sphere_ml(4.0), rel=0.1)
    at_threshold = find_lesions(mask, volume, nodule(min_volume_ml=8 * voxel_ml))  # at least min_volume_ml: kept
    assert (len(at_threshold.lesions), at_threshold.left_out) == (2, 2)
    assert found.as_dict()["left_out"] == 3


def test_each_lesion_has_its_highest_probability() -> None:
    shape = (20, 40, 40)
    first, second = ball((6.0, 12.0, 12.0), 3.0, shape), ball((13.0, 28.0, 27.0), 4.0, shape)
    probability = np.full(shape, 0.2, dtype=np.float32)
    probability[first] = 0.6
    probability[second] = 0.7
    probability[6, 12, 12] = 0.91
    probability[13, 28, 26] = 0.73
    probability[0, 0, 0] = 0.99  # outside every lesion
    mask = first | second
    volume = make_volume(lung(mask), axial())
    found = find_lesions(mask, volume, nodule(), probability)
    assert [lesion.probability for lesion in found.lesions] == [pytest.approx(0.73), pytest.approx(0.91)]
    assert found.lesions[0].as_dict()["probability"] == pytest.approx(0.73)


@pytest.mark.parametrize("angle", [30.0, -62.0])
def test_an_oblique_ellipse_has_its_long_and_short_axis(angle: float) -> None:
    """An ellipsoid (semi-axes 10 and 4 mm in plane, 5 mm across slices) turned ``angle`` degrees in the plane, on
    pixels that are not square: the axes come out in mm, along and across the ellipse, perpendicular."""
    spacing = (1.5, 0.6, 0.9)
    shape, centre = (11, 60, 40), (5.0, 29.6, 20.3)
    theta = math.radians(angle)
    along, across = np.array([math.cos(theta), math.sin(theta)]), np.array([-math.sin(theta), math.cos(theta)])
    index = np.indices(shape, dtype=np.float64)
    in_plane = np.stack([(index[1] - centre[1]) * spacing[1], (index[2] - centre[2]) * spacing[2]], axis=-1)
    z = (index[0] - centre[0]) * spacing[0]
    mask = (in_plane @ along / 10.0) ** 2 + (in_plane @ across / 4.0) ** 2 + (z / 5.0) ** 2 <= 1.0
    volume = make_volume(lung(mask), axial(spacing))
    (lesion,) = find_lesions(mask, volume, nodule()).lesions
    assert lesion.key_slice == 5
    assert lesion.values["long_axis"] == pytest.approx(20.0, abs=1.5)
    assert lesion.values["short_axis"] == pytest.approx(8.0, abs=1.5)
    long_mm, short_mm = in_mm(lesion.long_axis, spacing), in_mm(lesion.short_axis, spacing)
    assert np.linalg.norm(long_mm) == pytest.approx(lesion.values["long_axis"])
    assert np.linalg.norm(short_mm) == pytest.approx(lesion.values["short_axis"])
    assert abs(long_mm @ along) / np.linalg.norm(long_mm) > math.cos(math.radians(4.0))  # along the ellipse
    assert abs(long_mm @ short_mm) < 1e-6 * np.linalg.norm(long_mm) * np.linalg.norm(short_mm)  # perpendicular
    long_middle = (np.mean(lesion.long_axis, axis=0) - centre[1:]) * spacing[1:]
    assert np.linalg.norm(long_middle) < 1.0  # through the centre
    short_middle = (np.mean(lesion.short_axis, axis=0) - centre[1:]) * spacing[1:]
    assert abs(short_middle @ across) < 1.0  # its middle on the ellipse's long axis
    assert abs(short_middle @ along) < 4.0  # where the ellipse is widest, to a pixel: 4 mm off-centre loses < 0.3 mm


def test_the_grid_orientation_in_space_does_not_change_the_measurements(
    spheres: tuple[np.ndarray, Any, LesionSet],
) -> None:
    truth, volume, found = spheres
    c, s = math.cos(0.4), math.sin(0.4)
    turn = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    oblique = volume.affine.copy()
    oblique[:3, :3] = turn @ oblique[:3, :3]
    turned = find_lesions(truth.any(axis=0), make_volume(volume.array, oblique), nodule())
    for a, b in zip(found.lesions, turned.lesions, strict=True):
        assert a.values == pytest.approx(b.values)
        np.testing.assert_allclose([a.long_axis, a.short_axis], [b.long_axis, b.short_axis], atol=1e-9)
        origin = volume.affine[:3, 3]
        np.testing.assert_allclose(b.centre, origin + turn @ (np.array(a.centre) - origin))  # the centre turns


def test_same_input_same_numbering_and_values() -> None:
    shape = (30, 40, 40)
    mask = ball((8.2, 20.0, 20.0), 4.0, shape) | ball((21.2, 10.0, 30.0), 4.0, shape)  # the same ball twice
    mask |= ball((15.0, 30.0, 8.0), 2.5, shape)
    volume = make_volume(lung(mask), axial())
    runs = [find_lesions(mask.copy(), volume, nodule(), np.ones(shape, np.float32)) for _ in range(2)]
    assert runs[0].as_dict() == runs[1].as_dict()
    for a, b in zip(runs[0].lesions, runs[1].lesions, strict=True):
        assert (a.long_axis, a.short_axis, a.centre_index, a.box) == (b.long_axis, b.short_axis, b.centre_index, b.box)
        np.testing.assert_array_equal(a.mask, b.mask)
    first, second, third = runs[0].lesions
    assert first.voxels == second.voxels and first.centre_index[0] < second.centre_index[0]  # ties: by centre
    assert third.voxels < second.voxels


def test_a_4d_volume_is_measured_on_its_first_volume() -> None:
    mask = ball((6.0, 15.0, 15.0), 4.0, (12, 30, 30))
    first = lung(mask)
    volume = make_volume(np.stack([first, first + 1000.0, first - 500.0]), axial(), modality="MR")
    (lesion,) = find_lesions(mask, volume, nodule()).lesions
    assert lesion.values["mean"] == pytest.approx(float(first[mask].astype(np.float64).mean()))
    assert lesion.values["max"] == pytest.approx(float(first[mask].max()))


def test_a_single_voxel_and_a_single_row() -> None:
    volume = make_volume(np.zeros((4, 10, 10), np.float32), axial())
    voxel = np.zeros((4, 10, 10), dtype=np.bool_)
    voxel[2, 3, 4] = True
    (lesion,) = find_lesions(voxel, volume, nodule()).lesions
    assert lesion.values["long_axis"] == pytest.approx(0.7) and lesion.values["short_axis"] == pytest.approx(0.7)
    assert lesion.voxels == 1 and lesion.key_slice == 2 and lesion.centre_index == (2.0, 3.0, 4.0)
    row = np.zeros((4, 10, 10), dtype=np.bool_)
    row[1, 5, 2:7] = True
    (lesion,) = find_lesions(row, volume, nodule()).lesions
    assert lesion.values["long_axis"] == pytest.approx(3.5) and lesion.values["short_axis"] == pytest.approx(0.7)
    column = np.zeros((4, 10, 10), dtype=np.bool_)
    column[:, 5, 5] = True  # one pixel on every slice: the first is the key slice
    (lesion,) = find_lesions(column, volume, nodule()).lesions
    assert lesion.key_slice == 0 and lesion.values["long_axis"] == pytest.approx(0.7)
    assert lesion.volume_ml == pytest.approx(4 * 1.25 * 0.7 * 0.7 / 1000)


def test_no_voxels_no_lesions() -> None:
    volume = make_volume(np.zeros((4, 10, 10), np.float32), axial())
    found = find_lesions(np.zeros((4, 10, 10), dtype=np.bool_), volume, nodule())
    assert (found.lesions, found.left_out) == ((), 0)


def test_refuses_a_mask_or_probability_of_another_shape() -> None:
    volume = make_volume(np.zeros((4, 10, 10), np.float32), axial())
    with pytest.raises(ValueError, match="mask must be a bool array"):
        find_lesions(np.zeros((4, 10, 9), dtype=np.bool_), volume, nodule())
    with pytest.raises(ValueError, match="mask must be a bool array"):
        find_lesions(np.zeros((4, 10, 10), dtype=np.uint8), volume, nodule())
    with pytest.raises(ValueError, match="probability has shape"):
        find_lesions(np.zeros((4, 10, 10), dtype=np.bool_), volume, nodule(), np.zeros((4, 10), np.float32))


def test_lesion_value_types() -> None:
    mask = ball((3.0, 5.0, 5.0), 2.0, (7, 11, 11))
    (lesion,) = find_lesions(mask, make_volume(lung(mask), axial()), nodule()).lesions
    assert isinstance(lesion, Lesion)
    assert all(type(v) is float for v in lesion.values.values())
    assert all(type(v) is float for v in (*lesion.centre, *lesion.centre_index))
    assert all(type(x) is float for ends in (lesion.long_axis, lesion.short_axis) for point in ends for x in point)
    assert all(type(x) is int for x in (*lesion.box, lesion.key_slice, lesion.voxels))
