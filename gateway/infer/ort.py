"""The ONNX Runtime backend: one ``InferenceSession`` per model, on the CUDA provider when asked for and present.

Tensor names come from the manifest (``inference.input_name``/``output_name``) or are the model's first input and
output; a diffusion model's b-values go to the input named ``inference.b_values_input``. Inputs are fed in the
type the model declares (float16 for a model exported in half precision), outputs come back as float32. On CUDA
the session runs with IO binding: inputs are copied to the device once, the output is allocated there and copied
back once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]

from gateway.errors import InferenceError, ModelError
from gateway.infer.failures import forward_error, load_error, weights_path
from gateway.registry.manifest import Manifest

__all__ = ["OnnxBackend", "load_onnx"]

log = logging.getLogger(__name__)

_CUDA = "CUDAExecutionProvider"
_TYPES: Mapping[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def _providers(device: str, ref: str) -> tuple[list[Any], str]:
    """The execution providers for ``device`` and the device the session will really use."""
    if device.startswith("cuda"):
        if _CUDA in ort.get_available_providers():
            index = int(device.partition(":")[2] or 0)
            return [(_CUDA, {"device_id": index}), "CPUExecutionProvider"], f"cuda:{index}"
        log.warning(
            "%s asks for %s, but ONNX Runtime here has no CUDA execution provider (install onnxruntime-gpu); "
            "running it on the CPU",
            ref,
            device,
        )
    return ["CPUExecutionProvider"], "cpu"


def _session(path: Path, providers: list[Any]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are about graph rewrites, not about our inputs
    # No CPU memory arena: it keeps its high-water mark for as long as the model is loaded (1.5 GiB after one batch
    # of four 16x512x512 patches of ct-tissue, against 0.06 GiB without), memory the job budget cannot see; the
    # cost measured on a 2-CPU machine was 10-30 % slower CPU batches. A CUDA provider's own arena is not affected.
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise load_error(path, exc) from exc


def _pick(names: list[str], wanted: str | None, what: str, path: Path) -> str:
    if wanted is None:
        return names[0]
    if wanted not in names:
        raise ModelError(f"{path.name} has no {what} named {wanted!r}; it has {', '.join(names)}")
    return wanted


class OnnxBackend:
    """An ONNX model in an ONNX Runtime session.

    Parameters
    ----------
    session
        The loaded session.
    ref
        ``name@version``, for error messages.
    device
        ``cpu`` or ``cuda:N``: where the session's provider runs it.
    input_name, output_name
        The image input and the output to fetch.
    """

    def __init__(self, session: ort.InferenceSession, ref: str, device: str, input_name: str, output_name: str):
        self._session: ort.InferenceSession | None = session
        self.ref = ref
        self.device = device
        self.input_name = input_name
        self.output_name = output_name
        self._types = {item.name: _TYPES.get(item.type, np.float32) for item in session.get_inputs()}

    def _feeds(
        self, batch: npt.NDArray[np.float32], extra: Mapping[str, npt.NDArray[np.float32]] | None
    ) -> dict[str, npt.NDArray[Any]]:
        feeds = {self.input_name: batch, **(extra or {})}
        unknown = set(feeds) - set(self._types)
        if unknown:
            raise InferenceError(f"{self.ref} has no input named {', '.join(sorted(unknown))}")
        return {name: np.ascontiguousarray(value, dtype=self._types[name]) for name, value in feeds.items()}

    def _run_bound(self, session: ort.InferenceSession, feeds: dict[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(self.output_name, "cuda", int(self.device.partition(":")[2] or 0))
        session.run_with_iobinding(binding)
        output: npt.NDArray[Any] = binding.copy_outputs_to_cpu()[0]
        return output

    def run(
        self, batch: npt.NDArray[np.float32], extra: Mapping[str, npt.NDArray[np.float32]] | None = None
    ) -> npt.NDArray[np.float32]:
        """Run one forward pass; see :class:`gateway.infer.backend.Backend`."""
        session = self._session
        if session is None:
            raise InferenceError(f"{self.ref} was closed")
        feeds = self._feeds(batch, extra)
        try:
            if self.device == "cpu":
                output = session.run([self.output_name], feeds)[0]
            else:
                output = self._run_bound(session, feeds)
        except Exception as exc:
            raise forward_error(exc, self.ref, self.device) from exc
        return np.asarray(output, dtype=np.float32)

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees its memory when the session is released)."""
        self._session = None


def load_onnx(manifest: Manifest, folder: Path, device: str) -> OnnxBackend:
    """Load ``folder / manifest.weights`` (an ``.onnx`` file) in ONNX Runtime on ``device``.

    Raises
    ------
    ModelError
        If the file is missing or not a model ONNX Runtime can load, or a named input/output does not exist.
    """
    path = weights_path(folder, manifest.weights)
    providers, actual = _providers(device, manifest.ref)
    session = _session(path, providers)
    if actual != "cpu" and _CUDA not in session.get_providers():
        log.warning("%s: ONNX Runtime could not start its CUDA provider; running it on the CPU", manifest.ref)
        actual = "cpu"
    inputs = [item.name for item in session.get_inputs()]
    outputs = [item.name for item in session.get_outputs()]
    input_name = _pick(inputs, manifest.inference.input_name, "input", path)
    output_name = _pick(outputs, manifest.inference.output_name, "output", path)
    if manifest.select.diffusion:
        _pick(inputs, manifest.inference.b_values_input, "b-values input", path)
    return OnnxBackend(session, manifest.ref, actual, input_name, output_name)
