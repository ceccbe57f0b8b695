"""``gateway models``: register, list, show, enable, disable, remove; readable errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app

from model_packages import UNET, bundle_package, manifest_dict, onnx_model, write_package, zip_folder

GATEWAY_SCRIPT = Path(sys.executable).with_name("gateway")
#: The environment of most tests here: without the shipped models (list, show, enable and disable register them).
NO_SHIPPED = {"GATEWAY_MODELS__REGISTER_SHIPPED": "false"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def models(data_dir: Path, *args: object, env: Mapping[str, str] = NO_SHIPPED) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["models", *map(str, args), "--data-dir", str(data_dir)], env=dict(env))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_error(outcome: tuple[int, str, str], code: int, *fragments: str) -> None:
    exit_code, _, stderr = outcome
    assert exit_code == code, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def test_register_list_show_enable_disable_remove(data_dir: Path, tmp_path: Path) -> None:
    v1 = write_package(tmp_path / "v1", manifest_dict(version="1.0.0"))
    v2 = zip_folder(write_package(tmp_path / "v2", manifest_dict(version="2.0.0")), tmp_path / "v2.zip")
    code, out, _ = models(data_dir, "register", v1)
    assert code == 0 and out.startswith("tiny-seg@1.0.0: active, sha256 ")
    code, out, _ = models(data_dir, "register", v2)
    assert code == 0 and out.startswith("tiny-seg@2.0.0: active")

    code, out, _ = models(data_dir, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "VERSION", "ACTIVE", "ENABLED", "BACKEND", "SHA256"]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["tiny-seg", "1.0.0", "-", "yes", "onnx"],
        ["tiny-seg", "2.0.0", "yes", "yes", "onnx"],
    ]

    code, out, _ = models(data_dir, "show", "tiny-seg")
    shown = json.loads(out)
    assert code == 0 and shown["ref"] == "tiny-seg@2.0.0" and shown["dry_run"]["output_shape"] == [1, 3, 8, 16, 16]
    assert Path(shown["folder"]) == (data_dir / "models" / "tiny-seg" / "2.0.0").resolve()

    assert models(data_dir, "enable", "tiny-seg@1.0.0")[:2] == (0, "tiny-seg@1.0.0: enabled, active\n")
    assert json.loads(models(data_dir, "show", "tiny-seg")[1])["version"] == "1.0.0"
    assert models(data_dir, "disable", "tiny-seg")[:2] == (0, "tiny-seg: disabled\n")
    assert "no " in models(data_dir, "list")[1].splitlines()[1]
    assert models(data_dir, "remove", "tiny-seg@1.0.0")[:2] == (0, "tiny-seg@1.0.0: removed\n")
    assert json.loads(models(data_dir, "show", "tiny-seg")[1])["version"] == "2.0.0"


def test_readable_errors(data_dir: Path, tmp_path: Path) -> None:
    bad = write_package(tmp_path / "bad", manifest_dict(inferense={}))
    assert_error(models(data_dir, "register", bad), 2, "inferense", "Extra inputs are not permitted")
    assert_error(models(data_dir, "register", tmp_path / "missing"), 2, "no such file or folder")
    good = write_package(tmp_path / "good", manifest_dict())
    assert models(data_dir, "register", good)[0] == 0
    other = write_package(tmp_path / "other", manifest_dict(), weights=onnx_model(3, seed=5))
    assert_error(models(data_dir, "register", other), 1, "already registered with other weights")
    mismatch = write_package(tmp_path / "mismatch", manifest_dict(version="2", labels=4), out_channels=3)
    assert_error(models(data_dir, "register", mismatch), 2, "dry run: output has 3 channels", "(needs 5)")
    assert_error(models(data_dir, "show", "nothing"), 1, "no model 'nothing'")
    assert_error(models(data_dir, "enable", "tiny-seg@9"), 1, "no model tiny-seg@9")
    assert_error(models(data_dir, "remove", "tiny-seg"), 2, "remove takes NAME@VERSION")
    assert_error(models(data_dir, "disable", "tiny-seg@1.0.0"), 2, "disable takes a model name")


def test_the_console_script(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", manifest_dict())
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(NO_SHIPPED, GATEWAY_STORE__DATA_DIR=str(tmp_path / "data"))

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        command = [str(GATEWAY_SCRIPT), "models", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)

    registered = run("register", package)
    assert registered.returncode == 0, registered.stderr
    listed = run("list")
    assert "tiny-seg" in listed.stdout and listed.returncode == 0
    unknown = run("show", "nothing@1")
    assert (
        unknown.returncode == 1 and unknown.stderr == f"error: no model nothing@1 in {(tmp_path / 'data').resolve()}\n"
    )
    assert listed.stderr == f"data folder: {(tmp_path / 'data').resolve()}\n", (
        "each command names the data folder it used"
    )


def listed(out: str) -> dict[str, tuple[str, str]]:
    """``gateway models list``'s rows: ``name@version -> (active, enabled)``."""
    rows = [line.split() for line in out.splitlines()[1:]]
    return {f"{name}@{version}": (active, enabled) for name, version, active, enabled, *_ in rows}


def test_the_shipped_models_are_listed_disabled_and_enabled_on_a_fresh_data_dir(data_dir: Path) -> None:
    shipped = {"GATEWAY_MODELS__REGISTER_SHIPPED": "true"}  # the repository's models/, as `gateway serve` registers
    code, out, _ = models(data_dir, "enable", "ct-nodule-unet", env=shipped)
    assert (code, out) == (0, "ct-nodule-unet@1.1.0: enabled, active\n")
    code, out, _ = models(data_dir, "list", env=shipped)
    assert code == 0 and listed(out) == {
        "adc-dwi@1.0.0": ("yes", "no"),
        "ct-nodule-unet@1.1.0": ("yes", "yes"),
        "ct-tissue@1.0.0": ("yes", "no"),
    }
    assert models(data_dir, "remove", "ct-tissue@1.0.0", env=shipped)[:2] == (0, "ct-tissue@1.0.0: removed\n")
    assert models(data_dir, "disable", "adc-dwi", env=shipped)[:2] == (0, "adc-dwi: disabled\n")
    code, out, _ = models(data_dir, "list", env=shipped)
    assert listed(out) == {"adc-dwi@1.0.0": ("yes", "no"), "ct-nodule-unet@1.1.0": ("yes", "yes")}, "removal sticks"
    shown = json.loads(models(data_dir, "show", "adc-dwi", env=shipped)[1])
    assert shown["ref"] == "adc-dwi@1.0.0" and not shown["enabled"]


def test_show_and_disable_register_the_shipped_models_first(data_dir: Path, tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    write_package(shipped / "tiny-seg", manifest_dict())
    env = {"GATEWAY_MODELS__SHIPPED_DIR": str(shipped)}
    assert json.loads(models(data_dir, "show", "tiny-seg", env=env)[1])["enabled"] is False
    assert models(tmp_path / "other", "disable", "tiny-seg", env=env)[:2] == (0, "tiny-seg: disabled\n")
    assert_error(models(tmp_path / "third", "show", "tiny-seg"), 1, "no model 'tiny-seg'")  # register_shipped: false


def test_registering_a_version_of_a_disabled_model_says_so(data_dir: Path, tmp_path: Path) -> None:
    assert models(data_dir, "register", write_package(tmp_path / "v1", manifest_dict()))[0] == 0
    assert models(data_dir, "disable", "tiny-seg")[0] == 0
    code, out, _ = models(data_dir, "register", write_package(tmp_path / "v2", manifest_dict(version="2.0.0")))
    assert code == 0
    assert out.startswith("tiny-seg@2.0.0: active, disabled (`gateway models enable tiny-seg` to use it), sha256 ")


def test_a_package_with_trusted_code_needs_the_flag(data_dir: Path, tmp_path: Path) -> None:
    package = bundle_package(tmp_path / "trusted", {"network_def": {**UNET, "channels": "$[4, 8]"}}, trust_code=True)
    assert_error(models(data_dir, "register", package), 2, "trust_code: true", "--trust-code")
    code, out, _ = models(data_dir, "register", package, "--trust-code")
    assert code == 0 and out.startswith("tiny-bundle@1.0.0: active, sha256 "), out
    allowed = json.loads(models(data_dir, "show", "tiny-bundle")[1])["dry_run"]["code_allowed_by"]
    assert allowed.startswith("operator ") and allowed.endswith(" (gateway models register --trust-code)")
    untrusted = bundle_package(tmp_path / "untrusted", {"network_def": {**UNET, "channels": "$[4, 8]"}}, version="2")
    assert_error(models(data_dir, "register", untrusted, "--trust-code"), 2, "network_def::channels = '$[4, 8]'")


def test_the_dry_run_limits_come_from_the_settings(data_dir: Path, tmp_path: Path) -> None:
    env = {**NO_SHIPPED, "GATEWAY_MODELS__SANDBOX_TIMEOUT_S": "0.001"}
    package = write_package(tmp_path / "pkg", manifest_dict())
    assert_error(models(data_dir, "register", package, env=env), 2, "time limit of 0.001 s (models.sandbox_timeout_s)")
