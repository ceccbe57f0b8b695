"""From a volume to a model's input, and from the model's output back to the volume's grid.

:func:`prepare` applies a manifest's ``preprocess`` section (:class:`gateway.registry.manifest.Preprocess`) in
this order: channels (a diffusion series' b-values, averaged over directions), orientation (flips and
transposes only, chosen from the affine), resampling to ``spacing_mm`` (trilinear), intensity (window, z-score)
and a centre crop or pad to ``spatial_size``. Every spatial step is an index map, recorded on the returned
:class:`Prepared`, so :func:`restore` inverts them exactly: undo the crop/pad, resample back to the oriented
source shape, undo the orientation. When preprocessing changes no geometry, restoring is the identity.

Resampling keeps the volume's extent (voxel edges, like ``align_corners=False``): ``n`` voxels of the new size
``N * spacing / n`` cover the same millimetres as the source's ``N`` voxels, with ``n`` the nearest integer that
gives the requested spacing. Each resampling, reorientation, crop or pad is recorded as a note, never silent.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from gateway.assemble.model import Volume, diffusion_groups
from gateway.errors import InferenceError
from gateway.registry.manifest import Intensity, Manifest

__all__ = ["Prepared", "axis_codes", "model_pad_value", "prepare", "restore", "restore_channel", "restore_mask"]

Array = npt.NDArray[np.float32]
Shape = tuple[int, int, int]
Mode = Literal["linear", "nearest"]
Mask = npt.NDArray[np.bool_]
_T = TypeVar("_T", bound=np.generic)

_POSITIVE = "LPS"  # LPS: +x is Left, +y Posterior, +z Superior
_NEGATIVE = "RAI"
_AXIS = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}


@dataclass(frozen=True, eq=False)
class Prepared:
    """A model's input and the record of how it was made, for :func:`restore`.

    Attributes
    ----------
    array
        float32 ``[channels, slice, row, column]`` on the model grid.
    b_values
        float32 ``[channels]``, s/mm2, for a diffusion model; else ``None``.
    source_shape
        The volume's spatial shape ``(S, R, C)``.
    axes, flips
        Orientation: model-grid axis ``j`` is source axis ``axes[j]``, reversed when ``flips[j]``.
    oriented_shape
        The spatial shape after orientation, before resampling.
    resampled_shape
        The spatial shape after resampling (``oriented_shape`` when nothing was resampled).
    offset
        Centre crop/pad: model-grid index ``m`` is resampled index ``m + offset`` (negative where padded).
    affine
        The model grid's affine: ``affine @ [slice, row, column, 1]`` is the voxel's LPS position in mm.
    scale, shift
        The intensity step as ``x * scale + shift`` (before clipping; a z-score over non-zero voxels leaves
        zeros at zero).
    notes
        What changed the geometry or the channels, in words.
    """

    array: Array
    b_values: Array | None
    source_shape: Shape
    axes: Shape
    flips: tuple[bool, bool, bool]
    oriented_shape: Shape
    resampled_shape: Shape
    offset: Shape
    affine: npt.NDArray[np.float64]
    scale: float = 1.0
    shift: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def model_shape(self) -> Shape:
        """The spatial shape the model sees."""
        s, r, c = self.array.shape[1:]
        return (s, r, c)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size of the model grid, mm, along (slice, row, column)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))


# -- orientation -------------------------------------------------------------------------------------------------


def _patient_axes(affine: npt.NDArray[np.float64]) -> Shape:
    """For each array axis, the patient axis (0=x, 1=y, 2=z) it runs along most: the permutation that best fits."""
    cosines = np.abs(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))
    best = max(itertools.permutations(range(3)), key=lambda p: sum(cosines[p[i], i] for i in range(3)))
    return (best[0], best[1], best[2])


def axis_codes(affine: npt.NDArray[np.float64]) -> str:
    """The orientation codes of an affine's index axes (``IPL`` for a head-first supine axial CT as scanned).

    Parameters
    ----------
    affine
        A volume's 4x4 affine (index ``[slice, row, column]`` to LPS).
    """
    axes = _patient_axes(affine)
    return "".join(_POSITIVE[k] if affine[k, i] > 0 else _NEGATIVE[k] for i, k in enumerate(axes))


def _orientation(affine: npt.NDArray[np.float64], target: str | None) -> tuple[Shape, tuple[bool, bool, bool]]:
    """Source axis and flip for each target axis."""
    if target is None:
        return (0, 1, 2), (False, False, False)
    source = axis_codes(affine)
    by_patient = {_AXIS[code]: i for i, code in enumerate(source)}
    axes = tuple(by_patient[_AXIS[code]] for code in target)
    flips = tuple(source[axes[j]] != target[j] for j in range(3))
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def _orient(array: Array, axes: Shape, flips: tuple[bool, bool, bool]) -> Array:
    """A view of a 3D array in the target orientation."""
    view = array.transpose(axes)
    for j, flip in enumerate(flips):
        if flip:
            view = np.flip(view, axis=j)
    return view


def _unorient(array: npt.NDArray[_T], axes: Shape, flips: tuple[bool, bool, bool]) -> npt.NDArray[_T]:
    """A view of a target-oriented 3D array back in the source orientation."""
    for j, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis=j)
    return array.transpose(np.argsort(axes))


def _orient_map(shape: Shape, axes: Shape, flips: tuple[bool, bool, bool]) -> npt.NDArray[np.float64]:
    """Index map oriented -> source (4x4), for the affine. ``shape`` is the source shape."""
    matrix = np.zeros((4, 4))
    matrix[3, 3] = 1.0
    for j, (i, flip) in enumerate(zip(axes, flips, strict=True)):
        matrix[i, j] = -1.0 if flip else 1.0
        matrix[i, 3] = shape[i] - 1 if flip else 0.0
    return matrix


# -- resampling --------------------------------------------------------------------------------------------------


def _target_shape(shape: Shape, spacing: tuple[float, float, float], manifest: Manifest) -> Shape:
    wanted = manifest.preprocess.spacing_mm
    if wanted is None:
        return shape
    sizes = [n if w is None else max(1, round(n * s / w)) for n, s, w in zip(shape, spacing, wanted, strict=True)]
    return (sizes[0], sizes[1], sizes[2])


def _resize(array: npt.NDArray[Any], shape: Shape, mode: Mode) -> Array:
    """Resample a 3D array to ``shape``, keeping its extent: trilinear or nearest, as PyTorch's ``interpolate``
    computes them (``trilinear`` with ``align_corners=False``, ``nearest-exact``).

    Where torch is already loaded (a torch model, or MONAI's sliding window, brought it in), its interpolation is
    used: it runs on every core, 2-3x the single-threaded numpy of :func:`_resize_numpy`, which gives the same
    values up to float rounding and keeps a job of ONNX models without patches free of torch.
    """
    if array.shape == shape:
        return np.asarray(array, dtype=np.float32)
    if "torch" in sys.modules:
        return _resize_torch(array, shape, mode)
    return _resize_numpy(array, shape, mode)


def _resize_torch(array: npt.NDArray[Any], shape: Shape, mode: Mode) -> Array:
    """:func:`_resize` by ``torch.nn.functional.interpolate``."""
    import torch
    import torch.nn.functional as F

    if mode == "linear" and array.shape[0] == shape[0]:
        # the slices stay (resampled in plane only): bilinear over each slice gives trilinear's values (the slice
        # axis' weights are 0) up to rounding, in half the time
        return _gathered(_bilinear_slabs(array, shape), shape)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    with torch.inference_mode():
        if mode == "linear":
            out = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
        else:
            out = F.interpolate(tensor, size=shape, mode="nearest-exact")
    resized: Array = out[0, 0].numpy()
    return resized


def _resize_numpy(array: npt.NDArray[Any], shape: Shape, mode: Mode) -> Array:
    """:func:`_resize` in numpy.

    Trilinear interpolation is separable: one linear pass per axis gives the same values (up to float rounding).
    The output is made ``_SLAB`` slices at a time, so the temporaries stay a few slices large.
    """
    return _gathered(_numpy_slabs(array, shape, mode), shape)


def _gathered(slabs: Iterator[tuple[int, Array]], shape: Shape) -> Array:
    """The whole array made of ``(first slice, slab)`` parts."""
    out = np.empty(shape, dtype=np.float32)
    for start, slab in slabs:
        out[start : start + len(slab)] = slab
    return out


def _numpy_slabs(array: npt.NDArray[Any], shape: Shape, mode: Mode) -> Iterator[tuple[int, Array]]:
    """:func:`_resize_numpy`'s output, ``_SLAB`` slices at a time: (first slice, slab)."""
    taps = [_taps(n, m, mode) for n, m in zip(array.shape, shape, strict=True)]
    for start in range(0, shape[0], _SLAB):
        stop = min(start + _SLAB, shape[0])
        yield start, _in_plane(_along(array, taps[0], slice(start, stop), 0), taps[1], taps[2])


def _linear_slabs(array: npt.NDArray[Any], shape: Shape) -> Iterator[tuple[int, Array]]:
    """``_resize(array, shape, "linear")`` a few slices at a time: (first slice, slab), the same values.

    Each slab is made while the previous one is still in cache: bilinear over a few slices where torch is loaded
    and the slices stay (the same arithmetic as over all of them), the numpy slabs otherwise; a resize that
    resamples the slices in torch is made whole and handed out in slabs.
    """
    if array.shape == shape or ("torch" in sys.modules and array.shape[0] != shape[0]):
        whole = _resize(array, shape, "linear")
        for start in range(0, shape[0], _SLAB):
            yield start, whole[start : start + _SLAB]
    elif "torch" in sys.modules:
        yield from _bilinear_slabs(array, shape)
    else:
        yield from _numpy_slabs(array, shape, "linear")


def _bilinear_slabs(array: npt.NDArray[Any], shape: Shape) -> Iterator[tuple[int, Array]]:
    import torch
    import torch.nn.functional as F

    planes = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[:, None]
    with torch.inference_mode():
        for start in range(0, shape[0], _SLAB):
            part = planes[start : start + _SLAB]
            slab: Array = F.interpolate(part, size=shape[1:], mode="bilinear", align_corners=False)[:, 0].numpy()
            yield start, slab


#: Output slices resampled together: temporaries of a few slices, numpy calls large enough to be efficient.
_SLAB = 8

#: Where each output index reads: (first source index, second source index, weight of the second), float32.
_Taps = tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float32]]


def _taps(size: int, new: int, mode: Mode) -> _Taps:
    """Source indices and weights of an extent-preserving resize of one axis from ``size`` to ``new`` points.

    PyTorch's rules, in its arithmetic (ATen's ``UpSample.h``): the scale is ``float32(size / new)``; the source
    coordinate is computed in double and rounded to float32; ``linear`` reads the source at
    ``max(0, scale * (i + 0.5) - 0.5)`` between its two neighbours (the last one repeated at the edge),
    ``nearest`` takes index ``min(floor((i + 0.5) * scale), size - 1)`` (``nearest-exact``).
    """
    scale = np.float64(np.float32(size) / np.float32(new))
    index = np.arange(new)
    if mode == "nearest":
        position = ((index + 0.5) * scale).astype(np.float32)
        nearest = np.minimum(np.floor(position).astype(np.intp), size - 1)
        return nearest, nearest, np.zeros(new, dtype=np.float32)
    source = np.maximum(((index + 0.5) * scale - 0.5).astype(np.float32), np.float32(0))
    first = source.astype(np.intp)
    second = np.minimum(first + 1, size - 1)
    return first, second, (source - first.astype(np.float32)).astype(np.float32)


def _along(array: npt.NDArray[Any], taps: _Taps, part: slice, axis: int) -> Array:
    """``array`` resampled along ``axis``, output indices ``part`` only."""
    first, second, weight = taps[0][part], taps[1][part], taps[2][part]
    shape = [1] * array.ndim
    shape[axis] = len(weight)
    low: Array = np.take(array, first, axis=axis, mode="clip").astype(np.float32, copy=False)
    if not weight.any():
        return low
    high: Array = np.take(array, second, axis=axis, mode="clip").astype(np.float32, copy=False)
    high -= low  # low + (high - low) * w, in place: torch's (1 - w) * low + w * high up to rounding
    high *= weight.reshape(shape)
    high += low
    return high


def _in_plane(slab: Array, rows: _Taps, columns: _Taps) -> Array:
    """A slab ``[slice, row, column]`` resampled along rows and columns, the cheaper axis first."""
    everything = slice(None)
    if len(rows[0]) * slab.shape[2] <= slab.shape[1] * len(columns[0]):
        return _along(_along(slab, rows, everything, 1), columns, everything, 2)
    return _along(_along(slab, columns, everything, 2), rows, everything, 1)


def _resample_map(old: Shape, new: Shape) -> npt.NDArray[np.float64]:
    """Index map resampled -> oriented (4x4): voxel centres of an extent-preserving resize."""
    factors = np.array(old, dtype=np.float64) / np.array(new, dtype=np.float64)
    matrix = np.diag([*factors, 1.0])
    matrix[:3, 3] = 0.5 * factors - 0.5
    return matrix


# -- intensity ---------------------------------------------------------------------------------------------------


def _intensity_map(channels: list[Array], intensity: Intensity) -> tuple[float, float]:
    """``(scale, shift)`` of the intensity step, statistics taken over all channels together."""
    if intensity.mode == "window":
        assert intensity.window is not None  # checked by the manifest
        low, high = intensity.window
        return 1.0 / (high - low), -low / (high - low)
    if intensity.mode == "zscore":
        count, total, squares = 0, 0.0, 0.0
        for block in _blocks(channels):  # a few slices at a time: float64 temporaries stay small
            values = block[block != 0] if intensity.nonzero else block
            count += values.size
            total += float(values.sum(dtype=np.float64))
            squares += float(np.square(values, dtype=np.float64).sum())
        mean = total / count if count else 0.0
        std = float(np.sqrt(max(squares / count - mean * mean, 0.0))) if count else 0.0
        return (1.0 / std, -mean / std) if std > 0 else (1.0, -mean)
    return 1.0, 0.0


def _blocks(channels: list[Array], slices: int = 16) -> Iterator[Array]:
    for channel in channels:
        for start in range(0, channel.shape[0], slices):
            yield channel[start : start + slices]


def _apply_intensity(values: Array, out: Array, scale: float, shift: float, intensity: Intensity) -> None:
    """Write the intensity-mapped ``values`` into ``out`` (same shape)."""
    np.multiply(values, np.float32(scale), out=out)
    out += np.float32(shift)
    if intensity.mode == "window" and intensity.clip:
        np.clip(out, 0.0, 1.0, out=out)
    if intensity.mode == "zscore" and intensity.nonzero:
        out[values == 0] = 0.0


def model_pad_value(prepared: Prepared, manifest: Manifest) -> float:
    """``preprocess.pad_value`` as the model sees it (after the intensity step): what padding must be filled with,
    by crop/pad here and by the sliding window for an image smaller than a patch."""
    return _pad_value(manifest.preprocess.pad_value, prepared.scale, prepared.shift, manifest.preprocess.intensity)


def _pad_value(value: float, scale: float, shift: float, intensity: Intensity) -> float:
    if intensity.mode == "zscore" and intensity.nonzero and value == 0:
        return 0.0
    mapped = value * scale + shift
    return min(max(mapped, 0.0), 1.0) if intensity.mode == "window" and intensity.clip else mapped


# -- crop / pad --------------------------------------------------------------------------------------------------


def _offsets(shape: Shape, manifest: Manifest) -> tuple[Shape, Shape]:
    """The model shape and the offset of its first voxel in the resampled grid (negative: padding)."""
    wanted = manifest.preprocess.spatial_size or (None, None, None)
    size = [n if w is None else w for n, w in zip(shape, wanted, strict=True)]
    offset = [(n - m) // 2 if n >= m else -((m - n + 1) // 2) for n, m in zip(shape, size, strict=True)]
    return (size[0], size[1], size[2]), (offset[0], offset[1], offset[2])


def _overlap(offset: Shape, model: Shape, resampled: Shape) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The slices of the model grid and of the resampled grid that hold the same voxels."""
    inner, outer = [], []
    for o, m, n in zip(offset, model, resampled, strict=True):
        start, stop = max(0, o), min(n, o + m)
        inner.append(slice(start - o, stop - o))
        outer.append(slice(start, stop))
    return tuple(inner), tuple(outer)


# -- channels ----------------------------------------------------------------------------------------------------


def _diffusion_channels(volume: Volume) -> tuple[list[npt.NDArray[np.float32]], Array, str]:
    """One channel per distinct b-value (ascending), each the mean over its directions."""
    if volume.array.ndim != 4 or not volume.dimension_4:
        raise InferenceError("the model needs a 4D diffusion volume; this volume is 3D")
    groups = diffusion_groups(volume)
    if not groups:
        varying = ", ".join(sorted({str(kind) for kind, _ in volume.dimension_4}))
        raise InferenceError(f"the model needs a diffusion volume; this one varies by {varying}")
    b_values = np.array(sorted(groups), dtype=np.float32)
    channels = [volume.array[groups[b]].mean(axis=0, dtype=np.float32) for b in sorted(groups)]
    listed = ", ".join(f"{b:g}" for b in b_values)
    return channels, b_values, f"diffusion: {len(channels)} b-values ({listed} s/mm2), each averaged over directions"


def _channels(volume: Volume, manifest: Manifest) -> tuple[list[Any], Array | None, list[str]]:
    if manifest.select.diffusion:
        channels, b_values, note = _diffusion_channels(volume)
        return channels, b_values, [note]
    wanted = manifest.inference.input_channels
    got = 1 if volume.array.ndim == 3 else volume.array.shape[0]
    if got != wanted:
        raise InferenceError(f"the model takes {wanted} input channel(s); the volume gives {got}")
    return ([volume.array] if volume.array.ndim == 3 else list(volume.array)), None, []


# -- prepare / restore -------------------------------------------------------------------------------------------


def _mm(values: tuple[float, ...]) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def _shape3(shape: tuple[int, ...]) -> Shape:
    return (shape[0], shape[1], shape[2])


def prepare(volume: Volume, manifest: Manifest) -> Prepared:
    """Turn ``volume`` into the model's input as ``manifest.preprocess`` says.

    Parameters
    ----------
    volume
        An assembled volume (3D, or 4D for a diffusion model or a multi-channel one).
    manifest
        The model's manifest.

    Returns
    -------
    Prepared
        The input ``[channels, slice, row, column]`` float32 and everything :func:`restore` needs.

    Raises
    ------
    InferenceError
        If the volume does not give the channels the model takes (a 3D volume for a diffusion model, a channel
        count other than ``inference.input_channels``).
    """
    pre = manifest.preprocess
    channels, b_values, notes = _channels(volume, manifest)
    source = _shape3(volume.array.shape[-3:])
    axes, flips = _orientation(volume.affine, pre.orientation)
    oriented = _shape3(tuple(source[i] for i in axes))
    affine = volume.affine @ _orient_map(source, axes, flips)
    if axes != (0, 1, 2) or any(flips):
        notes.append(f"reoriented from {axis_codes(volume.affine)} to {pre.orientation} (flips and transposes)")
    views = [_orient(channel, axes, flips) for channel in channels]
    resampled = _target_shape(oriented, _spacing(affine), manifest)
    if resampled != oriented:
        before = _spacing(affine)
        views = [_resize(view, resampled, "linear") for view in views]
        affine = affine @ _resample_map(oriented, resampled)
        notes.append(f"resampled from {_mm(before)} to {_mm(_spacing(affine))} mm for the model")
    model, offset = _offsets(resampled, manifest)
    if model != resampled:
        notes.append(f"centre-cropped/padded from {_mm(resampled)} to {_mm(model)} voxels")
    scale, shift = _intensity_map(views, pre.intensity)
    array = _assemble(views, model, offset, resampled, (scale, shift), manifest)
    affine = affine @ _translation(offset)
    return Prepared(
        array, b_values, source, axes, flips, oriented, resampled, offset, affine, scale, shift, tuple(notes)
    )


def _spacing(affine: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def _translation(offset: Shape) -> npt.NDArray[np.float64]:
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return matrix


def _assemble(
    views: list[Any], model: Shape, offset: Shape, resampled: Shape, linear: tuple[float, float], manifest: Manifest
) -> Array:
    """The model input: the intensity-mapped views, cropped or padded into ``[channels, *model]``."""
    pre = manifest.preprocess
    scale, shift = linear
    array = np.full((len(views), *model), _pad_value(pre.pad_value, scale, shift, pre.intensity), dtype=np.float32)
    inner, outer = _overlap(offset, model, resampled)
    for index, view in enumerate(views):
        _apply_intensity(view[outer], array[index][inner], scale, shift, pre.intensity)
    return array


def restore_channel(channel: npt.NDArray[Any], prepared: Prepared, *, mode: Mode = "linear") -> Array:
    """Map one model-grid channel ``[s, r, c]`` back to the source grid ``[S, R, C]``.

    Voxels of the source that the model did not see (cropped away) get 0.

    Parameters
    ----------
    channel
        One channel of the model's output, on the model grid.
    prepared
        The record :func:`prepare` returned for the input.
    mode
        ``linear`` for probabilities and maps, ``nearest`` for label values.
    """
    grid = _resize(_uncropped(channel, prepared), prepared.oriented_shape, mode)
    return np.ascontiguousarray(_unorient(grid, prepared.axes, prepared.flips))


def restore_mask(channel: npt.NDArray[Any], prepared: Prepared, threshold: float) -> tuple[Mask, float]:
    """Where one model-grid probability channel, restored to the source grid, reaches ``threshold``, and its
    highest restored value.

    The same mask and maximum as ``restore_channel(channel, prepared) >= threshold`` and its ``max()``, made a few
    slices at a time while each slab is in cache, without the full-size float32 channel (300 MB for a
    512 x 512 x 300 CT) or a second pass over it.

    Parameters
    ----------
    channel
        One channel of the model's output (probabilities), on the model grid.
    prepared
        The record :func:`prepare` returned for the input.
    threshold
        Voxels at or above it are in the mask.
    """
    mask = np.empty(prepared.oriented_shape, dtype=np.bool_)
    highest = -np.inf
    for start, slab in _linear_slabs(_uncropped(channel, prepared), prepared.oriented_shape):
        np.greater_equal(slab, threshold, out=mask[start : start + len(slab)])
        highest = max(highest, float(slab.max()))
    return np.ascontiguousarray(_unorient(mask, prepared.axes, prepared.flips)), highest


def _uncropped(channel: npt.NDArray[Any], prepared: Prepared) -> npt.NDArray[Any]:
    """One model-grid channel on the resampled grid: the crop/pad undone (0 where the model saw nothing)."""
    if tuple(channel.shape) != prepared.model_shape:
        raise InferenceError(f"model output is {channel.shape} voxels; its input was {prepared.model_shape}")
    if prepared.model_shape != prepared.resampled_shape or any(prepared.offset):
        grid = np.zeros(prepared.resampled_shape, dtype=np.float32)
        inner, outer = _overlap(prepared.offset, prepared.model_shape, prepared.resampled_shape)
        grid[outer] = channel[inner]
        return grid
    return channel


def restore(output: npt.NDArray[Any], prepared: Prepared, *, mode: Mode = "linear") -> Array:
    """Map a model-grid output ``[C, s, r, c]`` back to the source grid ``[C, S, R, Col]``, channel by channel.

    The inverse of :func:`prepare`'s spatial steps: undo the crop/pad, resample back (``mode`` ``linear`` for
    probabilities and maps, ``nearest`` for label values), undo the orientation. The identity when preprocessing
    changed no geometry.
    """
    result = np.empty((output.shape[0], *prepared.source_shape), dtype=np.float32)
    for index, channel in enumerate(_iter_channels(output)):
        result[index] = restore_channel(channel, prepared, mode=mode)
    return result


def _iter_channels(output: npt.NDArray[Any]) -> Iterator[npt.NDArray[Any]]:
    if output.ndim != 4:
        raise InferenceError(f"model output must be [channels, slice, row, column], got {output.ndim} dimensions")
    yield from output
