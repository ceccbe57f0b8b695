"""Tiny models (and volumes) for the inference tests: torch modules, saved as TorchScript, ONNX and MONAI bundles.

The models are small enough to build in milliseconds and simple enough that their output is known:
``Threshold`` turns an intensity into two-class logits, ``Channels`` into two overlapping sigmoid channels,
``ADC`` computes the apparent diffusion coefficient from two b-values. Also: :func:`at_once`, concurrent calls
for the batching tests.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from gateway.assemble.model import SliceRef, Volume
from gateway.registry.manifest import Manifest, load_manifest

CODE = {"value": "1", "scheme": "99TEST", "meaning": "Test"}


class Threshold(torch.nn.Module):
    """Two-class logits: class 1 where the (windowed) input is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x[:, :1] - 0.5) * 20.0
        return torch.cat([-d, d], dim=1)


class Channels(torch.nn.Module):
    """Two overlapping sigmoid channels: input above 0.3 (body) and above 0.7 (dense)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x[:, :1] - 0.3) * 50.0, (x[:, :1] - 0.7) * 50.0], dim=1)


class LabelValues(torch.nn.Module):
    """One channel of label values: 3 where the input is above 0.5, else 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] > 0.5).float() * 3.0


class TinyConv(torch.nn.Module):
    """A seeded 3D convolution: outputs that depend on every weight, for comparing backends."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ADC(torch.nn.Module):
    """ADC (10^-3 mm2/s) from the first and last b-value channels and the b-values input [n, channels]."""

    def forward(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        low = torch.log(torch.clamp(x[:, :1], min=1e-6))
        high = torch.log(torch.clamp(x[:, -1:], min=1e-6))
        span = (b[:, -1] - b[:, 0]).reshape(-1, 1, 1, 1, 1)
        return (low - high) / span * 1000.0


class NaNNet(torch.nn.Module):
    """Outputs NaN everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=1) * float("nan")


@contextmanager
def quiet_export() -> Iterator[None]:
    """TorchScript and the legacy ONNX exporter are deprecated upstream; models are still shipped in them.

    Tracing also warns that a traced shape check becomes a constant (MONAI's norm layers): harmless here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def save_torchscript(module: torch.nn.Module, path: Path) -> Path:
    with quiet_export():
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def save_onnx(module: torch.nn.Module, path: Path, channels: int = 1, b_values: bool = False) -> Path:
    spatial = {0: "n", 2: "s", 3: "r", 4: "c"}
    example: tuple[torch.Tensor, ...] = (torch.rand(1, channels, 4, 5, 6),)
    names, axes = ["image"], {"image": spatial, "logits": spatial}
    if b_values:
        example += (torch.linspace(0.0, 1000.0, channels)[None],)
        names.append("b_values")
        axes["b_values"] = {0: "n"}
    with quiet_export():
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
        )
    return path


UNET = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}


def unet() -> torch.nn.Module:
    """The bundle's network, seeded."""
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    args = {k: v for k, v in UNET.items() if k != "_target_"}
    return UNet(**args).eval()  # type: ignore[arg-type]


def save_bundle(folder: Path, *, scripted: bool = False, yaml_config: bool = False) -> Path:
    """A MONAI bundle with the tiny UNet: configs/inference.json (or .yaml) + models/model.pt, or models/model.ts."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {"bundle_root": ".", "network_def": UNET, "network": "$@network_def"}
    if yaml_config:
        (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    else:
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
    network = unet()
    if scripted:
        with quiet_export():
            torch.jit.save(torch.jit.trace(network, torch.rand(1, 1, 8, 8, 8)), str(folder / "models" / "model.ts"))
    else:
        torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def segment(value: int, name: str, measurements: list[str] | None = None) -> dict[str, Any]:
    return {
        "value": value,
        "name": name,
        "category": CODE,
        "type": CODE,
        "measurements": measurements or ["volume"],
    }


def manifest_dict(backend: str, weights: str, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny",
        "version": "1.0",
        "description": "A tiny test model.",
        "authors": ["Tests"],
        "licence": "CC0",
        "intended_use": "Tests only.",
        "backend": backend,
        "weights": weights,
        "outputs": {"segmentation": {"kind": "labelmap", "activation": "softmax", "labels": [segment(1, "Bright")]}},
    }
    data.update(sections)
    return data


def write_package(folder: Path, backend: str, weights: str, **sections: Any) -> Manifest:
    """Write model.yaml into ``folder`` (the weights are already there) and read it back."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest_dict(backend, weights, **sections)))
    return load_manifest(folder)


def torchscript_package(folder: Path, module: torch.nn.Module, **sections: Any) -> Manifest:
    """``module`` saved as TorchScript (``model.pt``) in ``folder`` with a model.yaml; the manifest read back."""
    folder.mkdir(parents=True, exist_ok=True)
    save_torchscript(module, folder / "model.pt")
    return write_package(folder, "torchscript", "model.pt", **sections)


def make_volume(array: np.ndarray, affine: np.ndarray | None = None, **fields: Any) -> Volume:
    """A volume from an array ``[S, R, C]`` (or 4D) and an affine (default: 1 mm axial, IPL as scanned)."""
    if affine is None:
        affine = np.array([[0, 0, 1, -10], [0, 1, 0, -10], [-1, 0, 0, 10], [0, 0, 0, 1]], dtype=np.float64)
    slices = tuple(SliceRef(f"1.2.3.{i + 1}") for i in range(array.shape[-3]))
    base: dict[str, Any] = {
        "series_instance_uid": "1.2.3",
        "study_instance_uid": "1.2",
        "frame_of_reference_uid": "1.2.4",
        "modality": "CT",
    }
    base.update(fields)
    return Volume(
        array=np.asarray(array, dtype=np.float32), affine=np.asarray(affine, dtype=np.float64), slices=slices, **base
    )


def cuda_or_skip() -> str:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return "cuda:0"


def at_once(work: Callable[[int], None], n: int, timeout_s: float) -> None:
    """Call ``work(0)`` ... ``work(n - 1)`` from one thread each, released together by a barrier; join them."""
    barrier = threading.Barrier(n)

    def worker(index: int) -> None:
        barrier.wait()
        work(index)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
