"""Reading header values tolerantly: what the geometry needs, or ``None`` when absent or malformed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset

SIEMENS_MR_HEADER = "SIEMENS MR HEADER"


def floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """``count`` finite numbers from ``ds.keyword``, or ``None`` when absent or malformed."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(items) != count:
        return None
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None


def siemens_private(ds: Dataset, element: int) -> Any:
    """The value of Siemens MR private element (0019,xxEE) of the ``SIEMENS MR HEADER`` block, or ``None``."""
    if not any(0x00190010 <= tag <= 0x001900FF for tag in map(int, ds.keys())):
        return None  # no private creator in group 0019: skip pydicom's block search (it copies the group)
    try:
        return ds.get_private_item(0x0019, element, SIEMENS_MR_HEADER).value
    except KeyError:
        return None


def scalar(ds: Dataset, keyword: str) -> Any:
    """A hashable value of ``ds.keyword`` for splitting stacks: ``None``, a number or string, or a tuple of strings."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(str(v) for v in value)
    return float(value) if isinstance(value, float) else value
