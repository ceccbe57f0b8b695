"""Tiny model packages for the registry, routing and API tests: ONNX graphs built with onnx.helper (no torch export),
and MONAI bundles of a small UNet."""

from __future__ import annotations

import copy
import io
import json
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

_OPSET = [helper.make_opsetid("", 17)]
_SPATIAL = ["s", "r", "c"]


def onnx_model(
    out_channels: int = 3,
    in_channels: int = 1,
    *,
    pool: bool = False,
    nan: bool = False,
    b_values: bool = False,
    seed: int = 1,
) -> bytes:
    """A 1x1x1 convolution from ``in_channels`` to ``out_channels`` with random weights (``seed``); ``pool`` halves
    the spatial size (a model whose output does not fit its input), ``nan`` multiplies by NaN, ``b_values`` adds a
    second input ``b_values``."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.random((out_channels, in_channels, 1, 1, 1), dtype=np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"])]
    inits = [weight]
    last = "conv"
    if pool:
        nodes.append(helper.make_node("MaxPool", [last], ["pooled"], kernel_shape=[2, 2, 2], strides=[2, 2, 2]))
        last = "pooled"
    if nan:
        inits.append(numpy_helper.from_array(np.array([np.nan], dtype=np.float32), "nan"))
        nodes.append(helper.make_node("Mul", [last, "nan"], ["scaled"]))
        last = "scaled"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", in_channels, *_SPATIAL])]
    if b_values:
        inputs.append(helper.make_tensor_value_info("b_values", TensorProto.FLOAT, ["n", in_channels]))
        nodes.append(helper.make_node("ReduceSum", ["b_values"], ["bsum"], keepdims=0))
        inits.append(numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero"))
        nodes.append(helper.make_node("Mul", ["bsum", "zero"], ["bzero"]))
        nodes.append(helper.make_node("Add", [last, "bzero"], ["with_b"]))
        last = "with_b"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "k", "s2", "r2", "c2"])
    graph = helper.make_graph(nodes, "tiny", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=_OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    return buffer.getvalue()


def _label(value: int, name: str) -> dict[str, Any]:
    return {
        "value": value,
        "name": name,
        "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
    }


def manifest_dict(name: str = "tiny-seg", version: str = "1.0.0", labels: int = 2, **overrides: Any) -> dict[str, Any]:
    """A valid ONNX labelmap manifest with ``labels`` labels (softmax: the model needs ``labels + 1`` channels)."""
    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": "A tiny test model.",
        "authors": ["Test"],
        "licence": "Apache-2.0",
        "intended_use": "Tests only.",
        "backend": "onnx",
        "weights": "model.onnx",
        "select": {"modality": ["CT"]},
        "inference": {"patch_size": [8, 16, 16]},
        "outputs": {"segmentation": {"labels": [_label(k, f"label {k}") for k in range(1, labels + 1)]}},
    }
    for key, value in overrides.items():
        data[key] = value
    return data


def write_package(
    folder: Path, manifest: dict[str, Any] | None = None, weights: bytes | None = None, **onnx_args: Any
) -> Path:
    """Write ``model.yaml`` and ``model.onnx`` into ``folder`` (created); return it."""
    manifest = copy.deepcopy(manifest) if manifest is not None else manifest_dict()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    if weights is None:
        labels = len(manifest["outputs"]["segmentation"]["labels"]) if "segmentation" in manifest["outputs"] else 0
        onnx_args.setdefault("out_channels", labels + 1)
        weights = onnx_model(**onnx_args)
    (folder / manifest["weights"]).write_bytes(weights)
    return folder


def zip_folder(folder: Path, archive: Path, *, top: str | None = None) -> Path:
    """Zip a package folder's files, at the archive's top or inside one folder ``top``."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                zf.write(path, f"{top}/{name}" if top else name)
    return archive


def tar_folder(folder: Path, archive: Path, *, top: str | None = None) -> Path:
    """A ``.tar.gz`` of a package folder's files, at the top or inside ``top``."""
    with tarfile.open(archive, "w:gz") as tf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                tf.add(path, f"{top}/{name}" if top else name)
    return archive


def torchscript_model(path: Path, out_channels: int = 3) -> Path:
    """A TorchScript 1x1x1 convolution saved at ``path`` (traced; torch's deprecation warning silenced)."""
    import torch

    module = torch.nn.Conv3d(1, out_channels, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module.eval(), torch.zeros(1, 1, 4, 4, 4))
        traced.save(str(path))
    return path


#: A small MONAI UNet as a bundle's ``network_def``: 1 channel in, 3 out (a two-label softmax), 8x16x16 patches.
UNET = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}


def unet_state() -> dict[str, Any]:
    """The state dict of :data:`UNET`'s network (seeded)."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    return UNet(**{k: v for k, v in UNET.items() if k != "_target_"}).state_dict()  # type: ignore[arg-type]


def bundle_package(
    folder: Path,
    config: dict[str, Any],
    *,
    weights: bytes | None = None,
    trust_code: bool = False,
    name: str = "tiny-bundle",
    version: str = "1.0.0",
) -> Path:
    """A ``monai-bundle`` package: ``model.yaml`` and ``bundle/`` with ``configs/inference.json`` (``config``) and
    ``models/model.pt`` (``weights``' bytes, else :func:`unet_state` saved by torch); return ``folder``."""
    import torch

    data = manifest_dict(name, version, backend="monai-bundle", weights="bundle")
    if trust_code:
        data["trust_code"] = True
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    (folder / "bundle" / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "bundle" / "models").mkdir(exist_ok=True)
    (folder / "bundle" / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    if weights is None:
        torch.save(unet_state(), folder / "bundle" / "models" / "model.pt")
    else:
        (folder / "bundle" / "models" / "model.pt").write_bytes(weights)
    return folder
