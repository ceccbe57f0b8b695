"""The dry run at registration: load the model and run it once on a synthetic input of the declared shape.

A model that cannot load, fails on its declared input shape, returns non-finite values or returns an output whose
shape does not fit what the manifest says about it is refused before it is registered, with a reason that says
which of these it was. The input is random, so only the output's shape and finiteness are checked, never its values.

A MONAI bundle run by its own pipeline (``inference.pipeline: bundle``) has its ``preprocessing``, ``inferer`` and
``postprocessing`` built as inference builds them (an untrusted config with code is refused, the item named), then
runs whole on a small synthetic CT volume (:data:`BUNDLE_VOLUME`, a water cylinder in air at
:data:`BUNDLE_SPACING`): its output, inverted to the volume's grid, must have the volume's shape and enough channels.

At registration the model is loaded and run in a child process (:func:`dry_run_in_child`, through
:mod:`gateway.registry.sandbox`), within ``models.sandbox_timeout_s`` and ``models.sandbox_memory_bytes``: the
model's code, and a MONAI bundle's config, never run in the server. The child sends back only the output's shape,
whether it is finite and the timings; the checks against the manifest are made here, in the caller's process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import GatewayError, ModelError
from gateway.registry.manifest import Manifest
from gateway.registry.sandbox import SandboxLimits, run_in_child

__all__ = [
    "BUNDLE_SPACING",
    "BUNDLE_VOLUME",
    "DEFAULT_SPATIAL",
    "DryRunReport",
    "dry_run",
    "dry_run_in_child",
    "expected_channels",
    "input_shape",
]

#: The spatial size (slice, row, column) used for an axis the manifest leaves open.
DEFAULT_SPATIAL = (16, 32, 32)
#: The synthetic volume (slice, row, column) a bundle's own pipeline is tried on, and its spacing in mm.
BUNDLE_VOLUME = (24, 48, 48)
BUNDLE_SPACING = (2.5, 1.5, 1.5)


@dataclass(frozen=True)
class DryRunReport:
    """What the dry run did: the shapes in and out, the device and how long loading and the forward pass took."""

    device: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    load_seconds: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "device": self.device,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "load_seconds": round(self.load_seconds, 4),
            "seconds": round(self.seconds, 4),
        }


def input_shape(manifest: Manifest) -> tuple[int, int, int, int, int]:
    """The input ``[1, channels, slice, row, column]`` the model is tried on.

    The spatial size is ``inference.patch_size``, else ``preprocess.spatial_size`` (an open axis takes
    :data:`DEFAULT_SPATIAL`'s), else :data:`DEFAULT_SPATIAL`. A diffusion model gets ``select.min_b_values``
    channels (one per b-value), any other ``inference.input_channels``.
    """
    spatial: tuple[int, int, int] = DEFAULT_SPATIAL
    if manifest.inference.patch_size is not None:
        spatial = manifest.inference.patch_size
    elif manifest.preprocess.spatial_size is not None:
        size = manifest.preprocess.spatial_size
        spatial = (size[0] or DEFAULT_SPATIAL[0], size[1] or DEFAULT_SPATIAL[1], size[2] or DEFAULT_SPATIAL[2])
    channels = manifest.select.min_b_values if manifest.select.diffusion else manifest.inference.input_channels
    if manifest.inference.pipeline == "bundle":
        spatial = BUNDLE_VOLUME
    return (1, channels, *spatial)


def expected_channels(manifest: Manifest) -> tuple[int, str]:
    """The output channels the manifest's outputs need (the runtime's own rule), and the reason in words."""
    from gateway.infer.postprocess import expected_channels as runtime_channels

    needed = runtime_channels(manifest)
    segmentation = manifest.outputs.segmentation
    if segmentation is None:
        return needed, f"the manifest reads parametric map channels up to {needed - 1} (needs {needed})"
    if needed == 1:
        return 1, "the manifest declares a labelmap read from one channel (needs 1)"
    what = "labels as channels" if segmentation.kind == "channels" else "labels"
    return needed, (
        f"the manifest declares {len(segmentation.labels)} {what}, values up to {needed - 1} (needs {needed})"
    )


def _extra(manifest: Manifest, channels: int) -> dict[str, npt.NDArray[np.float32]] | None:
    if not manifest.select.diffusion:
        return None
    b_values = np.linspace(0.0, 1000.0, channels, dtype=np.float32)[np.newaxis, :]
    return {manifest.inference.b_values_input: b_values}


def check_output(manifest: Manifest, shape: tuple[int, ...], output: npt.NDArray[Any]) -> None:
    """Raise :class:`ModelError` unless ``output`` fits the input ``shape`` and the manifest's outputs."""
    _check_shape(manifest, shape, tuple(int(n) for n in output.shape))
    if not np.all(np.isfinite(output)):
        raise ModelError("dry run: output has NaN or infinite values")


def _check_shape(manifest: Manifest, shape: tuple[int, ...], output: tuple[int, ...]) -> None:
    if len(output) != 5 or output[0] != shape[0]:
        raise ModelError(
            f"dry run: output has shape {list(output)} for input {list(shape)}; "
            "expected [batch, channels, slice, row, column]"
        )
    if output[2:] != tuple(shape[2:]):
        raise ModelError(f"dry run: output spatial shape {list(output[2:])} differs from the input's {list(shape[2:])}")
    needed, why = expected_channels(manifest)
    if manifest.inference.pipeline == "bundle":
        segmentation = manifest.outputs.segmentation
        label_values = segmentation is not None and segmentation.kind == "labelmap" and output[1] == 1
        if not label_values and output[1] < needed:
            raise ModelError(f"dry run: the bundle's postprocessed output has {output[1]} channels, {why}")
    elif output[1] != needed:
        raise ModelError(f"dry run: output has {output[1]} channels, {why}")


def _forward(backend: Any, batch: npt.NDArray[np.float32], extra: Mapping[str, npt.NDArray[np.float32]] | None) -> Any:
    try:
        return np.asarray(backend.run(batch, extra))
    except ModelError:
        raise
    except GatewayError as exc:
        raise ModelError(f"dry run: the model failed on input {list(batch.shape)}: {exc}") from exc
    except Exception as exc:  # a model's own bug must refuse the model, not crash registration
        raise ModelError(
            f"dry run: the model failed on input {list(batch.shape)}: {type(exc).__name__}: {exc}"
        ) from exc


@dataclass(frozen=True)
class _Probe:
    """What running the model once showed, before any check: where it ran, the output's shape, whether it is
    finite, the timings. It is all a child sends back (:func:`dry_run_in_child`)."""

    device: str
    output_shape: tuple[int, ...]
    finite: bool
    load_seconds: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "output_shape": list(self.output_shape)}

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> _Probe:
        """Read a child's answer; it is the model's process speaking, so every field is checked."""
        try:
            shape, device = answer["output_shape"], answer["device"]
            timings = (answer["load_seconds"], answer["seconds"])
            if not (isinstance(device, str) and 0 < len(device) <= 32 and isinstance(answer["finite"], bool)):
                raise TypeError("device or finite")
            if not (isinstance(shape, list) and len(shape) <= 8 and all(_count(n) for n in shape)):
                raise TypeError("output_shape")
            if not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t < 1e9 for t in timings):
                raise TypeError("timings")
        except (KeyError, TypeError) as exc:
            raise ModelError(f"dry run: the model's process sent a malformed answer ({exc})") from exc
        return cls(device, tuple(shape), answer["finite"], float(timings[0]), float(timings[1]))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40


def _probe(manifest: Manifest, folder: Path, device: str) -> _Probe:
    """Load the model and run it once on the synthetic input; nothing is checked but that both work."""
    from gateway.infer.backends import load_backend

    shape = input_shape(manifest)
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    started = time.perf_counter()
    try:
        backend = load_backend(manifest, folder, device)
    except ModelError as exc:
        raise ModelError(f"dry run: cannot load the model: {exc.reason}") from exc
    except Exception as exc:  # a loader's unexpected failure is still a model that cannot be registered
        raise ModelError(f"dry run: cannot load the model: {type(exc).__name__}: {exc}") from exc
    loaded = time.perf_counter()
    try:
        if manifest.inference.pipeline == "bundle":
            output = _bundle_pipeline(manifest, folder, backend)
        else:
            output = _forward(backend, batch, _extra(manifest, shape[1]))
        seconds = time.perf_counter() - loaded
        finite = bool(np.all(np.isfinite(output)))
        return _Probe(backend.device, tuple(int(n) for n in output.shape), finite, loaded - started, seconds)
    finally:
        backend.close()


def _synthetic_ct() -> Any:
    """A small CT volume: a water cylinder (0 HU, with a 60 HU core) in air, axial, LPS."""
    from gateway.assemble.model import SliceRef, Volume

    slices, rows, columns = BUNDLE_VOLUME
    row, column = np.mgrid[:rows, :columns]
    radius = np.hypot(row - rows / 2, column - columns / 2)
    plane = np.where(radius < rows * 0.4, 0.0, -1000.0) + np.where(radius < rows * 0.15, 60.0, 0.0)
    affine = np.eye(4)
    affine[:3, :3] = [[0, 0, BUNDLE_SPACING[2]], [0, BUNDLE_SPACING[1], 0], [BUNDLE_SPACING[0], 0, 0]]
    return Volume(
        array=np.repeat(plane[None].astype(np.float32), slices, axis=0),
        affine=affine,
        slices=tuple(SliceRef(f"2.25.{i + 1}") for i in range(slices)),
        series_instance_uid="2.25.1",
        study_instance_uid="2.25.2",
        frame_of_reference_uid="2.25.3",
        modality="CT",
    )


def _bundle_pipeline(manifest: Manifest, folder: Path, backend: Any) -> npt.NDArray[np.float32]:
    """The bundle's own pipeline on :func:`_synthetic_ct`: ``[1, channels, slice, row, column]``."""
    from gateway.infer.bundle_pipeline import build_sections, patch_predictor, run_sections
    from gateway.infer.failures import weights_path

    try:
        sections = build_sections(
            weights_path(folder, manifest.weights, directory=True), trust_code=manifest.trust_code
        )
    except ModelError as exc:
        raise ModelError(f"dry run: {exc.reason}") from exc

    try:
        output = run_sections(sections, _synthetic_ct(), patch_predictor(lambda batch: _forward(backend, batch, None)))
    except ModelError:  # the network itself failed: _forward said so
        raise
    except GatewayError as exc:
        raise ModelError(
            f"dry run: the bundle's pipeline failed on a synthetic CT of {list(BUNDLE_VOLUME)}: {exc}"
        ) from exc
    return output[None]


def _report(manifest: Manifest, probe: _Probe) -> DryRunReport:
    """Check what the probe showed against the manifest; the report if it fits."""
    shape = input_shape(manifest)
    _check_shape(manifest, shape, probe.output_shape)
    if not probe.finite:
        raise ModelError("dry run: output has NaN or infinite values")
    return DryRunReport(probe.device, shape, probe.output_shape, probe.load_seconds, probe.seconds)


def dry_run(manifest: Manifest, folder: Path, device: str = "cpu") -> DryRunReport:
    """Load the model of ``folder`` on ``device`` in this process, run it once on a synthetic input, check the output.

    This runs the model's code here: at registration the registry calls :func:`dry_run_in_child` instead.

    Parameters
    ----------
    manifest
        The package's manifest.
    folder
        The package folder (``model.yaml`` and the weights).
    device
        Where to run it (a device setting, as for :func:`gateway.infer.backends.load_backend`).

    Returns
    -------
    DryRunReport
        The input and output shapes, the device and the timings.

    Raises
    ------
    ModelError
        If the model cannot be loaded, fails on the input, or its output is not finite, has another spatial shape
        than the input, or has another channel count than the manifest's outputs need (the message says which).
    """
    return _report(manifest, _probe(manifest, folder, device))


def _child_probe(payload: dict[str, Any]) -> dict[str, Any]:
    """In the child process: :func:`_probe` on the request of :func:`dry_run_in_child`."""
    manifest = Manifest.model_validate(payload["manifest"])
    return _probe(manifest, Path(payload["folder"]), str(payload["device"])).as_dict()


def dry_run_in_child(
    manifest: Manifest, folder: Path, device: str = "cpu", *, limits: SandboxLimits | None = None
) -> DryRunReport:
    """:func:`dry_run` with the model loaded and run in a child process, within ``limits``.

    The child (:mod:`gateway.registry.sandbox`) loads the model and runs it once; this process checks its output's
    shape against the manifest. Parameters and report as for :func:`dry_run`; ``limits`` defaults to
    :class:`~gateway.registry.sandbox.SandboxLimits`'s defaults.

    Raises
    ------
    ModelError
        For every reason :func:`dry_run` gives, and when the child runs past ``limits.timeout_s`` (it is stopped),
        runs out of ``limits.memory_bytes`` (the message names the limit) or dies without an answer.
    """
    payload = {"manifest": manifest.model_dump(mode="json"), "folder": str(Path(folder).resolve()), "device": device}
    answer = run_in_child("gateway.registry.dryrun:_child_probe", payload, limits or SandboxLimits(), "dry run")
    return _report(manifest, _Probe.from_answer(answer))
