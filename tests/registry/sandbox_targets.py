"""Functions the sandbox tests run in a child process (imported there from PYTHONPATH)."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from gateway.errors import ModelError
from gateway.registry import dryrun


def meddle(payload: dict[str, Any]) -> dict[str, Any]:
    """Change what a model's code could change in its process, and say where it ran."""
    os.environ["GATEWAY_SANDBOX_PROBE"] = "changed"
    dryrun.DEFAULT_SPATIAL = (1, 1, 1)
    return {"pid": os.getpid(), "address_space": resource.getrlimit(resource.RLIMIT_AS)[0], "echo": payload}


def refuse(payload: dict[str, Any]) -> dict[str, Any]:
    raise ModelError(f"dry run: refused {payload['what']}")


def hang(payload: dict[str, Any]) -> dict[str, Any]:
    """Start a long-running process, record its id, and never answer."""
    sleeper = subprocess.Popen(["sleep", "600"])
    Path(payload["pid_file"]).write_text(str(sleeper.pid))
    time.sleep(600)
    return {}


def allocate(payload: dict[str, Any]) -> dict[str, Any]:
    block = bytearray(payload["bytes"])
    return {"allocated": len(block)}


def crash(payload: dict[str, Any]) -> dict[str, Any]:
    os.abort()


def vanish(payload: dict[str, Any]) -> dict[str, Any]:
    os._exit(0)
