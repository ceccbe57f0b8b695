"""A MONAI bundle's network without its code: what an untrusted config may hold, and what it may not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from tiny_models import UNET, save_bundle, unet, write_package

from gateway.errors import ModelError
from gateway.infer.backends import load_backend
from gateway.infer.bundle import build_network


def bundle(tmp_path: Path, config: dict[str, Any], *, yaml_config: bool = False) -> Path:
    folder = tmp_path / "bundle"
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    if yaml_config:
        (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    else:
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
    return folder


def same_network(built: torch.nn.Module, reference: torch.nn.Module) -> bool:
    built.load_state_dict(reference.state_dict())
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.inference_mode():
        return bool(torch.allclose(built.eval()(x), reference(x)))


def test_a_plain_network_def_is_built_as_monai_builds_it(tmp_path: Path) -> None:
    config = {"network_def": UNET, "network": "$@network_def.to(@device)", "device": "$torch.device('cpu')"}
    assert same_network(build_network(bundle(tmp_path, config), trust_code=False), unet())


def test_short_names_references_and_yaml(tmp_path: Path) -> None:
    args = {k: v for k, v in UNET.items() if k != "_target_"}
    config = {
        "channels": [4, 8],
        "shapes": {"in": 1, "out": 2},
        "network_def": {**args, "_target_": "UNet", "channels": "@channels", "in_channels": "@shapes#in",
                        "out_channels": "@shapes::out", "_desc_": "a tiny UNet"},
    }  # fmt: skip
    assert same_network(build_network(bundle(tmp_path, config, yaml_config=True), trust_code=False), unet())


def test_an_item_referred_to_twice_is_built_once(tmp_path: Path) -> None:
    config = {
        "conv": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 1, "kernel_size": 1},
        "network_def": {"_target_": "torch.nn.ModuleList", "modules": ["@conv", "@conv"]},
    }
    built = build_network(bundle(tmp_path, config), trust_code=False)
    assert isinstance(built, torch.nn.ModuleList) and built[0] is built[1]


def test_a_disabled_component_is_none_and_a_constructor_error_is_named(tmp_path: Path) -> None:
    off = {"_target_": "torch.nn.Conv3d", "_disabled_": "True", "in_channels": 1, "out_channels": 1, "kernel_size": 1}
    config = {"network_def": {"_target_": "torch.nn.ModuleDict", "modules": {"a": UNET, "b": "@off"}}, "off": off}
    built = build_network(bundle(tmp_path, config), trust_code=False)
    assert isinstance(built, torch.nn.ModuleDict) and built["b"] is None
    config["network_def"] = {"_target_": "torch.nn.Sequential", "args": ["@off"]}  # Sequential takes *args
    with pytest.raises(ModelError, match=r"cannot build network_def from inference\.json: TypeError: "):
        build_network(bundle(tmp_path, config), trust_code=False)


MARK = "marker-file"


@pytest.mark.parametrize(
    ("network_def", "extra", "named"),
    [
        ({**UNET, "channels": f"$__import__('os').system('touch {MARK}') or [4, 8]"}, {}, "network_def::channels = "),
        ({**UNET, "channels": "@setup"}, {"setup": f"$__import__('os').system('touch {MARK}')"}, "setup = "),
        ({**UNET, "_requires_": "@setup"}, {"setup": f"$__import__('os').system('touch {MARK}')"}, "setup = "),
        ({**UNET, "_requires_": "#setup"}, {}, None),  # a plain string: checked, not code, not used
        ({"_target_": "os.system", "command": f"touch {MARK}"}, {}, "network_def::_target_ = 'os.system'"),
        ({"_target_": "builtins.eval", "source": "1"}, {}, "network_def::_target_ = 'builtins.eval'"),
        ({"_target_": "monai.networks.utils.save_state", "src": {}, "path": MARK}, {}, "'monai.networks.utils.save_"),
        ({"_target_": "monai.transforms.Compose"}, {}, "network_def::_target_ = 'monai.transforms.Compose'"),
        ({"_target_": "torch.nn.modules.module.register_module_forward_hook"}, {}, "_target_ = 'torch.nn.modules"),
        ({"_target_": "monai.networksx.Net"}, {}, "network_def::_target_ = 'monai.networksx.Net'"),
        ({"_target_": "NoSuchNet"}, {}, "network_def::_target_ = 'NoSuchNet': not a MONAI component"),
        ({**UNET, "_mode_": "callable"}, {}, "network_def::_mode_ = 'callable'"),
        ({**UNET, "_disabled_": "$True"}, {}, "network_def::_disabled_ = '$True'"),
        ({**UNET, "channels": "%configs/other.json::channels"}, {}, "network_def::channels = '%configs/"),
        ({**UNET, "pretrained_url": "http://127.0.0.1:1/x.pth"}, {}, "network_def::pretrained_url = 'http"),
        ({**UNET, "channels": "@nowhere"}, {}, "network_def::channels = '@nowhere': refers to 'nowhere'"),
        ({**UNET, "channels": "@::a"}, {}, "a relative reference"),
        ({**UNET, "channels": "@a"}, {"a": "@b", "b": "@a"}, "a reference cycle (a -> b -> a)"),
        ("$__import__('os').system('touch marker-file')", {}, "network_def = \"$__import__('os').system("),
    ],
)
def test_code_in_an_untrusted_bundle_is_refused_and_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network_def: Any, extra: dict[str, Any], named: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = bundle(tmp_path, {"network_def": network_def, **extra})
    if named is None:
        assert isinstance(build_network(folder, trust_code=False), torch.nn.Module)
        return
    with pytest.raises(ModelError) as refused:
        build_network(folder, trust_code=False)
    assert refused.value.reason.startswith("MONAI bundle bundle: cannot build network_def from inference.json: ")
    assert named in refused.value.reason
    assert refused.value.reason.endswith("trust_code: true, registered by an admin")
    assert not (tmp_path / MARK).exists()


def test_a_trusted_bundle_is_read_by_monai(tmp_path: Path) -> None:
    config = {"network_def": {**UNET, "channels": "$[4, 8]"}}
    folder = bundle(tmp_path, config)
    with pytest.raises(ModelError, match=r"network_def::channels = '\$\[4, 8\]': an expression"):
        build_network(folder, trust_code=False)
    assert same_network(build_network(folder, trust_code=True), unet())


def test_loading_applies_the_registered_manifests_trust(tmp_path: Path) -> None:
    """The worker's load: a bundle whose config was changed on disk still runs no code without trust_code."""
    save_bundle(tmp_path / "bundle")
    untrusted = write_package(tmp_path, "monai-bundle", "bundle")
    batch = np.random.default_rng(1).random((1, 1, 8, 8, 8), dtype=np.float32)
    assert load_backend(untrusted, tmp_path, "cpu").run(batch).shape == (1, 2, 8, 8, 8)
    config = tmp_path / "bundle" / "configs" / "inference.json"
    config.write_text(json.dumps({"network_def": {**UNET, "channels": "$[4, 8]"}}))
    with pytest.raises(ModelError, match=r"network_def::channels = '\$\[4, 8\]'"):
        load_backend(untrusted, tmp_path, "cpu")
    trusted = write_package(tmp_path, "monai-bundle", "bundle", trust_code=True)
    assert load_backend(trusted, tmp_path, "cpu").run(batch).shape == (1, 2, 8, 8, 8)


def test_config_problems(tmp_path: Path) -> None:
    folder = bundle(tmp_path, {"other": 1})
    with pytest.raises(ModelError, match=r"inference\.json has no network_def"):
        build_network(folder, trust_code=False)
    (folder / "configs" / "inference.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"MONAI bundle config inference\.json is not readable: JSONDecodeError"):
        build_network(folder, trust_code=False)
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": {**UNET, "channels": deep}}))
    with pytest.raises(ModelError, match="nested deeper than 64"):
        build_network(folder, trust_code=False)
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": [UNET]}))
    with pytest.raises(ModelError, match="network_def is a list, not a torch module"):
        build_network(folder, trust_code=False)
