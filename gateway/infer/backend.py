"""The one interface every inference backend implements (ONNX Runtime, TorchScript, MONAI bundle).

A backend is a loaded model on one device. It takes a batch ``[batch, channels, slice, row, column]`` of float32 and
returns the model's raw output for that batch, ``[batch, out_channels, slice, row, column]`` (before the
manifest's activation). A diffusion model also gets the b-values, ``[batch, channels]`` float32, as a second input
(``extra``). Backends are plugins with a dependency table (like pydicom's pixel decoders): each says
what it needs, and :func:`gateway.infer.backends.load_backend` names the package to install when one is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """A model loaded on a device, ready to run batches.

    ``device`` is ``"cpu"`` or ``"cuda:N"``. ``run`` raises :class:`~gateway.errors.OutOfMemory` when the device
    cannot hold the batch (the batcher splits it) and :class:`~gateway.errors.InferenceError` for anything else the
    model does wrong (a shape it refuses, NaN output, ...).
    """

    device: str

    def run(
        self, batch: npt.NDArray[np.float32], extra: Mapping[str, npt.NDArray[np.float32]] | None = None
    ) -> npt.NDArray[np.float32]:
        """Run one forward pass on ``batch`` (and the ``extra`` inputs, by name) and return the raw output as
        float32 on the host."""
        ...

    def close(self) -> None:
        """Release the session and its device memory."""
        ...
