"""Registering a package as an attacker would write it: bundle code, pickles, dry runs that never end or eat memory.

Nothing of a package runs in the server: a bundle's code is refused (it is named) unless an admin trusted it, and
then it runs in the dry run's child process; a pickle is refused by ``weights_only``; a runaway dry run is stopped.
Each refused package leaves nothing behind, and the registry carries on.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gateway.config import ModelsSettings, StoreSettings
from gateway.errors import ManifestError, ModelError
from gateway.infer.backends import load_backend
from gateway.registry import dryrun
from gateway.registry.dryrun import dry_run_in_child
from gateway.registry.registry import Registry, RegistryIndex
from gateway.registry.sandbox import SandboxLimits

from model_packages import UNET, bundle_package, manifest_dict, write_package, zip_folder

ADMIN = "admin token 'ops'"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[RegistryIndex]:
    idx = RegistryIndex(StoreSettings(data_dir=tmp_path / "data"))
    try:
        yield idx
    finally:
        idx.close()


@pytest.fixture
def registry(index: RegistryIndex) -> Registry:
    return Registry.from_settings(index, ModelsSettings(sandbox_timeout_s=120))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file that the package's code would create: it must not exist after a refusal."""
    return tmp_path / "code-ran"


def assert_left_nothing(registry: Registry) -> None:
    assert list(registry.staging.iterdir()) == []
    assert [p.name for p in registry.root.iterdir()] == [".staging"]
    assert registry.list() == []


def assert_still_registers(registry: Registry, tmp_path: Path) -> None:
    """The registry (and the process it lives in) carries on: a good package registers."""
    model = registry.register(write_package(tmp_path / "good", manifest_dict("good-model")))
    assert model.ref == "good-model@1.0.0" and model.dry_run["output_shape"] == [1, 3, 8, 16, 16]


def touch(path: Path) -> str:
    return f"$__import__('os').system('touch {path}')"


# --- a bundle's code ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_archive", [False, True])
def test_bundle_code_is_refused_named_and_never_run(
    registry: Registry, tmp_path: Path, marker: Path, as_archive: bool
) -> None:
    config = {"setup": touch(marker), "network_def": {**UNET, "_requires_": "@setup"}}
    package: Path = bundle_package(tmp_path / "evil", config)
    if as_archive:
        package = zip_folder(package, tmp_path / "evil.zip")
    with pytest.raises(ModelError) as refused:
        registry.register(package)
    assert refused.value.reason == (
        "dry run: cannot load the model: MONAI bundle bundle: cannot build network_def from inference.json: "
        f"setup = \"$__import__('os').system('touch {marker}')\": an expression (Python code); bundle code runs "
        "only for a package whose manifest says trust_code: true, registered by an admin"
    )
    assert not marker.exists()
    assert_left_nothing(registry)
    assert_still_registers(registry, tmp_path)


@pytest.mark.parametrize(
    ("network_def", "named"),
    [
        ({"_target_": "os.system", "command": "touch {marker}"}, "network_def::_target_ = 'os.system'"),
        ({"_target_": "builtins.eval", "source": "__import__('os').system('touch {marker}')"}, "'builtins.eval'"),
        ({**UNET, "channels": "%{marker}::x"}, "network_def::channels = '%"),
    ],
)
def test_targets_and_macros_are_code_too(
    registry: Registry, tmp_path: Path, marker: Path, network_def: dict[str, Any], named: str
) -> None:
    filled = {k: v.format(marker=marker) if isinstance(v, str) else v for k, v in network_def.items()}
    with pytest.raises(ModelError, match="cannot build network_def") as refused:
        registry.register(bundle_package(tmp_path / "evil", {"network_def": filled}))
    assert named in refused.value.reason
    assert not marker.exists()
    assert_left_nothing(registry)


def test_a_plain_bundle_registers_without_trust(registry: Registry, tmp_path: Path) -> None:
    config = {"network_def": UNET, "network": "$@network_def.to(@device)", "device": "$torch.device('cpu')"}
    model = registry.register(bundle_package(tmp_path / "plain", config))
    assert model.dry_run["output_shape"] == [1, 3, 8, 16, 16] and "code_allowed_by" not in model.dry_run
    assert not model.manifest.trust_code


def test_trusted_code_runs_in_the_child_only(registry: Registry, tmp_path: Path, marker: Path) -> None:
    setup = (
        f"$__import__('pathlib').Path('{marker}').write_text(str(__import__('os').getpid())) "
        "or __import__('os').environ.__setitem__('GATEWAY_SANDBOX_PROBE', 'changed') "
        "or setattr(__import__('gateway.registry.dryrun').registry.dryrun, 'DEFAULT_SPATIAL', (1, 1, 1))"
    )
    package = bundle_package(
        tmp_path / "trusted", {"setup": setup, "network_def": {**UNET, "_requires_": "@setup"}}, trust_code=True
    )
    with pytest.raises(ModelError) as refused:
        registry.register(package)
    assert refused.value.reason == (
        "tiny-bundle@1.0.0: the manifest says trust_code: true (the bundle's code would run in the gateway); only "
        "an admin may register it: an admin token over HTTP, or `gateway models register --trust-code`"
    )
    assert not marker.exists()
    assert_left_nothing(registry)

    spatial = dryrun.DEFAULT_SPATIAL
    model = registry.register(package, code_allowed_by=ADMIN)
    assert model.manifest.trust_code and model.dry_run["code_allowed_by"] == ADMIN
    assert model.dry_run["output_shape"] == [1, 3, 8, 16, 16]
    assert int(marker.read_text()) != os.getpid(), "the expression ran, in another process"
    assert "GATEWAY_SANDBOX_PROBE" not in os.environ and spatial == dryrun.DEFAULT_SPATIAL
    assert registry.register(package).ref == model.ref, "registered already: nothing runs, nothing to allow"


def test_a_trusted_package_is_not_registered_from_the_shipped_folder(
    registry: Registry, tmp_path: Path, marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shipped = tmp_path / "shipped"
    bundle_package(
        shipped / "bundle", {"setup": touch(marker), "network_def": {**UNET, "_requires_": "@setup"}}, trust_code=True
    )
    with caplog.at_level(logging.WARNING, logger="gateway.registry.registry"):
        assert registry.register_shipped(shipped) == []
    assert "only an admin may register it" in caplog.text and not marker.exists()


def test_trust_code_is_for_bundles_only(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="trust_code applies to monai-bundle packages only"):
        registry.register(write_package(tmp_path / "onnx", manifest_dict(trust_code=True)), code_allowed_by=ADMIN)


def test_a_bundle_changed_on_disk_after_registration_still_runs_no_code(
    registry: Registry, tmp_path: Path, marker: Path
) -> None:
    model = registry.register(bundle_package(tmp_path / "plain", {"network_def": UNET}))
    config = model.folder / "bundle" / "configs" / "inference.json"
    config.write_text(f'{{"network_def": "{touch(marker)}"}}')
    with pytest.raises(ModelError, match=r"network_def = \"\$__import__"):
        load_backend(model.manifest, model.folder, "cpu")  # as a worker loads it for inference
    assert not marker.exists()


# --- pickles ------------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this would run ``touch path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.path}",)


def saved_by_torch(obj: object, path: Path) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
@pytest.mark.parametrize("trusted", [False, True])
def test_a_malicious_pickle_is_refused_and_does_not_run(
    registry: Registry, tmp_path: Path, marker: Path, form: str, trusted: bool
) -> None:
    payload = Payload(marker)
    weights = pickle.dumps(payload) if form == "pickle" else saved_by_torch(payload, tmp_path / "w.pt")
    package = bundle_package(tmp_path / "evil", {"network_def": UNET}, weights=weights, trust_code=trusted)
    with pytest.raises(ModelError, match=r"^dry run: cannot load the model: cannot load model weights model\.pt: "):
        registry.register(package, code_allowed_by=ADMIN if trusted else None)
    assert not marker.exists()
    assert_left_nothing(registry)


def test_a_pickle_as_torchscript_is_refused_and_does_not_run(registry: Registry, tmp_path: Path, marker: Path) -> None:
    data = manifest_dict(backend="torchscript", weights="model.pt")
    with pytest.raises(ModelError, match=r"cannot load model weights model\.pt"):
        registry.register(write_package(tmp_path / "evil", data, weights=pickle.dumps(Payload(marker))))
    assert not marker.exists()
    assert_left_nothing(registry)


# --- runaway dry runs ---------------------------------------------------------------------------------------------


class Spin(torch.nn.Module):
    """A model whose forward pass never ends on a positive input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while bool(x.sum() > -1.0):
            x = x + 1.0
        return x


@pytest.mark.slow
def test_a_dry_run_past_the_time_limit_fails_cleanly(index: RegistryIndex, tmp_path: Path) -> None:
    registry = Registry(index, functools.partial(dry_run_in_child, limits=SandboxLimits(timeout_s=8)))
    folder = write_package(tmp_path / "spin", manifest_dict(backend="torchscript", weights="model.pt"), weights=b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        torch.jit.save(torch.jit.script(Spin()), str(folder / "model.pt"))
    with pytest.raises(ModelError) as stopped:
        registry.register(folder)
    assert stopped.value.reason == (
        "dry run: did not finish within the time limit of 8 s (models.sandbox_timeout_s); its process was stopped"
    )
    assert_left_nothing(registry)
    assert_still_registers(Registry(index), tmp_path)


def test_a_dry_run_past_the_memory_limit_fails_cleanly(index: RegistryIndex, tmp_path: Path) -> None:
    limits = SandboxLimits(timeout_s=120, memory_bytes=2 << 30)
    registry = Registry(index, functools.partial(dry_run_in_child, limits=limits))
    huge = manifest_dict(inference={"patch_size": [512, 512, 512]})  # 0.5 GiB in, 1.5 GiB out
    with pytest.raises(ModelError) as refused:
        registry.register(write_package(tmp_path / "huge", huge))
    assert "memory limit of 2147483648 bytes (2 GiB)" in refused.value.reason
    assert "models.sandbox_memory_bytes" in refused.value.reason
    assert_left_nothing(registry)
    assert_still_registers(registry, tmp_path)
