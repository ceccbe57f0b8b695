"""Load a registered model onto a device: the backend plugins and their dependency table.

Each row of :data:`BACKENDS` (in the style of pydicom's pixel decoder plugins) names a manifest ``backend``, the
modules it needs, the packages that provide them and the loader; :func:`load_backend` refuses a backend whose
modules are missing with a :class:`~gateway.errors.ModelError` that says what to install. The loaders live in
:mod:`gateway.infer.ort` (ONNX Runtime) and :mod:`gateway.infer.torch_backend` (TorchScript, MONAI bundles) and
are imported only when a model is loaded, so importing the gateway stays cheap.

Errors, as every backend reports them: a missing or unreadable weights file, or a model that fails to load, is a
:class:`~gateway.errors.ModelError` naming the file and the cause; running out of device memory in a forward pass
is :class:`~gateway.errors.OutOfMemory` (the batcher splits the batch); anything else a forward pass raises is an
:class:`~gateway.errors.InferenceError` with the exception's type and message.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from gateway.errors import ModelError
from gateway.infer.backend import Backend
from gateway.registry.manifest import Manifest

__all__ = [
    "BACKENDS",
    "BackendPlugin",
    "dependency_table",
    "is_available",
    "load_backend",
    "resolve_device",
]

Loader = Callable[[Manifest, Path, str], Backend]

_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class BackendPlugin:
    """One row of the dependency table: a manifest ``backend`` and what it needs.

    Parameters
    ----------
    name
        The manifest's ``backend`` value.
    modules
        The Python modules the loader imports.
    requires
        The packages (pip requirements) that provide them.
    loader
        ``module:function`` of the loader, a ``(manifest, folder, device) -> Backend`` callable.
    """

    name: str
    modules: tuple[str, ...]
    requires: tuple[str, ...]
    loader: str

    def is_available(self) -> bool:
        """Whether every module this backend needs is installed."""
        return all(importlib.util.find_spec(module) is not None for module in self.modules)

    def load(self) -> Loader:
        """Import and return the loader."""
        module, _, function = self.loader.partition(":")
        loader: Loader = getattr(importlib.import_module(module), function)
        return loader


#: Manifest ``backend`` -> the plugin that loads it.
BACKENDS: Mapping[str, BackendPlugin] = MappingProxyType(
    {
        "onnx": BackendPlugin(
            "onnx", ("onnxruntime",), ("onnxruntime>=1.18 (onnxruntime-gpu for CUDA)",), "gateway.infer.ort:load_onnx"
        ),
        "torchscript": BackendPlugin(
            "torchscript", ("torch",), ("torch>=2.4",), "gateway.infer.torch_backend:load_torchscript"
        ),
        "monai-bundle": BackendPlugin(
            "monai-bundle",
            ("torch", "monai"),
            ("torch>=2.4", "monai>=1.3"),
            "gateway.infer.torch_backend:load_monai_bundle",
        ),
    }
)


def is_available(backend: str) -> bool:
    """Return whether models of ``backend`` (a manifest ``backend`` value) can be loaded here."""
    plugin = BACKENDS.get(backend)
    return plugin is not None and plugin.is_available()


def dependency_table() -> list[tuple[str, str, str, bool]]:
    """Return the dependency table as rows of (backend, modules, requirements, available)."""
    return [
        (name, ", ".join(row.modules), ", ".join(row.requires), row.is_available()) for name, row in BACKENDS.items()
    ]


#: The GPU driver libraries a CUDA (or ROCm) device needs: without one of them, no runtime sees a device.
_GPU_DRIVERS = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so", "libamdhip64.so")


def _gpu_driver_present() -> bool:
    """Whether a GPU driver library loads here (a few milliseconds; importing torch to ask takes a second)."""
    for name in _GPU_DRIVERS:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def _cuda_count() -> int:
    """The number of CUDA devices torch sees (0 without torch or without CUDA). On a machine with no GPU driver the
    answer is 0 without importing torch, so that a gateway of ONNX models never loads it."""
    if importlib.util.find_spec("torch") is None:
        return 0
    if "torch" not in sys.modules and not _gpu_driver_present():
        return 0
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def resolve_device(requested: str) -> str:
    """Turn a device setting into the device a model is loaded on.

    Parameters
    ----------
    requested
        ``auto`` (the first CUDA device when there is one, else the CPU), ``cpu``, ``cuda`` (CUDA device 0) or
        ``cuda:N``.

    Returns
    -------
    str
        ``cpu`` or ``cuda:N``.

    Raises
    ------
    ModelError
        If ``requested`` is not one of the forms above, or asks for CUDA (or a CUDA device) this machine lacks.
    """
    match = _DEVICE.match(requested.strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ModelError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {requested!r}")
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cpu":
        return "cpu"
    count = _cuda_count()
    if kind == "auto":
        return "cuda:0" if count else "cpu"
    if count == 0:
        raise ModelError(
            f"device {requested!r} asks for CUDA, but no CUDA device is available "
            "(no GPU, no driver, or a CPU-only torch build); use 'cpu' or 'auto'"
        )
    if index >= count:
        raise ModelError(f"device {requested!r}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
    return f"cuda:{index}"


def load_backend(manifest: Manifest, folder: Path, device: str) -> Backend:
    """Load the model a manifest describes onto ``device``.

    Parameters
    ----------
    manifest
        The model's manifest (``backend`` picks the plugin, ``weights`` the file or bundle folder).
    folder
        The model package folder that holds ``model.yaml`` and the weights.
    device
        A device setting, resolved with :func:`resolve_device`.

    Returns
    -------
    Backend
        The loaded model. Its ``device`` is where it actually runs: ``cpu`` when CUDA was asked for but the
        backend's runtime has no CUDA support (an ONNX Runtime without the CUDA provider; a warning is logged).

    Raises
    ------
    ModelError
        If the backend's packages are missing (the message says what to install), the device is not available,
        or the weights are missing, corrupt or fail to load (the message names the file and the cause).
    """
    plugin = BACKENDS.get(manifest.backend)
    if plugin is None:
        raise ModelError(f"{manifest.ref}: unknown backend {manifest.backend!r}; known: {', '.join(BACKENDS)}")
    if not plugin.is_available():
        raise ModelError(
            f"{manifest.ref}: the {plugin.name} backend needs {', '.join(plugin.modules)}; "
            f"install {' '.join(plugin.requires)}"
        )
    return plugin.load()(manifest, Path(folder), resolve_device(device))
