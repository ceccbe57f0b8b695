"""What a process loads: the server and the light commands leave torch, MONAI and ONNX Runtime alone until a model
needs them (issue 12). Each check runs in a fresh interpreter, so that what this test session imported does not
count."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.infer.backends import _gpu_driver_present
from gateway.synth.ct import write_synthetic_ct

TESTS = Path(__file__).resolve().parent

#: Loaded on first use by a model of theirs, never with the gateway.
MODEL_RUNTIMES = ("torch", "monai", "onnxruntime")
#: ... and what only a job's stages need (lesions, outlines, DICOM objects), loaded at a job's first use.
STAGE_LIBRARIES = ("scipy", "skimage", "cv2", "highdicom", "nibabel")


def loaded_after(code: str, names: tuple[str, ...] = MODEL_RUNTIMES) -> list[str]:
    """Which of ``names`` a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {names!r} if m in sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=TESTS, check=True
    )
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def imported_by_command(*args: object) -> set[str]:
    """The modules ``python -m gateway ARGS`` imports (``-X importtime``); the command must succeed."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gateway", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 0, "\n".join(line for line in lines if not line.startswith("import time:"))
    modules = {m.group(1) for line in lines if (m := re.match(r"import time:.*\|\s*(\S+)$", line))}
    assert "gateway.cli" in modules, "the import times were read"
    return modules


def test_importing_the_server_loads_no_model_runtime() -> None:
    assert loaded_after("import gateway.api.app", MODEL_RUNTIMES + STAGE_LIBRARIES) == []


@pytest.mark.skipif(_gpu_driver_present(), reason="with a GPU driver, device 'auto' asks torch how many GPUs there are")
def test_a_started_server_without_models_loads_no_model_runtime() -> None:
    start = (
        "import tempfile, pathlib\n"
        "from conftest import api_client, make_settings\n"
        "from gateway.api.app import create_app\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    with api_client(create_app(make_settings(pathlib.Path(d)))) as client:\n"
        "        assert client.get('/healthz').status_code == 200\n"
        "        assert client.get('/api/models').json() == []\n"
    )
    assert loaded_after(start, MODEL_RUNTIMES + STAGE_LIBRARIES) == []


def test_gateway_volume_imports_no_model_runtime_nor_settings(tmp_path: Path) -> None:
    write_synthetic_ct(tmp_path / "ct", 4, rows=32, columns=32)
    modules = imported_by_command("volume", tmp_path / "ct", "-o", tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.nii"))) == 1
    assert {"gateway.assemble.convert", "nibabel", "pydicom"} <= modules, "the command did its work"
    assert not modules & {*MODEL_RUNTIMES, "pydantic_settings", "gateway.config", "fastapi", "sqlalchemy"}


@pytest.mark.parametrize(
    "args",
    [("--help",), ("volume", "--help"), ("echo", "--help"), ("send", "--help"), ("synth", "ct", "--help")],
    ids=lambda args: " ".join(args),
)
def test_light_commands_import_no_model_runtime_nor_settings(args: tuple[str, ...]) -> None:
    modules = imported_by_command(*args)
    assert not modules & {*MODEL_RUNTIMES, "pydantic_settings", "gateway.config"}


def test_a_server_on_sqlite_needs_no_postgresql_driver() -> None:
    """psycopg is the ``postgres`` extra: a gateway on the default SQLite index neither imports nor needs it."""
    start = (
        "import tempfile, pathlib\n"
        "from gateway.api.app import create_app\n"
        "from gateway.config import Settings\n"
        "from gateway.runtime import Gateway\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    store = {'data_dir': pathlib.Path(d), 'min_free_bytes': 0}\n"
        "    gateway = Gateway(Settings(store=store, models={'register_shipped': False}), dimse=False)\n"
        "    gateway.start()\n"
        "    gateway.wake_jobs()\n"
        "    gateway.stop()\n"
    )
    assert loaded_after(start, ("psycopg",)) == []
