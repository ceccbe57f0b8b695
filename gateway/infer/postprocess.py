"""From a model's raw output on the model grid to label maps, masks and parametric maps on the source grid.

The manifest's ``outputs`` say what the channels mean (:class:`gateway.registry.manifest.Segmentation`,
:class:`~gateway.registry.manifest.ParametricMap`). The activation runs on the model grid; each channel is then
restored to the source grid on its own (:func:`gateway.infer.preprocess.restore_channel`), so at most a few
full-resolution arrays exist at once: a ``labelmap`` is a running argmax over restored probabilities, ``channels``
masks are thresholded one by one, a single integer channel (activation ``none``) is rounded on the model grid
and restored by nearest neighbour. A channel thresholded without its probabilities kept (below) is restored and
thresholded a few slices at a time (:func:`gateway.infer.preprocess.restore_mask`), never whole in float32.

For a segment declared ``lesions: true`` the voxel probability of its label is kept on the source grid as well
(each lesion reports its highest): the running argmax's winning probability for a ``labelmap``, the thresholded
channel itself for one sigmoid channel, the label's own channel for ``channels``; label values (activation
``none``) have none. Nothing is kept when no segment declares lesions, and the runtime drops these arrays once the
lesions are measured (a 512 x 512 x 300 float32 array is 300 MB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import InferenceError
from gateway.infer.preprocess import Prepared, restore_channel, restore_mask
from gateway.registry.manifest import Manifest, Segmentation

__all__ = ["Decoded", "check_output", "decode", "expected_channels"]

Array = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class Decoded:
    """The meaning of a model's output on the source grid (see :class:`gateway.infer.results.ModelResult`).

    ``lesion_probabilities`` maps each label declared ``lesions: true`` to its voxel probability ``[S, R, C]``
    (where the model gives one): only valid inside that label's mask, and for the runtime to drop once measured.
    """

    labelmap: npt.NDArray[np.unsignedinteger[Any]] | None = None
    masks: dict[int, Mask] = field(default_factory=dict)
    maps: dict[str, Array] = field(default_factory=dict)
    probabilities: dict[int, float] = field(default_factory=dict)
    lesion_probabilities: dict[int, Array] = field(default_factory=dict)


def _single_channel_ok(segmentation: Segmentation) -> bool:
    """Whether one output channel can carry this labelmap: label values (``none``) or a foreground probability."""
    if segmentation.kind != "labelmap":
        return False
    values = [label.value for label in segmentation.labels]
    return segmentation.activation == "none" or (segmentation.activation == "sigmoid" and values == [1])


def expected_channels(manifest: Manifest) -> int:
    """The fewest output channels the manifest's outputs can be read from.

    A segmentation needs a channel per label value up to the highest (channel 0 is the background of a
    ``labelmap``), except a ``labelmap`` read from one channel (activation ``none``: label values; ``sigmoid``
    with the single label 1: its probability); parametric maps need their highest channel.
    """
    outputs = manifest.outputs
    if outputs.segmentation is not None:
        if _single_channel_ok(outputs.segmentation):
            return 1
        return max(label.value for label in outputs.segmentation.labels) + 1
    return max(item.channel for item in outputs.parametric_maps) + 1


def check_output(output: npt.NDArray[Any], manifest: Manifest, prepared: Prepared) -> None:
    """Refuse an output that cannot be read: wrong shape or channel count, NaN or infinite values.

    Raises
    ------
    InferenceError
        Saying which.
    """
    expected = (prepared.model_shape, expected_channels(manifest))
    if output.ndim != 4 or tuple(output.shape[1:]) != expected[0]:
        raise InferenceError(f"model output has shape {output.shape}; expected [channels, {expected[0]}]")
    segmentation = manifest.outputs.segmentation
    if output.shape[0] < expected[1]:
        raise InferenceError(
            f"model output has {output.shape[0]} channel(s); the manifest's outputs need {expected[1]}"
        )
    if segmentation is not None and segmentation.activation == "softmax" and output.shape[0] < 2:
        raise InferenceError("softmax over a single output channel is always 1; the model needs 2 or more channels")
    if not _finite(output):
        raise InferenceError("model output contains NaN or infinite values")


def _finite(output: npt.NDArray[Any], slices: int = 8) -> bool:
    """Whether every value is finite, a few slices of a channel at a time (no full-size boolean temporary)."""
    return all(
        np.isfinite(channel[start : start + slices]).all()
        for channel in output
        for start in range(0, channel.shape[0], slices)
    )


def _activate(output: Array, activation: str) -> Array:
    """Apply the activation over the channel axis, in place (on a copy when the output is read-only).

    Softmax subtracts the channel maximum first (no overflow); sigmoid is SciPy's ``expit`` (loaded on the first
    sigmoid model), which saturates to 0 and 1 without overflow warnings.
    """
    if activation == "none":
        return output
    array = output if output.flags.writeable else output.copy()
    if activation == "softmax":
        array -= array.max(axis=0, keepdims=True)
        np.exp(array, out=array)
        array /= array.sum(axis=0, keepdims=True)
    else:
        from scipy.special import expit  # type: ignore[import-untyped]  # scipy ships no type hints

        expit(array, out=array)
    return array


def _lesion_labels(segmentation: Segmentation) -> list[int]:
    """The label values declared ``lesions: true``."""
    return [label.value for label in segmentation.labels if label.lesions]


def _label_dtype(segmentation: Segmentation) -> type[np.unsignedinteger[Any]]:
    return np.uint8 if max(label.value for label in segmentation.labels) <= 255 else np.uint16


def _rounded_labels(output: Array, prepared: Prepared, segmentation: Segmentation) -> Decoded:
    """One channel of label values: rounded on the model grid, restored by nearest neighbour."""
    values = restore_channel(np.rint(output[0]), prepared, mode="nearest")
    labelmap = _declared(values, segmentation)
    present = {v for v in np.unique(labelmap).tolist() if v}
    probabilities = {label.value: float(label.value in present) for label in segmentation.labels}
    return _with_masks(labelmap, segmentation, probabilities)


def _thresholded_labels(output: Array, prepared: Prepared, segmentation: Segmentation) -> Decoded:
    """One channel of foreground probability: label 1 where it reaches the threshold."""
    if not _lesion_labels(segmentation):  # thresholded slab by slab: no full-size float32 channel
        mask, highest = restore_mask(output[0], prepared, segmentation.threshold)
        return _with_masks(mask.view(np.uint8), segmentation, {1: highest})
    probability = restore_channel(output[0], prepared)
    labelmap = (probability >= segmentation.threshold).astype(np.uint8)
    kept = dict.fromkeys(_lesion_labels(segmentation), probability)
    return _with_masks(labelmap, segmentation, {1: float(probability.max())}, kept)


def _argmax_labels(output: Array, prepared: Prepared, segmentation: Segmentation) -> Decoded:
    """A running argmax over channels restored one at a time."""
    best = restore_channel(output[0], prepared)
    if np.shares_memory(best, output):  # restoring was the identity: keep the output as it was
        best = best.copy()
    labelmap = np.zeros(best.shape, dtype=_label_dtype(segmentation))
    declared = {label.value for label in segmentation.labels}
    probabilities: dict[int, float] = {}
    for channel in range(1, output.shape[0]):
        probability = restore_channel(output[channel], prepared)
        higher = probability > best
        labelmap[higher] = channel if channel in declared else 0
        np.maximum(best, probability, out=best)
        if channel in declared:
            probabilities[channel] = float(probability.max())
    # where a label won, the running maximum is that label's probability
    kept = dict.fromkeys(_lesion_labels(segmentation), best)
    return _with_masks(labelmap, segmentation, probabilities, kept)


def _declared(values: Array, segmentation: Segmentation) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Label values as integers; values that are no declared label become background."""
    declared = np.array(sorted(label.value for label in segmentation.labels))
    labelmap = np.where(np.isin(values, declared), values, 0)
    return labelmap.astype(_label_dtype(segmentation))


def _with_masks(
    labelmap: npt.NDArray[np.unsignedinteger[Any]],
    segmentation: Segmentation,
    probabilities: dict[int, float],
    lesion_probabilities: dict[int, Array] | None = None,
) -> Decoded:
    masks = {label.value: labelmap == label.value for label in segmentation.labels}
    return Decoded(labelmap, masks, probabilities=probabilities, lesion_probabilities=lesion_probabilities or {})


def _channel_masks(output: Array, prepared: Prepared, segmentation: Segmentation) -> Decoded:
    """One channel per label, each thresholded on its own (segments may overlap)."""
    masks: dict[int, Mask] = {}
    probabilities: dict[int, float] = {}
    kept: dict[int, Array] = {}
    for label in segmentation.labels:
        if not label.lesions:  # thresholded slab by slab: no full-size float32 channel
            masks[label.value], probabilities[label.value] = restore_mask(
                output[label.value], prepared, segmentation.threshold
            )
            continue
        probability = restore_channel(output[label.value], prepared)
        masks[label.value] = probability >= segmentation.threshold
        probabilities[label.value] = float(probability.max())
        # a copy where restoring was the identity, so the whole output is not kept alive
        kept[label.value] = probability.copy() if np.shares_memory(probability, output) else probability
    return Decoded(masks=masks, probabilities=probabilities, lesion_probabilities=kept)


def _segmentation(output: Array, prepared: Prepared, segmentation: Segmentation) -> Decoded:
    if segmentation.kind == "channels":
        return _channel_masks(_activate(output, segmentation.activation), prepared, segmentation)
    if output.shape[0] == 1 and segmentation.activation == "none":
        return _rounded_labels(output, prepared, segmentation)
    activated = _activate(output, segmentation.activation)
    if output.shape[0] == 1:
        return _thresholded_labels(activated, prepared, segmentation)
    return _argmax_labels(activated, prepared, segmentation)


def decode(output: Array, prepared: Prepared, manifest: Manifest) -> Decoded:
    """Read a checked model output (:func:`check_output`) ``[C, s, r, c]`` as the manifest's outputs say.

    Parameters
    ----------
    output
        The raw model output on the model grid (the activation may be applied in place).
    prepared
        How the input was made, for restoring to the source grid.
    manifest
        The model's manifest.

    Returns
    -------
    Decoded
        Label map (``labelmap`` kind), masks for every declared segment, parametric maps, per-label highest
        probabilities, and the voxel probabilities of the labels declared ``lesions: true``; all on the source
        grid.
    """
    segmentation = manifest.outputs.segmentation
    if segmentation is not None:
        return _segmentation(output, prepared, segmentation)
    maps = {item.name: restore_channel(output[item.channel], prepared) for item in manifest.outputs.parametric_maps}
    return Decoded(maps=maps)
