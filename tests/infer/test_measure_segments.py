"""``measure_segments`` measures every segment in one pass over the values: the same numbers as each segment
measured on its own, and as plain numpy over the segment's voxels."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import CODE, make_volume

from gateway.infer.measure import measure_mask, measure_segments
from gateway.registry.manifest import SegmentLabel

WANTED = [["volume", "mean", "stddev"], ["volume", "voxels", "min", "max"], ["volume", "mean"], ["voxels"]]


def label(value: int, measurements: list[str]) -> SegmentLabel:
    return SegmentLabel.model_validate(
        {"value": value, "name": f"S{value}", "category": CODE, "type": CODE, "measurements": measurements}
    )


def test_segments_measured_together_equal_each_measured_alone() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(40, 300, size=(19, 12, 13)).astype(np.float32)  # 19 slices: slabs of 8, 8 and 3
    masks = {
        0: rng.random(values.shape) > 0.2,  # most of the volume
        1: rng.random(values.shape) > 0.9,  # overlaps the first
        2: np.zeros(values.shape, bool),  # empty: no statistics
        3: rng.random(values.shape) > 0.5,  # no statistics wanted
    }
    masks[1][10:] = False  # nothing in the last slabs
    labels = [label(value, wanted) for value, wanted in enumerate(WANTED)] + [label(9, ["volume"])]  # 9: no mask
    volume = make_volume(values)
    measured = measure_segments(masks, volume, labels)
    assert [m.value for m in measured] == [0, 1, 2, 3]
    for m, wanted in zip(measured, WANTED, strict=True):
        assert dict(m.values) == measure_mask(masks[m.value], volume, wanted)  # exactly
        inside = values[masks[m.value]].astype(np.float64)
        if "mean" in m.values:
            assert m.values["mean"] == pytest.approx(inside.mean())
        if "stddev" in m.values:
            assert m.values["stddev"] == pytest.approx(inside.std())
        if "max" in m.values:
            assert (m.values["min"], m.values["max"]) == (inside.min(), inside.max())
    assert dict(measured[2].values) == {"volume": 0.0}  # empty: no statistics
    assert set(measured[3].values) == {"voxels"}


def test_a_mask_of_another_shape_is_refused() -> None:
    volume = make_volume(np.zeros((4, 5, 6), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        measure_segments({1: np.ones((4, 5, 5), bool)}, volume, [label(1, ["volume", "mean"])])
