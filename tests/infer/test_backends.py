"""Backends: devices, the dependency table, the same numbers from every backend, and their errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from tiny_models import TinyConv, cuda_or_skip, save_bundle, save_onnx, save_torchscript, unet, write_package

from gateway.errors import InferenceError, ModelError, OutOfMemory
from gateway.infer import backends
from gateway.infer.backend import Backend
from gateway.infer.backends import BackendPlugin, dependency_table, load_backend, resolve_device
from gateway.infer.failures import forward_error


@pytest.fixture
def batch() -> np.ndarray:
    return np.random.default_rng(0).random((2, 1, 6, 7, 8), dtype=np.float32)


def expected(module: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module.eval()(torch.from_numpy(batch)).numpy()


def test_resolve_device_on_this_machine() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device(" CPU ") == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "cpu:1", "cuda:x", "", "cuda:0:1"])
def test_resolve_device_refuses_unknown_forms(bad: str) -> None:
    with pytest.raises(ModelError, match="device must be"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_model_error(requested: str) -> None:
    with pytest.raises(ModelError, match="no CUDA device is available"):
        resolve_device(requested)


def test_dependency_table_lists_every_backend() -> None:
    rows = {row[0]: row for row in dependency_table()}
    assert set(rows) == {"onnx", "torchscript", "monai-bundle"}
    assert all(row[3] for row in rows.values())  # all installed here
    assert "onnxruntime" in rows["onnx"][2]


def test_missing_backend_package_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = BackendPlugin("onnx", ("no_such_runtime_xyz",), ("no-such-runtime>=1",), "gateway.infer.ort:load_onnx")
    monkeypatch.setattr(backends, "BACKENDS", {"onnx": plugin})
    manifest = write_package(tmp_path, "onnx", "model.onnx")
    with pytest.raises(ModelError, match="install no-such-runtime>=1"):
        load_backend(manifest, tmp_path, "cpu")


def test_every_backend_gives_the_same_numbers(tmp_path: Path, batch: np.ndarray) -> None:
    module = TinyConv()
    save_torchscript(module, tmp_path / "model.pt")
    save_onnx(module, tmp_path / "model.onnx")
    want = expected(module, batch)
    for backend, weights in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
        loaded = load_backend(write_package(tmp_path, backend, weights), tmp_path, "cpu")
        assert isinstance(loaded, Backend)
        assert loaded.device == "cpu"
        got = loaded.run(batch)
        loaded.close()
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=backend)


@pytest.mark.parametrize("variant", ["state-dict-json", "state-dict-yaml", "torchscript"])
def test_monai_bundle_runs_its_network(tmp_path: Path, variant: str) -> None:
    save_bundle(tmp_path / "bundle", scripted=variant == "torchscript", yaml_config=variant.endswith("yaml"))
    manifest = write_package(tmp_path, "monai-bundle", "bundle")
    loaded = load_backend(manifest, tmp_path, "cpu")
    batch = np.random.default_rng(1).random((2, 1, 8, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(loaded.run(batch), expected(unet(), batch), rtol=1e-5, atol=1e-5)


def test_onnx_names_from_the_manifest_and_b_values_input(tmp_path: Path) -> None:
    from tiny_models import ADC

    save_onnx(ADC(), tmp_path / "adc.onnx", channels=2, b_values=True)
    manifest = write_package(
        tmp_path,
        "onnx",
        "adc.onnx",
        select={"diffusion": True},
        inference={"input_channels": 2, "input_name": "image", "output_name": "logits"},
        outputs={"parametric_maps": [{"name": "ADC", "quantity": CODE_, "units": UCUM}]},
    )
    loaded = load_backend(manifest, tmp_path, "cpu")
    signal = np.exp(-np.array([0.0, 1000.0]) * 1e-3).astype(np.float32)  # ADC 1.0e-3 mm2/s
    batch = np.broadcast_to(signal.reshape(1, 2, 1, 1, 1), (1, 2, 3, 3, 3)).copy()
    got = loaded.run(batch, {"b_values": np.array([[0.0, 1000.0]], dtype=np.float32)})
    np.testing.assert_allclose(got, 1.0, rtol=1e-5)


CODE_ = {"value": "113041", "scheme": "DCM", "meaning": "Apparent Diffusion Coefficient"}
UCUM = {"value": "um2/s", "scheme": "UCUM", "meaning": "um2/s"}


def test_onnx_unknown_tensor_name_is_a_model_error(tmp_path: Path) -> None:
    save_onnx(TinyConv(), tmp_path / "model.onnx")
    manifest = write_package(tmp_path, "onnx", "model.onnx", inference={"input_name": "input_0"})
    with pytest.raises(ModelError, match="no input named 'input_0'; it has image"):
        load_backend(manifest, tmp_path, "cpu")


def test_onnx_float16_model_is_fed_float16(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 1, "s", "r", "c"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 1, "s", "r", "c"])],
        [helper.make_tensor("two", TensorProto.FLOAT16, [], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "half.onnx")
    manifest = write_package(tmp_path, "onnx", "half.onnx", inference={"precision": "fp16"})
    got = load_backend(manifest, tmp_path, "cpu").run(np.full((1, 1, 2, 2, 2), 1.5, dtype=np.float32))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, 3.0)


@pytest.mark.parametrize(("backend", "weights"), [("onnx", "model.onnx"), ("torchscript", "model.pt")])
def test_missing_weights_name_the_file(tmp_path: Path, backend: str, weights: str) -> None:
    manifest = write_package(tmp_path, backend, weights)
    with pytest.raises(ModelError, match=f"weights file {weights} not found"):
        load_backend(manifest, tmp_path, "cpu")


@pytest.mark.parametrize(("backend", "weights"), [("onnx", "model.onnx"), ("torchscript", "model.pt")])
def test_corrupt_weights_name_the_file_and_cause(tmp_path: Path, backend: str, weights: str) -> None:
    (tmp_path / weights).write_bytes(b"\x00not a model\xff" * 10)
    manifest = write_package(tmp_path, backend, weights)
    with pytest.raises(ModelError, match=rf"cannot load model weights {weights}: \w+"):
        load_backend(manifest, tmp_path, "cpu")


def test_bundle_problems_are_model_errors(tmp_path: Path) -> None:
    manifest = write_package(tmp_path, "monai-bundle", "bundle")
    with pytest.raises(ModelError, match="bundle folder bundle not found"):
        load_backend(manifest, tmp_path, "cpu")
    save_bundle(tmp_path / "bundle")
    (tmp_path / "bundle" / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match=r"weights models/model.pt not found"):
        load_backend(manifest, tmp_path, "cpu")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bundle" / "models" / "model.pt")
    with pytest.raises(ModelError, match=r"cannot load model weights model.pt: RuntimeError"):
        load_backend(manifest, tmp_path, "cpu")
    (tmp_path / "bundle" / "configs" / "inference.json").write_text('{"network_def": {"_target_": "NoSuchNet"}}')
    with pytest.raises(ModelError, match=r"cannot build network_def from inference\.json"):
        load_backend(manifest, tmp_path, "cpu")


@pytest.mark.parametrize(("backend", "weights"), [("onnx", "model.onnx"), ("torchscript", "model.pt")])
def test_forward_failure_is_an_inference_error(tmp_path: Path, backend: str, weights: str) -> None:
    save_torchscript(TinyConv(), tmp_path / "model.pt")
    save_onnx(TinyConv(), tmp_path / "model.onnx")
    loaded = load_backend(write_package(tmp_path, backend, weights), tmp_path, "cpu")
    with pytest.raises(InferenceError, match=r"tiny@1.0 failed on cpu: \w+") as caught:
        loaded.run(np.zeros((1, 3, 4, 4, 4), dtype=np.float32))  # three channels for a one-channel model
    assert not isinstance(caught.value, OutOfMemory)
    loaded.close()
    with pytest.raises(InferenceError, match="closed"):
        loaded.run(np.zeros((1, 1, 4, 4, 4), dtype=np.float32))


def test_out_of_memory_is_told_apart() -> None:
    assert isinstance(forward_error(torch.cuda.OutOfMemoryError("CUDA out of memory."), "m@1", "cuda:0"), OutOfMemory)
    ort_text = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for buffer")
    assert isinstance(forward_error(ort_text, "m@1", "cuda:0"), OutOfMemory)
    other = forward_error(ValueError("bad shape"), "m@1", "cpu")
    assert type(other) is InferenceError
    assert other.reason == "m@1 failed on cpu: ValueError: bad shape"


def test_torch_precision(tmp_path: Path, batch: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    module = TinyConv()
    save_torchscript(module, tmp_path / "model.pt")
    want = expected(module, batch)
    fp16_manifest = write_package(tmp_path, "torchscript", "model.pt", inference={"precision": "fp16"})
    with caplog.at_level(logging.INFO, logger="gateway.infer.torch_backend"):
        fp16 = load_backend(fp16_manifest, tmp_path, "cpu")
    assert "running it in fp32" in caplog.text
    np.testing.assert_allclose(fp16.run(batch), want, rtol=1e-5, atol=1e-5)
    bf16_manifest = write_package(tmp_path, "torchscript", "model.pt", inference={"precision": "bf16"})
    bf16 = load_backend(bf16_manifest, tmp_path, "cpu")
    got = bf16.run(batch)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.05)


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path: Path, batch: np.ndarray) -> None:
    device = cuda_or_skip()
    module = TinyConv()
    save_torchscript(module, tmp_path / "model.pt")
    save_onnx(module, tmp_path / "model.onnx")
    save_bundle(tmp_path / "bundle")
    for backend, weights in (("torchscript", "model.pt"), ("onnx", "model.onnx"), ("monai-bundle", "bundle")):
        manifest = write_package(tmp_path, backend, weights)
        cpu, gpu = load_backend(manifest, tmp_path, "cpu"), load_backend(manifest, tmp_path, device)
        if backend != "onnx":  # ONNX Runtime may lack its CUDA provider (then it says so and runs on the CPU)
            assert gpu.device == device
        data = batch if backend != "monai-bundle" else np.random.default_rng(2).random((2, 1, 8, 8, 8), np.float32)
        np.testing.assert_allclose(gpu.run(data), cpu.run(data), rtol=1e-3, atol=1e-4, err_msg=backend)
        gpu.close()
    for precision in ("fp16", "bf16"):
        manifest = write_package(tmp_path, "torchscript", "model.pt", inference={"precision": precision})
        got = load_backend(manifest, tmp_path, device).run(batch)
        np.testing.assert_allclose(got, expected(module, batch), atol=0.05, err_msg=precision)
