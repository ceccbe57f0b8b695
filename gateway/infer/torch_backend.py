"""The torch backends: TorchScript files and MONAI bundles, run the same way once loaded.

A TorchScript model is ``torch.jit.load``-ed straight onto its device. A MONAI bundle folder is read as MONAI
does: ``models/model.ts`` when the bundle ships TorchScript, else the network built from ``network_def`` in
``configs/inference.json`` (or ``.yaml``) with ``models/model.pt``'s state dict. A bundle's config is code in
MONAI's syntax: :mod:`gateway.infer.bundle` builds its network without running any of it unless the registered
manifest says ``trust_code: true``. Weights are unpickled with ``weights_only=True`` whatever the manifest says.

Forward passes run in ``torch.inference_mode``; extra inputs (a diffusion model's b-values) follow the batch as
positional arguments. ``precision`` ``fp16``/``bf16`` runs under autocast (``bf16`` also on the CPU; ``fp16`` on
the CPU falls back to fp32, with a log line). On CUDA, inputs go through pinned host memory with non-blocking
copies, and the output comes back the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from gateway.errors import InferenceError, ModelError
from gateway.infer.bundle import build_network
from gateway.infer.failures import forward_error, load_error, weights_path
from gateway.registry.manifest import Manifest, Precision

__all__ = ["TorchBackend", "load_monai_bundle", "load_torchscript"]

log = logging.getLogger(__name__)


def autocast_dtype(precision: Precision, device: str, ref: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: plain fp32)."""
    if precision == "fp16" and device == "cpu":
        log.info("%s asks for fp16, which autocast does not offer on the CPU; running it in fp32", ref)
        return None
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@functools.cache
def _warn_cpu_fallback(ref: str, device: str, reason: str) -> None:
    log.warning("%s asks for %s, but %s; running it on the CPU", ref, device, reason)


def _torch_device(device: str, ref: str) -> str:
    """``device``, or ``cpu`` when it is a CUDA device torch cannot use here (a warning, once per model)."""
    if not device.startswith("cuda") or torch.cuda.is_available():
        return device
    reason = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device or driver"
    _warn_cpu_fallback(ref, device, reason)
    return "cpu"


def _first_tensor(output: Any) -> torch.Tensor:
    """The model's output tensor (the first one when it returns several, as deep-supervision networks do)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InferenceError(f"model returned {type(output).__name__}, not a tensor")


class TorchBackend:
    """A torch module (TorchScript or a bundle's network) on one device.

    Parameters
    ----------
    module
        The model, already on ``device`` and in eval mode.
    ref
        ``name@version``, for messages.
    device
        ``cpu`` or ``cuda:N``.
    precision
        The manifest's ``inference.precision``.
    """

    def __init__(self, module: torch.nn.Module, ref: str, device: str, precision: Precision = "fp32") -> None:
        self._module: torch.nn.Module | None = module
        self.ref = ref
        self.device = device
        self._torch_device = torch.device(device)
        self._cuda = self._torch_device.type == "cuda"
        self.autocast = autocast_dtype(precision, device, ref)

    def _to_device(self, array: npt.NDArray[Any]) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not self._cuda:
            return tensor
        return tensor.pin_memory().to(self._torch_device, non_blocking=True)

    def _to_host(self, output: torch.Tensor) -> npt.NDArray[np.float32]:
        output = output.float()
        if not self._cuda:
            return output.numpy()
        host = torch.empty(output.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(output, non_blocking=True)
        torch.cuda.current_stream(self._torch_device).synchronize()
        return host.numpy().copy()  # out of the pinned pool: results may be held for a long time

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._torch_device.type, dtype=self.autocast)

    def run(
        self, batch: npt.NDArray[np.float32], extra: Mapping[str, npt.NDArray[np.float32]] | None = None
    ) -> npt.NDArray[np.float32]:
        """Run one forward pass; see :class:`gateway.infer.backend.Backend`."""
        module = self._module
        if module is None:
            raise InferenceError(f"{self.ref} was closed")
        try:
            with torch.inference_mode(), self._autocast():
                inputs = [self._to_device(batch), *(self._to_device(value) for value in (extra or {}).values())]
                return self._to_host(_first_tensor(module(*inputs)))
        except Exception as exc:
            raise forward_error(exc, self.ref, self.device) from exc

    def close(self) -> None:
        """Drop the module and return cached device memory to the driver."""
        self._module = None
        if self._cuda:
            torch.cuda.empty_cache()


def _jit_load(path: Path, device: str) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but remains a format models are shipped in.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            module: torch.nn.Module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise load_error(path, exc) from exc
    return module.eval()


def load_torchscript(manifest: Manifest, folder: Path, device: str) -> TorchBackend:
    """Load ``folder / manifest.weights`` (a TorchScript file) on ``device``.

    Raises
    ------
    ModelError
        If the file is missing or is not a TorchScript archive that loads.
    """
    path = weights_path(folder, manifest.weights)
    device = _torch_device(device, manifest.ref)
    return TorchBackend(_jit_load(path, device), manifest.ref, device, manifest.inference.precision)


def _load_state(network: torch.nn.Module, path: Path, device: str) -> None:
    if not path.is_file():
        raise ModelError(f"MONAI bundle weights models/{path.name} not found")
    try:
        state = torch.load(str(path), map_location=device, weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a checkpoint saved with its optimiser: the network's part
        network.load_state_dict(state)
    except Exception as exc:
        raise load_error(path, exc) from exc


def load_monai_bundle(manifest: Manifest, folder: Path, device: str) -> TorchBackend:
    """Load the MONAI bundle folder ``folder / manifest.weights`` on ``device``.

    Without the manifest's ``trust_code``, the network is built without running the bundle's code, and a config
    that has code is refused (:func:`gateway.infer.bundle.build_network`).

    Raises
    ------
    ModelError
        If the bundle lacks both ``models/model.ts`` and a config with ``network_def``, the config has code and the
        manifest does not trust it (the message names the item), the network cannot be built, or the weights are
        missing, are not plain weights (a pickle of other objects) or do not fit it.
    """
    bundle = weights_path(folder, manifest.weights, directory=True)
    device = _torch_device(device, manifest.ref)
    precision = manifest.inference.precision
    scripted = bundle / "models" / "model.ts"
    if scripted.is_file():
        return TorchBackend(_jit_load(scripted, device), manifest.ref, device, precision)
    network = build_network(bundle, trust_code=manifest.trust_code)
    _load_state(network, bundle / "models" / "model.pt", device)
    return TorchBackend(network.to(device).eval(), manifest.ref, device, precision)
