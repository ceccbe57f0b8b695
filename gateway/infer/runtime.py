"""The inference runtime: loaded models, their batchers, and one volume through a model end to end.

:class:`InferenceRuntime` keeps one backend and one :class:`~gateway.infer.batcher.Batcher` per model
(name, version, weights SHA-256, device), loaded on first use and shared by every caller, so concurrent jobs
share forward passes. Which models stay loaded (the active versions, within a memory budget, least recently used
unloaded first) and which are not loaded again (failed loads) is :mod:`gateway.infer.loaded_models`' business.
:meth:`InferenceRuntime.run` takes a volume through the whole pipeline::

    prepare (channels, orientation, spacing, intensity, crop/pad)
      -> forward: the whole input as one item, or sliding-window patches (MONAI) submitted to the batcher
      -> check (shape, channels, NaN) -> activation -> restore to the source grid, channel by channel
      -> label map / masks / parametric maps -> measurements, lesions -> classifications

A MONAI bundle whose manifest says ``inference.pipeline: bundle`` replaces the first three steps by the bundle's own
preprocessing, inferer (its patches still go through the batcher) and postprocessing, inverted to the source grid
(:mod:`gateway.infer.bundle_pipeline`); measurements, lesions and classifications follow as for any model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from gateway.assemble.model import Volume
from gateway.errors import InferenceError
from gateway.infer.backends import resolve_device
from gateway.infer.batcher import Batcher, BatcherStats
from gateway.infer.failures import weights_path
from gateway.infer.lesions import LesionSet, find_lesions
from gateway.infer.loaded_models import LoadedModel, LoadedModels, ModelVersionRef
from gateway.infer.measure import SegmentMeasurement, measure_segments, voxel_volume_ml
from gateway.infer.postprocess import Decoded, check_output, decode
from gateway.infer.preprocess import Prepared, model_pad_value, prepare
from gateway.infer.results import Finding, ModelResult
from gateway.metrics import GatewayMetrics
from gateway.registry.manifest import Manifest

__all__ = ["InferenceRuntime"]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
_Finish = Callable[[], tuple[Decoded, tuple[str, ...]]]  # reads a model's output once its lease is over


class _Run(Protocol):
    """A batcher's :meth:`~gateway.infer.batcher.Batcher.run`: items (and extra inputs) -> the model's output."""

    def __call__(self, batch: Array, extra: dict[str, Array] | None = None, /) -> Array: ...


class _Clock:
    """Named stage timings."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - began, 6)

    def timed(self, run: _Run) -> _Run:
        """``run`` (a batcher's), its seconds added up in ``forward_s``: the forward passes within ``infer_s``
        (queueing for the batcher included), apart from the gateway's own work around them (stitching patches,
        checking the output)."""

        def forward(batch: Array, extra: dict[str, Array] | None = None) -> Array:
            began = time.perf_counter()
            try:
                return run(batch, extra)
            finally:
                seconds = self.timings.get("forward_s", 0.0) + time.perf_counter() - began
                self.timings["forward_s"] = round(seconds, 6)

        return forward


class InferenceRuntime:
    """Loaded models on one device, each behind a batcher; thread-safe.

    Parameters
    ----------
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`gateway.infer.backends.resolve_device`).
    batching
        Whether forward passes take up to the model's ``batch_size`` inputs or patches, merged across concurrent
        callers (``False``: one at a time, every input or patch in a forward pass of its own).
    memory_budget_bytes
        The most the models loaded on one device may take together, least recently used idle ones unloaded first
        (``None``: no limit; versions no longer active are unloaded all the same, see :meth:`retain`).
    metrics
        Where each model's forward passes (batch size, seconds) are observed.

    Raises
    ------
    ModelError
        If ``device`` asks for CUDA that is not there.
    ValueError
        If ``memory_budget_bytes`` is not positive.
    """

    def __init__(
        self,
        device: str = "auto",
        batching: bool = True,
        memory_budget_bytes: int | None = None,
        *,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.batching = batching
        self.models = LoadedModels(self.device, batching, memory_budget_bytes, metrics=metrics)

    # -- models --------------------------------------------------------------------------------------------------

    def retain(self, active: Iterable[ModelVersionRef]) -> None:
        """Keep the ``active`` model versions (the registry's, read for the job) and unload every other one: at once
        when idle, else when the last volume running through it is done. See :meth:`LoadedModels.retain`."""
        self.models.retain(active)

    def loaded(self) -> list[LoadedModel]:
        """The model versions in memory: ``name@version``, device, bytes (and how measured), last used, in use."""
        return self.models.loaded()

    def failed_loads(self) -> dict[str, str]:
        """``name@version`` -> why it failed to load (not tried again until re-registered or re-enabled)."""
        return self.models.failed_loads()

    def stats(self) -> dict[str, BatcherStats]:
        """Batcher statistics per loaded model, keyed ``name@version`` (``name@version#sha256[:12]`` for
        a second copy with other weights)."""
        return self.models.stats()

    def unload(self, name: str, version: str) -> None:
        """Unload every loaded copy of ``name@version``: at once when idle, else when its last volume is done."""
        self.models.unload(name, version)

    def close(self) -> None:
        """Stop every batcher and release every model."""
        self.models.close()

    # -- one volume ----------------------------------------------------------------------------------------------

    def run(
        self, manifest: Manifest, folder: Path, sha256: str, volume: Volume, *, changed_at: float | None = None
    ) -> ModelResult:
        """Run one model on one volume and read its output on the volume's grid.

        Parameters
        ----------
        manifest
            The model's manifest.
        folder
            The model package folder (weights are loaded from it on first use).
        sha256
            The weights' SHA-256 as registered (part of the cache key: new weights, new session).
        volume
            An assembled volume the model was routed to.
        changed_at
            The registration's ``changed_at``: a version that failed to load is tried again only once it changed
            (re-registered or re-enabled); ``None``: not again while this runtime lives.

        Returns
        -------
        ModelResult
            Label map or masks, parametric maps, measurements, lesions, classifications, timings and notes.

        Raises
        ------
        ModelError
            If the model cannot be loaded, or failed to load before and its registration has not changed since.
        InferenceError
            If the volume does not fit the model, the forward pass fails (``OutOfMemory`` even for one item),
            or the output cannot be read (wrong shape or channel count, NaN or infinite values).
        """
        clock = _Clock()
        with self.models.lease(manifest, folder, sha256, changed_at) as batcher:  # loaded before the volume is prepared
            if manifest.inference.pipeline == "bundle":
                finish = _by_bundle(batcher, manifest, folder, volume, clock)
            else:
                finish = _by_manifest(batcher, manifest, volume, clock)
        with clock.stage("restore_s"):  # the model's lease is over: it may be unloaded meanwhile
            decoded, notes = finish()
        del finish  # the raw output
        with clock.stage("measure_s"):
            measurements = _measurements(decoded, volume, manifest)
            lesions = _lesions(decoded, volume, manifest)
            decoded.lesion_probabilities.clear()  # full-size arrays: not kept past measuring
            findings = _findings(decoded, volume, manifest)
        return ModelResult(
            name=manifest.name,
            version=manifest.version,
            sha256=sha256,
            manifest=manifest,
            volume=volume,
            labelmap=decoded.labelmap,
            masks=decoded.masks,
            maps=decoded.maps,
            probabilities=decoded.probabilities,
            measurements=measurements,
            lesions=lesions,
            classifications=findings,
            timings=clock.timings,
            notes=notes,
        )


def _by_manifest(batcher: Batcher, manifest: Manifest, volume: Volume, clock: _Clock) -> _Finish:
    """Prepare by the manifest's ``preprocess`` and run forward (whole or sliding window); then decode."""
    with clock.stage("prepare_s"):
        prepared = prepare(volume, manifest)
    with clock.stage("infer_s"):
        output = _forward(clock.timed(batcher.run), prepared, manifest)
        check_output(output, manifest, prepared)
    return lambda: (decode(output, prepared, manifest), prepared.notes)


def _by_bundle(batcher: Batcher, manifest: Manifest, folder: Path, volume: Volume, clock: _Clock) -> _Finish:
    """The bundle's own preprocessing, inferer and postprocessing (:mod:`gateway.infer.bundle_pipeline`); then
    read its output as the manifest's outputs say."""
    from gateway.infer import bundle_pipeline as pipeline  # torch and MONAI load with the first bundle model

    with clock.stage("infer_s"):
        bundle = weights_path(folder, manifest.weights, directory=True)
        sections = pipeline.build_sections(bundle, trust_code=manifest.trust_code)
        output = pipeline.run_sections(sections, volume, pipeline.patch_predictor(clock.timed(batcher.run)))
    return lambda: (pipeline.decode_output(output, manifest), pipeline.bundle_notes(manifest))


def _extra(prepared: Prepared, manifest: Manifest, items: int) -> dict[str, Array] | None:
    """The b-values input, one row per item, for a diffusion model."""
    if prepared.b_values is None:
        return None
    return {manifest.inference.b_values_input: np.tile(prepared.b_values, (items, 1))}


def _forward(run: _Run, prepared: Prepared, manifest: Manifest) -> Array:
    """The raw model output ``[C, s, r, c]`` on the model grid: one item, or sliding-window patches."""
    patch = manifest.inference.patch_size
    if patch is None:
        output = run(prepared.array[None], _extra(prepared, manifest, 1))
        return _one(output)
    return _sliding_window(run, prepared, manifest, patch)


def _one(output: Array) -> Array:
    if output.ndim != 5:
        raise InferenceError(f"model output must be [batch, channels, slice, row, column], got shape {output.shape}")
    item: Array = output[0]
    return item


def _sliding_window(run: _Run, prepared: Prepared, manifest: Manifest, patch: tuple[int, int, int]) -> Array:
    """MONAI sliding-window inference whose predictor submits each group of patches to the shared batcher.

    Where the image is smaller than a patch, MONAI would pad the whole image to the patch size and stitch the
    outputs on that padded grid (a 360 x 360 CT in 512 x 512 patches: twice the voxels to weigh, add, divide and
    crop). Here the windows are clipped to the image; each group of patches is padded as MONAI pads the image
    (``cval``, the larger half after; into a buffer whose padding is filled once) just before the model sees it,
    and its output cropped back; the Gaussian weights are MONAI's for the whole patch, cropped alike. Every voxel
    gets the same patches, weights, sums and division in the same order, so the same values, and the padding is
    never stitched.
    """
    import torch  # torch and MONAI load on the first sliding-window model, not with the gateway
    from monai.data.utils import compute_importance_map
    from monai.inferers.utils import sliding_window_inference

    window = _window(patch, prepared.model_shape)
    before = [(p - w) // 2 for p, w in zip(patch, window, strict=True)]  # MONAI's padding: the larger half after
    crop = (slice(None), slice(None), *(slice(b, b + w) for b, w in zip(before, window, strict=True)))
    cval = model_pad_value(prepared, manifest)
    buffers: dict[int, torch.Tensor] = {}  # padded patches by batch size: the padding is filled once

    def padded(patches: torch.Tensor) -> torch.Tensor:
        if window == patch:
            return patches
        n = patches.shape[0]
        if n not in buffers:  # the batcher is done with the previous batch once it returned its output
            buffers[n] = torch.full((n, patches.shape[1], *patch), cval, dtype=patches.dtype)
        buffers[n][crop] = patches
        return buffers[n]

    def predictor(patches: torch.Tensor) -> torch.Tensor:
        batch = padded(patches)
        output = run(batch.numpy(), _extra(prepared, manifest, patches.shape[0]))
        if output.ndim != 5 or output.shape[2:] != batch.shape[2:]:
            raise InferenceError(f"model returned {output.shape} for patches of {tuple(batch.shape)}")
        return torch.from_numpy(output)[crop]

    inference = manifest.inference
    weights = compute_importance_map(patch, mode="gaussian", sigma_scale=_SIGMA, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        result = sliding_window_inference(
            torch.from_numpy(prepared.array[None]),
            roi_size=window,
            sw_batch_size=inference.batch_size,
            predictor=predictor,
            overlap=inference.overlap,
            mode="gaussian",
            sigma_scale=_SIGMA,
            roi_weight_map=weights[crop[2:]],
            progress=False,
        )
    assert isinstance(result, torch.Tensor)
    output: Array = result[0].numpy()  # float32 (the input's), contiguous: nothing was cropped
    return output


#: MONAI's default width of the Gaussian blending weights, times the patch size.
_SIGMA = 0.125


def _window(patch: tuple[int, int, int], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The sliding window on the model grid: the patch, clipped to the image along each axis."""
    return (min(patch[0], shape[0]), min(patch[1], shape[1]), min(patch[2], shape[2]))


def _measurements(decoded: Decoded, volume: Volume, manifest: Manifest) -> tuple[SegmentMeasurement, ...]:
    segmentation = manifest.outputs.segmentation
    if segmentation is None:
        return ()
    return measure_segments(decoded.masks, volume, segmentation.labels)


def _lesions(decoded: Decoded, volume: Volume, manifest: Manifest) -> dict[int, LesionSet]:
    """The lesions of every segment declared ``lesions: true``."""
    segmentation = manifest.outputs.segmentation
    if segmentation is None:
        return {}
    return {
        label.value: find_lesions(
            decoded.masks[label.value], volume, label, decoded.lesion_probabilities.get(label.value)
        )
        for label in segmentation.labels
        if label.lesions and label.value in decoded.masks
    }


def _findings(decoded: Decoded, volume: Volume, manifest: Manifest) -> tuple[Finding, ...]:
    """The classifications whose segment is at least ``min_volume_ml``."""
    voxel_ml = voxel_volume_ml(volume.affine)
    findings = []
    for item in manifest.outputs.classifications:
        mask = decoded.masks.get(item.label)
        volume_ml = float(np.count_nonzero(mask)) * voxel_ml if mask is not None else 0.0
        if mask is not None and volume_ml >= item.min_volume_ml:
            probability = decoded.probabilities.get(item.label, 0.0)
            findings.append(Finding(item.name, item.finding, item.label, probability, volume_ml))
    return tuple(findings)
