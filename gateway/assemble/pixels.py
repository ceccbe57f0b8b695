"""From stored values to modality values: Modality LUT, MONOCHROME1 and Pixel Padding, as float32.

Decoding (:mod:`gateway.assemble.decode`) gives *stored values*; the bits above Bits Stored are already masked
(unsigned) or sign-extended (signed) by pydicom, as PS3.5 8.1.1 asks. This module applies, per PS3.3:

1. **Pixel padding** (C.7.5.1.1.2): stored values equal to Pixel Padding Value, or between it and Pixel Padding
   Range Limit inclusive, are returned as a boolean mask, so padding stays recognisable after any transform.
   The values are read the way the pixels are (masked to Bits Stored, two's complement when signed), so a
   padding value written as US for signed data, or with unused high bits set, still matches.
2. **Modality LUT** (C.11.1): ``slope * s + intercept`` (Rescale Slope and Intercept, top level or the Pixel
   Value Transformation functional group of an enhanced multi-frame image, or the per-frame values a
   :class:`~gateway.assemble.model.Plane` carries), or the Modality LUT Sequence's table when present.
3. **MONOCHROME1** (C.7.6.3.1.2), where the minimum value is displayed white: the modality values are mirrored
   within the range the Modality LUT gives the Bits Stored range (``m -> low + high - m``; for the identity
   and a 12-bit unsigned image, ``m -> 4095 - m``), so that, as for MONOCHROME2, higher is brighter. The output
   is then no longer the scanner's quantity (CR and DX images rarely have one); ``invert_monochrome1=False``
   keeps it.

Colour (RGB, palette indices) and float data pass through as float32, without LUT, inversion or padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from gateway.assemble.model import Plane

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class ModalityLUT:
    """A Modality LUT Sequence item (PS3.3 C.11.1.1): stored value ``first_mapped + i`` maps to ``data[i]``."""

    first_mapped: int
    data: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data must hold at least one LUT entry")


@dataclass(frozen=True)
class ModalityTransform:
    """What turns one image's stored values into modality values (Image Pixel and Modality LUT modules).

    Parameters
    ----------
    photometric_interpretation
        PhotometricInterpretation; only MONOCHROME1/2 data get the LUT, inversion and padding.
    bits_stored
        BitsStored: the range of the stored values (and of the padding values).
    pixel_representation
        PixelRepresentation: 0 unsigned, 1 two's complement.
    rescale_slope, rescale_intercept
        RescaleSlope and RescaleIntercept.
    pixel_padding_value, pixel_padding_range_limit
        PixelPaddingValue and PixelPaddingRangeLimit, as stored values.
    modality_lut
        The Modality LUT Sequence's table, used instead of the rescale when present.
    """

    photometric_interpretation: str = "MONOCHROME2"
    bits_stored: int = 16
    pixel_representation: int = 0
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    pixel_padding_value: int | None = None
    pixel_padding_range_limit: int | None = None
    modality_lut: ModalityLUT | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.bits_stored <= 64:
            raise ValueError(f"bits_stored must be 1..64, got {self.bits_stored}")
        if self.pixel_representation not in (0, 1):
            raise ValueError(f"pixel_representation must be 0 or 1, got {self.pixel_representation}")
        if self.pixel_padding_range_limit is not None and self.pixel_padding_value is None:
            raise ValueError("pixel_padding_range_limit needs pixel_padding_value")

    @property
    def is_monochrome(self) -> bool:
        """Whether the data are grayscale (MONOCHROME1 or MONOCHROME2)."""
        return self.photometric_interpretation in _MONOCHROME

    @property
    def stored_range(self) -> tuple[int, int]:
        """The smallest and largest value Bits Stored and Pixel Representation allow."""
        if self.pixel_representation:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1

    @classmethod
    def from_dataset(cls, ds: Dataset, frame: int = 1) -> ModalityTransform:
        """Read the transform of frame ``frame`` (1-based) of an instance's data set (pixel data not needed).

        Rescale values are taken from the frame's Per-Frame Functional Groups, else the Shared Functional
        Groups (Pixel Value Transformation Sequence), else the top level; absent ones mean identity.
        """
        if frame < 1:
            raise ValueError(f"frame is 1-based, got {frame}")
        bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
        signed = int(ds.get("PixelRepresentation") or 0)
        slope, intercept = _rescale(ds, frame)
        padding = _stored_or_none(ds.get("PixelPaddingValue"), bits_stored, signed)
        limit = _stored_or_none(ds.get("PixelPaddingRangeLimit"), bits_stored, signed)
        return cls(
            photometric_interpretation=str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip(),
            bits_stored=bits_stored,
            pixel_representation=signed,
            rescale_slope=slope,
            rescale_intercept=intercept,
            pixel_padding_value=padding,
            pixel_padding_range_limit=None if padding is None else limit,
            modality_lut=_lut(ds, signed),
        )

    def for_plane(self, plane: Plane) -> ModalityTransform:
        """Return this transform with the rescale values of ``plane`` (per-frame values of multi-frame images)."""
        return replace(self, rescale_slope=plane.rescale_slope, rescale_intercept=plane.rescale_intercept)


def _as_stored(value: int, bits_stored: int, signed: int) -> int:
    """Read ``value`` as pydicom reads pixels: the low Bits Stored bits, two's complement when signed."""
    value &= (1 << bits_stored) - 1
    if signed and value >= 1 << (bits_stored - 1):
        value -= 1 << bits_stored
    return value


def _stored_or_none(value: Any, bits_stored: int, signed: int) -> int | None:
    return None if value is None else _as_stored(int(value), bits_stored, signed)


def _rescale_item(item: Dataset) -> tuple[float, float] | None:
    if "RescaleSlope" not in item and "RescaleIntercept" not in item:
        return None
    return float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0))


def _functional_group(ds: Dataset, keyword: str, index: int) -> tuple[float, float] | None:
    groups = ds.get(keyword)
    if not groups or index >= len(groups):
        return None
    transformation = groups[index].get("PixelValueTransformationSequence")
    return _rescale_item(transformation[0]) if transformation else None


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    found = (
        _functional_group(ds, "PerFrameFunctionalGroupsSequence", frame - 1)
        or _functional_group(ds, "SharedFunctionalGroupsSequence", 0)
        or _rescale_item(ds)
    )
    return found or (1.0, 0.0)


def _lut(ds: Dataset, signed: int) -> ModalityLUT | None:
    sequence = ds.get("ModalityLUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    first_mapped = _as_stored(int(item.LUTDescriptor[1]), 16, signed)  # US or SS, as Pixel Representation says
    data: Any = item.LUTData
    values = [data] if isinstance(data, int) else list(data)
    return ModalityLUT(first_mapped=first_mapped, data=tuple(int(v) for v in values))


def padding_mask(stored: npt.NDArray[Any], transform: ModalityTransform) -> npt.NDArray[np.bool_] | None:
    """Return where ``stored`` holds Pixel Padding, or ``None`` when the image declares none (or is colour).

    Parameters
    ----------
    stored
        Stored values of one or more frames, as decoded.
    transform
        The image's transform (its padding values are stored values).
    """
    value = transform.pixel_padding_value
    if value is None or not transform.is_monochrome or stored.dtype.kind not in "iu":
        return None
    limit = value if transform.pixel_padding_range_limit is None else transform.pixel_padding_range_limit
    low, high = min(value, limit), max(value, limit)
    mask: npt.NDArray[np.bool_] = (stored >= low) & (stored <= high)
    return mask


def _work_dtype(stored: npt.NDArray[Any]) -> type[np.floating[Any]]:
    """float32 holds every integer up to 24 bits exactly; wider data are computed in float64 then rounded."""
    return np.float32 if stored.dtype.itemsize <= 2 else np.float64


def _output_range(transform: ModalityTransform) -> tuple[float, float]:
    """The smallest and largest modality value the transform can produce from the Bits Stored range."""
    if transform.modality_lut is not None:
        return float(min(transform.modality_lut.data)), float(max(transform.modality_lut.data))
    ends = [transform.rescale_slope * end + transform.rescale_intercept for end in transform.stored_range]
    return min(ends), max(ends)


def _apply_lut(values: npt.NDArray[np.floating[Any]], lut: ModalityLUT) -> npt.NDArray[np.floating[Any]]:
    table = np.asarray(lut.data, dtype=values.dtype)
    index = np.clip(values - lut.first_mapped, 0, len(table) - 1).astype(np.intp)
    result: npt.NDArray[np.floating[Any]] = table[index]
    return result


def modality_values(
    stored: npt.NDArray[Any],
    transform: ModalityTransform,
    plane: Plane | None = None,
    *,
    invert_monochrome1: bool = True,
    out: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_] | None]:
    """Turn stored values into modality values (float32) and a padding mask.

    Parameters
    ----------
    stored
        Stored values of one frame (or a stack of frames sharing one transform), as
        :func:`~gateway.assemble.decode.decode_frame` returns them.
    transform
        The image's transform, from :meth:`ModalityTransform.from_dataset`.
    plane
        When given, its ``rescale_slope`` and ``rescale_intercept`` replace the transform's: the per-frame
        values of a multi-frame image. A Modality LUT Sequence still takes precedence.
    invert_monochrome1
        Mirror MONOCHROME1 values within the transform's output range, so that higher is brighter.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray | None]
        The modality values (same shape, float32) and the Pixel Padding mask, ``None`` when the image declares
        no padding. Padding voxels keep their transformed value; use the mask to recognise them.
    """
    if plane is not None:
        transform = transform.for_plane(plane)
    mask = padding_mask(stored, transform)
    if not transform.is_monochrome or stored.dtype.kind not in "iu":
        return stored.astype(np.float32), mask
    slope, intercept = transform.rescale_slope, transform.rescale_intercept
    if out is not None and _work_dtype(stored) is np.float32 and transform.modality_lut is None and slope == 1.0:
        np.add(stored, np.float32(intercept), out=out, dtype=np.float32)  # the common CT case, in one pass
        values: npt.NDArray[Any] = out
        slope, intercept = 1.0, 0.0
    elif out is not None and _work_dtype(stored) is np.float32:
        np.copyto(out, stored, casting="unsafe")
        values = out
    else:
        values = stored.astype(_work_dtype(stored))
    if transform.modality_lut is not None:
        values = _apply_lut(values, transform.modality_lut)
    elif (slope, intercept) != (1.0, 0.0):
        values *= slope
        values += intercept
    if invert_monochrome1 and transform.photometric_interpretation == "MONOCHROME1":
        low, high = _output_range(transform)
        np.subtract(low + high, values, out=values)
    return values.astype(np.float32, copy=False), mask
