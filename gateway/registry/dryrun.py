"""The dry run at registration: load the model and run it once on a synthetic input of the declared shape.

A model that cannot load, fails on its declared input shape, returns non-finite values or returns an output whose
shape does not fit what the manifest says about it is refused before it is registered, with a reason that says
which of these it was. The input is random, so only the output's shape and finiteness are checked, never its values.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import GatewayError, ModelError
from gateway.registry.manifest import Manifest

__all__ = ["DEFAULT_SPATIAL", "DryRunReport", "dry_run", "expected_channels", "input_shape"]

#: The spatial size (slice, row, column) used for an axis the manifest leaves open.
DEFAULT_SPATIAL = (16, 32, 32)


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
    if output.ndim != 5 or output.shape[0] != shape[0]:
        raise ModelError(
            f"dry run: output has shape {list(output.shape)} for input {list(shape)}; "
            "expected [batch, channels, slice, row, column]"
        )
    if tuple(output.shape[2:]) != tuple(shape[2:]):
        raise ModelError(
            f"dry run: output spatial shape {list(output.shape[2:])} differs from the input's {list(shape[2:])}"
        )
    needed, why = expected_channels(manifest)
    if output.shape[1] != needed:
        raise ModelError(f"dry run: output has {output.shape[1]} channels, {why}")
    if not np.all(np.isfinite(output)):
        raise ModelError("dry run: output has NaN or infinite values")


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


def dry_run(manifest: Manifest, folder: Path, device: str = "cpu") -> DryRunReport:
    """Load the model of ``folder`` on ``device``, run it once on a synthetic input and check the output.

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
        output = _forward(backend, batch, _extra(manifest, shape[1]))
        seconds = time.perf_counter() - loaded
        check_output(manifest, shape, output)
        return DryRunReport(backend.device, shape, tuple(int(n) for n in output.shape), loaded - started, seconds)
    finally:
        backend.close()
