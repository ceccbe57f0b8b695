"""The SEG's own check of a stack of binary masks says what highdicom's says, a few frames at a time."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest

from gateway.encode.seg import _CHECKED_FRAMES, _Segmentation

BINARY = hd.seg.SegmentationTypeValues.BINARY
NUMBERS = np.arange(1, 4)


def _masks(frames: int = 2 * _CHECKED_FRAMES + 3) -> np.ndarray:
    stack = np.zeros((frames, 6, 5, len(NUMBERS)), dtype=np.uint8)
    for segment in range(len(NUMBERS)):
        stack[:, segment * 2 : segment * 2 + 2, :, segment] = 1  # side by side
    return stack


def _both(stack: np.ndarray) -> tuple[hd.seg.SegmentsOverlapValues, hd.seg.SegmentsOverlapValues]:
    ours = _Segmentation._check_and_cast_pixel_array(stack, NUMBERS, BINARY, np.uint8)
    theirs = hd.seg.Segmentation._check_and_cast_pixel_array(stack.copy(), NUMBERS, BINARY, np.uint8)
    assert ours[0] is stack  # handed on as it is
    return ours[1], theirs[1]


def test_disjoint_masks_do_not_overlap() -> None:
    assert _both(_masks()) == (hd.seg.SegmentsOverlapValues.NO, hd.seg.SegmentsOverlapValues.NO)


@pytest.mark.parametrize("frame", [0, _CHECKED_FRAMES - 1, _CHECKED_FRAMES, 2 * _CHECKED_FRAMES + 2])
def test_one_shared_voxel_in_any_block_is_an_overlap(frame: int) -> None:
    stack = _masks()
    stack[frame, 0, 0, 2] = 1  # segment 3 reaches into segment 1
    assert _both(stack) == (hd.seg.SegmentsOverlapValues.YES, hd.seg.SegmentsOverlapValues.YES)


def test_a_value_other_than_0_or_1_in_the_last_block_goes_to_highdicom() -> None:
    stack = _masks()
    stack[-1, -1, -1, 0] = 2
    with pytest.raises(ValueError) as ours:
        _Segmentation._check_and_cast_pixel_array(stack, NUMBERS, BINARY, np.uint8)
    with pytest.raises(ValueError) as theirs:
        hd.seg.Segmentation._check_and_cast_pixel_array(stack, NUMBERS, BINARY, np.uint8)
    assert str(ours.value) == str(theirs.value)
