"""Model lifecycle: versions no longer active unloaded, a memory budget kept least recently used first, models in use
never unloaded under a forward pass, failed loads not retried until the version is registered again or re-enabled."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import cuda_or_skip, make_volume, torchscript_package

from gateway.config import StoreSettings
from gateway.errors import ModelError
from gateway.infer import loaded_models
from gateway.infer.loaded_models import ESTIMATED_DISK, MEASURED_TORCH
from gateway.infer.runtime import InferenceRuntime
from gateway.infer.series import SeriesOutcome, run_models
from gateway.registry.manifest import Manifest, load_manifest
from gateway.registry.registry import RegisteredModel, Registry, RegistryIndex
from gateway.route.route import SeriesFacts

import model_packages

FACTS = SeriesFacts(modality="CT")
KIB100 = 25_000  # floats: 100,000 bytes of parameters
BUFFER_BYTES = 16 * 4


class Sized(torch.nn.Module):
    """Two-class threshold logits from a module holding ``floats`` float32 parameters and a 16-float buffer."""

    def __init__(self, floats: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(floats))
        self.register_buffer("offset", torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x[:, :1] - 0.5) * 20.0 + self.weight[0] + self.offset[0]
        return torch.cat([-d, d], dim=1)


def size_of(floats: int) -> int:
    return floats * 4 + BUFFER_BYTES


def package(folder: Path, name: str, version: str = "1.0", floats: int = KIB100) -> Manifest:
    return torchscript_package(folder, Sized(floats), name=name, version=version)


def volume() -> Any:
    return make_volume(np.linspace(-1.0, 2.0, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8))


def refs(runtime: InferenceRuntime) -> list[str]:
    return [m.ref for m in runtime.loaded()]


def run(runtime: InferenceRuntime, folder: Path, name: str, floats: int = KIB100) -> None:
    """Run model ``name`` (packaged under ``folder / name`` on first use) on a small volume."""
    manifest = load_manifest(folder / name) if (folder / name).is_dir() else package(folder / name, name, floats=floats)
    result = runtime.run(manifest, folder / name, name * 64, volume())
    assert result.labelmap is not None and result.labelmap.any()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[RegistryIndex]:
    idx = RegistryIndex(StoreSettings(data_dir=tmp_path / "data"))
    yield idx
    idx.close()


@pytest.fixture
def registry(index: RegistryIndex) -> Registry:
    return Registry(index, dry_run=None)


def runtime_with(budget: int | None = None) -> InferenceRuntime:
    return InferenceRuntime("cpu", memory_budget_bytes=budget)


@pytest.fixture
def runtime() -> Iterator[InferenceRuntime]:
    rt = runtime_with()
    yield rt
    rt.close()


def run_series(registry: Registry, runtime: InferenceRuntime) -> SeriesOutcome:
    """One series through routing and inference against the models active now, as the inference stage does."""
    return run_models(FACTS, [volume()], registry.active(), runtime)


# -- versions no longer active ---------------------------------------------------------------------------------------


def test_a_replaced_or_disabled_version_is_unloaded_at_the_next_series(
    tmp_path: Path, registry: Registry, runtime: InferenceRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.infer.loaded_models")
    package(tmp_path / "v1", "lung", "1.0")
    package(tmp_path / "v2", "lung", "2.0")
    registry.register(tmp_path / "v1")
    assert len(run_series(registry, runtime).results) == 1
    (loaded,) = runtime.loaded()
    assert (loaded.ref, loaded.device, loaded.in_use, loaded.retiring) == ("lung@1.0", "cpu", 0, False)
    assert loaded.memory_bytes == size_of(KIB100) and loaded.measured == MEASURED_TORCH
    assert f"loaded lung@1.0 on cpu: 0.1 MiB ({MEASURED_TORCH})" in caplog.messages

    registry.register(tmp_path / "v2")  # the newest version becomes the active one
    outcome = run_series(registry, runtime)
    assert [f"{r.name}@{r.version}" for r in outcome.results] == ["lung@2.0"]
    assert refs(runtime) == ["lung@2.0"]
    assert "unloaded lung@1.0 from cpu: 0.1 MiB (no longer active)" in caplog.messages

    registry.disable("lung")
    assert run_series(registry, runtime).decisions == ()
    assert runtime.loaded() == []
    assert "unloaded lung@2.0 from cpu: 0.1 MiB (no longer active)" in caplog.messages


def test_a_model_in_use_is_unloaded_only_when_its_volume_is_done(tmp_path: Path, runtime: InferenceRuntime) -> None:
    manifest = package(tmp_path / "a", "a")
    with runtime.models.lease(manifest, tmp_path / "a", "a" * 64) as batcher:
        runtime.retain([])  # no longer active while a forward pass may be running
        (loaded,) = runtime.loaded()
        assert loaded.in_use == 1 and loaded.retiring
        output = batcher.run(np.ones((1, 1, 4, 4, 4), dtype=np.float32))
        assert output.shape == (1, 2, 4, 4, 4) and (output[:, 1] > 0).all()
    assert runtime.loaded() == []


def test_a_version_active_again_before_its_volume_is_done_stays_loaded(
    tmp_path: Path, registry: Registry, runtime: InferenceRuntime
) -> None:
    package(tmp_path / "a", "a")
    model = registry.register(tmp_path / "a")
    with runtime.models.lease(model.manifest, model.folder, model.sha256):
        runtime.retain([])
        runtime.retain(registry.active())
    (loaded,) = runtime.loaded()
    assert loaded.ref == "a@1.0" and not loaded.retiring and loaded.in_use == 0


# -- the memory budget -----------------------------------------------------------------------------------------------


def test_loaded_models_stay_within_the_budget_least_recently_used_first(tmp_path: Path) -> None:
    budget = 2 * size_of(KIB100) + 10_000  # room for two, and for a first load's estimate: the file, a few KB more
    runtime = runtime_with(budget=budget)
    try:
        run(runtime, tmp_path, "a")
        run(runtime, tmp_path, "b")
        run(runtime, tmp_path, "a")  # b is now the least recently used
        run(runtime, tmp_path, "c")
        assert refs(runtime) == ["a@1.0", "c@1.0"]
        loaded = {m.ref: m for m in runtime.loaded()}
        assert loaded["a@1.0"].last_used < loaded["c@1.0"].last_used
        assert sum(m.memory_bytes for m in loaded.values()) <= budget
        run(runtime, tmp_path, "b")  # loaded again from its package
        assert refs(runtime) == ["b@1.0", "c@1.0"]
    finally:
        runtime.close()


def test_a_model_larger_than_the_budget_loads_alone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = runtime_with(budget=size_of(KIB100) + 1000)
    try:
        run(runtime, tmp_path, "a")
        with caplog.at_level(logging.WARNING, logger="gateway.infer.loaded_models"):
            run(runtime, tmp_path, "big", floats=4 * KIB100)
        assert refs(runtime) == ["big@1.0"]
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "big@1.0 takes 0.4 MiB, more than the memory budget of 0.1 MiB on cpu" in warning.getMessage()
    finally:
        runtime.close()


def test_a_model_in_use_is_not_evicted_and_the_budget_is_restored_when_it_is_released(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = runtime_with(budget=size_of(KIB100) + 10_000)  # room for one
    try:
        a, b = package(tmp_path / "a", "a"), package(tmp_path / "b", "b")
        with runtime.models.lease(a, tmp_path / "a", "a" * 64):
            with caplog.at_level(logging.WARNING), runtime.models.lease(b, tmp_path / "b", "b" * 64):
                assert refs(runtime) == ["a@1.0", "b@1.0"]  # a is in use: not unloaded to make room for b
            assert any("models in use on cpu take 0.2 MiB, over the memory budget" in m for m in caplog.messages)
            assert refs(runtime) == ["a@1.0"]  # b's volume is done: idle, over the budget, it goes
        (loaded,) = runtime.loaded()
        assert loaded.ref == "a@1.0" and loaded.in_use == 0  # within the budget: it stays
    finally:
        runtime.close()


def test_an_onnx_model_is_sized_by_its_file_as_an_estimate(tmp_path: Path, runtime: InferenceRuntime) -> None:
    folder = model_packages.write_package(tmp_path / "onnx")
    manifest = load_manifest(folder)
    runtime.run(manifest, folder, "0" * 64, volume())
    (loaded,) = runtime.loaded()
    assert loaded.measured == ESTIMATED_DISK
    assert loaded.memory_bytes == (folder / "model.onnx").stat().st_size
    assert loaded.as_dict()["ref"] == "tiny-seg@1.0.0" and loaded.as_dict()["memory_bytes"] == loaded.memory_bytes


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="memory_budget_bytes must be positive"):
        InferenceRuntime("cpu", memory_budget_bytes=0)


# -- failed loads ----------------------------------------------------------------------------------------------------


def corrupt(model: RegisteredModel) -> bytes:
    """Overwrite the registered weights with bytes that are no TorchScript archive; return the good ones."""
    path = model.folder / "model.pt"
    good = path.read_bytes()
    path.write_bytes(b"not a TorchScript archive")
    return good


FAILED = (
    r"^model a@1\.0 failed to load: cannot load model weights model\.pt: .+ "
    r"\(not retried until re-registered or re-enabled\)$"
)


def test_a_model_that_failed_to_load_fails_its_jobs_until_re_enabled(
    tmp_path: Path, registry: Registry, runtime: InferenceRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    package(tmp_path / "a", "a")
    model = registry.register(tmp_path / "a")
    good = corrupt(model)
    (failure,) = run_series(registry, runtime).failures
    assert failure.model == "a@1.0"
    assert re.match(FAILED, failure.reason), failure.reason
    assert list(runtime.failed_loads()) == ["a@1.0"]

    (model.folder / "model.pt").write_bytes(good)  # mended on disk, but the registration did not change
    (again,) = run_series(registry, runtime).failures
    assert again.reason == failure.reason, "not loaded again"

    cli = RegistryIndex(StoreSettings(data_dir=registry.root.parent))  # `gateway models enable`, another process
    try:
        enabled = Registry(cli, dry_run=None).enable("a")
    finally:
        cli.close()
    assert enabled.changed_at > model.changed_at
    outcome = run_series(registry, runtime)
    assert outcome.failures == () and len(outcome.results) == 1
    assert runtime.failed_loads() == {} and refs(runtime) == ["a@1.0"]


def test_a_model_that_failed_to_load_is_tried_again_once_registered_again(
    tmp_path: Path, registry: Registry, runtime: InferenceRuntime
) -> None:
    package(tmp_path / "a", "a")
    model = registry.register(tmp_path / "a")
    corrupt(model)
    for _ in range(2):
        with pytest.raises(ModelError, match=FAILED):
            runtime.run(model.manifest, model.folder, model.sha256, volume(), changed_at=model.changed_at)
    registry.remove("a@1.0")
    again = registry.register(tmp_path / "a")
    assert again.changed_at != model.changed_at
    result = runtime.run(again.manifest, again.folder, again.sha256, volume(), changed_at=again.changed_at)
    assert result.labelmap is not None and runtime.failed_loads() == {}


def test_a_failed_load_is_forgotten_once_the_version_is_no_longer_active(
    tmp_path: Path, registry: Registry, runtime: InferenceRuntime
) -> None:
    package(tmp_path / "a", "a")
    corrupt(registry.register(tmp_path / "a"))
    assert run_series(registry, runtime).failures
    registry.disable("a")
    run_series(registry, runtime)
    assert runtime.failed_loads() == {}


# -- running out of device memory while loading (a fault a CPU cannot raise: the loader is wrapped) ----------------


class OutOfMemoryOnLoad:
    """``load_backend`` that first raises what a torch backend raises for a CUDA allocation failure ``failures``
    times (``None``: always)."""

    def __init__(self, failures: int | None) -> None:
        self.failures = failures
        self.calls: list[str] = []

    def __call__(self, manifest: Manifest, folder: Path, device: str) -> Any:
        self.calls.append(manifest.ref)
        if self.failures is None or len(self.calls) <= self.failures:
            cause = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise ModelError(f"cannot load model weights model.pt: OutOfMemoryError: {cause}") from cause
        return REAL_LOAD(manifest, folder, device)


REAL_LOAD = loaded_models.load_backend


def test_running_out_of_memory_while_loading_unloads_the_idle_models_and_tries_once_more(
    tmp_path: Path, runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.infer.loaded_models")
    run(runtime, tmp_path, "a")
    loader = OutOfMemoryOnLoad(failures=1)
    monkeypatch.setattr(loaded_models, "load_backend", loader)
    run(runtime, tmp_path, "b")
    assert loader.calls == ["b@1.0", "b@1.0"] and refs(runtime) == ["b@1.0"]
    assert any(m.startswith("unloaded a@1.0 from cpu") and "running out of memory" in m for m in caplog.messages)


def test_a_load_that_runs_out_of_memory_twice_fails_the_job_and_is_tried_again_later(
    tmp_path: Path, runtime: InferenceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = package(tmp_path / "a", "a")
    loader = OutOfMemoryOnLoad(failures=None)
    monkeypatch.setattr(loaded_models, "load_backend", loader)
    with pytest.raises(ModelError, match=r"a@1\.0 does not fit in the free memory of cpu beside the models in use"):
        runtime.run(manifest, tmp_path / "a", "a" * 64, volume())
    assert runtime.failed_loads() == {}
    loader.failures = 0
    runtime.run(manifest, tmp_path / "a", "a" * 64, volume())
    assert refs(runtime) == ["a@1.0"]


# -- on a GPU --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_an_unloaded_model_gives_its_device_memory_back(tmp_path: Path) -> None:
    device = cuda_or_skip()
    floats = 64 << 20  # 256 MiB of parameters
    manifest = package(tmp_path / "big", "big", floats=floats)
    runtime = InferenceRuntime(device)
    try:
        before = torch.cuda.memory_allocated(device)
        runtime.run(manifest, tmp_path / "big", "b" * 64, volume())
        (loaded,) = runtime.loaded()
        assert loaded.device == device and loaded.memory_bytes == size_of(floats)
        assert torch.cuda.memory_allocated(device) - before >= size_of(floats)
        runtime.retain([])
        assert runtime.loaded() == []
        assert torch.cuda.memory_allocated(device) - before < size_of(floats) // 16
    finally:
        runtime.close()
