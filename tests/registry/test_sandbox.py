"""The child process model code runs in: its answer, its limits, and a server that nothing in it can touch."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from gateway.errors import ModelError
from gateway.registry import dryrun
from gateway.registry.sandbox import SandboxLimits, run_in_child

LIMITS = SandboxLimits(timeout_s=60, memory_bytes=2 << 30)


@pytest.fixture(autouse=True)
def _targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting for its parent to reap it is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_the_answer_comes_back_and_the_server_is_untouched() -> None:
    before = (os.environ.get("GATEWAY_SANDBOX_PROBE"), dryrun.DEFAULT_SPATIAL, resource.getrlimit(resource.RLIMIT_AS))
    answer = run_in_child("sandbox_targets:meddle", {"x": [1, 2]}, LIMITS, "dry run")
    assert answer["echo"] == {"x": [1, 2]} and answer["pid"] != os.getpid()
    assert answer["address_space"] == LIMITS.memory_bytes
    after = (os.environ.get("GATEWAY_SANDBOX_PROBE"), dryrun.DEFAULT_SPATIAL, resource.getrlimit(resource.RLIMIT_AS))
    assert after == before and before[0] is None


def test_a_gateway_error_keeps_its_reason() -> None:
    with pytest.raises(ModelError) as refused:
        run_in_child("sandbox_targets:refuse", {"what": "this"}, LIMITS, "dry run")
    assert refused.value.reason == "dry run: refused this"


def test_the_time_limit_stops_the_child_and_what_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    limits = SandboxLimits(timeout_s=5, memory_bytes=LIMITS.memory_bytes)
    with pytest.raises(ModelError) as stopped:
        run_in_child("sandbox_targets:hang", {"pid_file": str(pid_file)}, limits, "dry run")
    assert stopped.value.reason == (
        "dry run: did not finish within the time limit of 5 s (models.sandbox_timeout_s); its process was stopped"
    )
    if pid_file.exists():  # the child got as far as starting its own process: that one is gone too
        assert not alive(int(pid_file.read_text()))


def test_the_memory_limit_is_named() -> None:
    limits = SandboxLimits(timeout_s=60, memory_bytes=1 << 30)
    with pytest.raises(ModelError) as refused:
        run_in_child("sandbox_targets:allocate", {"bytes": 2 << 30}, limits, "dry run")
    assert refused.value.reason.startswith("MemoryError")
    assert "over the memory limit of 1073741824 bytes (1 GiB): models.sandbox_memory_bytes" in refused.value.reason
    assert run_in_child("sandbox_targets:allocate", {"bytes": 1 << 20}, limits, "dry run") == {"allocated": 1 << 20}


@pytest.mark.parametrize(("target", "how"), [("crash", "killed by SIGABRT"), ("vanish", "exit status 0")])
def test_a_child_that_dies_without_answering(target: str, how: str) -> None:
    with pytest.raises(ModelError) as died:
        run_in_child(f"sandbox_targets:{target}", {}, LIMITS, "dry run")
    assert died.value.reason.startswith(f"dry run: its process ended without an answer ({how}); it may have run")


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_bytes must be positive"):
        SandboxLimits(memory_bytes=0)
