"""Measurements on the source grid against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import CODE, make_volume

from gateway.infer.measure import (
    _statistics_of,
    for_reading,
    measure_mask,
    measure_segments,
    measurement_units,
    voxel_volume_ml,
)
from gateway.registry.manifest import SegmentLabel

ALL = ["volume", "voxels", "mean", "stddev", "min", "max"]


def test_measurements_match_numpy() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(40, 15, size=(6, 9, 11)).astype(np.float32)
    mask = rng.random((6, 9, 11)) > 0.7
    affine = np.diag([2.5, 0.8, 0.7, 1.0])
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # a permutation: same volume
    got = measure_mask(mask, make_volume(values, affine), ALL)
    inside = values[mask].astype(np.float64)
    assert got["voxels"] == mask.sum()
    assert got["volume"] == pytest.approx(mask.sum() * 2.5 * 0.8 * 0.7 / 1000)
    assert got["mean"] == pytest.approx(inside.mean())
    assert got["stddev"] == pytest.approx(inside.std())
    assert (got["min"], got["max"]) == (pytest.approx(inside.min()), pytest.approx(inside.max()))


def test_oblique_voxel_volume_is_the_determinant() -> None:
    angle = np.radians(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.0, 0.5, 0.5])
    assert voxel_volume_ml(affine) == pytest.approx(0.0005)


def test_only_listed_measurements_and_none_for_an_empty_segment() -> None:
    volume = make_volume(np.ones((2, 3, 4), np.float32))
    assert measure_mask(np.zeros((2, 3, 4), bool), volume, ALL) == {"volume": 0.0, "voxels": 0.0}
    assert set(measure_mask(np.ones((2, 3, 4), bool), volume, ["mean"])) == {"mean"}
    with pytest.raises(ValueError, match="does not match"):
        measure_mask(np.ones((3, 3, 3), bool), volume, ALL)


def test_segments_with_units_and_4d_volumes_use_the_first_volume() -> None:
    array = np.stack([np.full((2, 3, 4), 100.0, np.float32), np.full((2, 3, 4), 5.0, np.float32)])
    volume = make_volume(array, modality="MR", dimension_4=(("Diffusion", (0.0, None)), ("Diffusion", (1000.0, None))))
    labels = [SegmentLabel(value=1, name="A", category=CODE, type=CODE, measurements=["volume", "mean"])]
    (result,) = measure_segments({1: np.ones((2, 3, 4), bool)}, volume, labels)
    assert result.values == {"volume": pytest.approx(0.024), "mean": 100.0}
    assert result.units == {"volume": "ml", "mean": "1"}
    assert result.as_dict()["name"] == "A"
    assert measurement_units("CT")["mean"] == "[hnsf'U]"


def test_statistics_by_slabs_equal_those_over_the_whole_segment() -> None:
    """The slab-wise statistics (merged counts, means and squared deviations) are those of one copy of the voxels,
    on a segment whose slabs hold very different counts and values (and some none)."""
    rng = np.random.default_rng(7)
    values = rng.normal(40, 300, (29, 33, 31)).astype(np.float32)
    values[10:] += 900.0  # a level shift between slabs: a naive pooled variance would be off
    mask = rng.random(values.shape) < np.linspace(0.0, 0.9, 29)[:, None, None]
    mask[:9] = False  # the first slab holds nothing
    inside = values[mask].astype(np.float64)
    stats = _statistics_of(values, [mask])[0]
    assert stats["min"] == inside.min() and stats["max"] == inside.max()
    assert stats["mean"] == pytest.approx(inside.mean(), rel=1e-12)
    assert stats["stddev"] == pytest.approx(inside.std(), rel=1e-12)


def test_volumes_are_rounded_as_written() -> None:
    """Hundredths below 10 ml, tenths below 100 ml, whole ml above: 3 significant digits up to a litre."""
    assert for_reading("volume", 0.2749) == 0.27
    assert for_reading("volume", 95.44) == 95.4
    assert for_reading("volume", 207.8) == 208
    assert for_reading("volume", 540.3) == 540
    assert isinstance(for_reading("volume", 540.3), int)
