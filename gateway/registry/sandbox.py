"""Model code runs in a child process, never in the server: with a time limit, a memory limit, and JSON in and out.

A dry run loads a model, and loading a MONAI bundle may run the bundle's own code when its manifest says
``trust_code: true``; a forward pass may also take all the memory or never end. :func:`run_in_child` runs such a
step in a fresh interpreter (``python -P -m gateway.registry.sandbox``, started with ``subprocess``: a fork+exec
done in C, safe in a server with threads, and unlike ``multiprocessing`` it neither imports the embedding script's
``__main__`` again nor unpickles anything the child sends back). The child

- limits its own address space to ``memory_bytes`` (``RLIMIT_AS``, soft and hard: it cannot raise it again) and
  writes no core file, before it imports the step's module (torch, ONNX Runtime, MONAI all count);
- inherits none of the server's open files or sockets (only stdin, stdout and stderr);
- runs in a session of its own, so that when it runs past ``timeout_s`` it is killed with every process it started;
- gets its request as JSON on stdin and answers with JSON on a private copy of stdout (the model's own prints go
  to stderr); the answer is capped at :data:`MAX_ANSWER_BYTES` and checked by the caller like any other input.

The server's state (its memory, ``os.environ``, module globals, resource limits) is never touched by the child.
What the limits do not make it: the child runs as the gateway's user, so code that is allowed to run at all (a
bundle registered with ``trust_code``) can read and write what that user can. Code is allowed only by an admin's
choice (:mod:`gateway.infer.bundle`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError, ModelError

if TYPE_CHECKING:
    from gateway.config import ModelsSettings

__all__ = ["MAX_ANSWER_BYTES", "SandboxLimits", "run_in_child"]

#: The largest answer a child may send back (a dry-run report is a few hundred bytes).
MAX_ANSWER_BYTES = 1 << 20

_MAX_REASON = 2000
_MEMORY_TEXTS = ("memoryerror", "out of memory", "failed to allocate memory", "cannot allocate memory", "bad_alloc")


@dataclass(frozen=True)
class SandboxLimits:
    """The limits of a child process: wall-clock seconds and bytes of address space.

    The defaults are :class:`gateway.config.ModelsSettings`'s ``sandbox_timeout_s`` and ``sandbox_memory_bytes``.
    """

    timeout_s: float = 300.0
    memory_bytes: int = 8 << 30

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, got {self.memory_bytes}")

    @classmethod
    def from_settings(cls, settings: ModelsSettings) -> SandboxLimits:
        """The limits ``models.sandbox_timeout_s`` and ``models.sandbox_memory_bytes`` set."""
        return cls(settings.sandbox_timeout_s, settings.sandbox_memory_bytes)


# --- the parent's side --------------------------------------------------------------------------------------------


def run_in_child(target: str, payload: dict[str, Any], limits: SandboxLimits, what: str) -> dict[str, Any]:
    """Call ``target(payload)`` in a child process within ``limits`` and return its answer.

    Parameters
    ----------
    target
        ``module:function`` of a function taking and returning JSON-ready dicts (the child imports it from the
        gateway's source folder and ``PYTHONPATH``; the child's current folder is not on its path).
    payload
        Its argument (JSON-ready).
    limits
        The time and memory the child may use.
    what
        What the step is, to start every message with (``dry run``).

    Returns
    -------
    dict
        The function's answer, as the child sent it (the caller checks it).

    Raises
    ------
    ModelError
        The function's own :class:`~gateway.errors.GatewayError` reason (with the memory limit named when the
        child ran out of memory); or that the child ran past the time limit (it and its processes are killed),
        died without answering (a signal, e.g. when it hit the memory limit in native code), answered too much or
        not in JSON, or could not be started.
    """
    request = json.dumps({"target": target, "payload": payload, "memory_bytes": limits.memory_bytes}).encode()
    try:
        child = subprocess.Popen(
            [sys.executable, "-P", "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            env=_child_env(),
        )
    except OSError as exc:
        raise ModelError(f"{what}: cannot start its process: {exc}") from exc
    try:
        raw = _exchange(child, request, limits, what)
    finally:
        _kill_group(child)  # answered, died, or ran out of time: nothing it started may keep running
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
    return _answer(raw, child.returncode, limits, what)


def _child_env() -> dict[str, str]:
    """The parent's environment, with this gateway's source first on the path (``-P`` leaves the cwd out)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _exchange(child: subprocess.Popen[bytes], request: bytes, limits: SandboxLimits, what: str) -> bytes:
    """Send the request, then read the answer until the child closes it (or dies), within the time limit."""
    assert child.stdin is not None and child.stdout is not None, "both were opened as pipes"
    deadline = time.monotonic() + limits.timeout_s
    with contextlib.suppress(BrokenPipeError):  # a child that died at once: told by its exit status below
        child.stdin.write(request)
    with contextlib.suppress(BrokenPipeError):
        child.stdin.close()
    chunks: list[bytes] = []
    size = 0
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise ModelError(
                    f"{what}: did not finish within the time limit of {limits.timeout_s:g} s "
                    "(models.sandbox_timeout_s); its process was stopped"
                )
            chunk = os.read(child.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise ModelError(f"{what}: its process answered more than {MAX_ANSWER_BYTES} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's session (it and whatever it started). The child is not reaped yet, so its id, which is
    the session's, cannot have been taken by another process; a child that had already exited keeps its status."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)


def _answer(raw: bytes, returncode: int | None, limits: SandboxLimits, what: str) -> dict[str, Any]:
    """The child's answer, or the :class:`ModelError` it reports or its death implies."""
    try:
        answer = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict) or not (isinstance(answer.get("result"), dict) or "error" in answer):
        raise ModelError(
            f"{what}: its process ended without an answer ({_exit(returncode)}); it may have run past its memory "
            f"limit of {_size(limits.memory_bytes)} (models.sandbox_memory_bytes)"
        )
    if "error" in answer:
        reason = str(answer["error"])[:_MAX_REASON]
        if answer.get("memory") is True:
            reason += f" (over the memory limit of {_size(limits.memory_bytes)}: models.sandbox_memory_bytes)"
        raise ModelError(reason)
    result: dict[str, Any] = answer["result"]
    return result


def _exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def _size(memory_bytes: int) -> str:
    return f"{memory_bytes} bytes ({memory_bytes / (1 << 30):.3g} GiB)"


# --- the child's side ---------------------------------------------------------------------------------------------


def _limit_memory(memory_bytes: int) -> None:
    """Cap this process's address space (soft and hard, never above the hard limit it has) and its core files."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _is_memory(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, says an allocation failed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = f"{type(current).__name__}: {current}".lower()
        if isinstance(current, MemoryError) or any(marker in text for marker in _MEMORY_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _call(target: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run the target; an exception becomes ``{"error": reason}`` (``memory: true`` when an allocation failed)."""
    try:
        module, _, name = target.partition(":")
        result = getattr(importlib.import_module(module), name)(payload)
        return {"result": result}
    except GatewayError as exc:
        return {"error": str(exc), "memory": _is_memory(exc)}
    except BaseException as exc:  # the child's last word: any failure is reported, never raised
        return {"error": f"{type(exc).__name__}: {exc}", "memory": _is_memory(exc)}


def main() -> int:
    """The child: read the request from stdin, limit memory, run the target, answer on the saved stdout."""
    answer_fd = os.dup(1)
    os.dup2(2, 1)  # prints of the model's code go to stderr, not into the answer
    request = json.loads(sys.stdin.buffer.read())
    _limit_memory(int(request["memory_bytes"]))
    answer = _call(str(request["target"]), request["payload"])
    try:
        data = json.dumps(answer).encode()
    except (TypeError, ValueError) as exc:
        data = json.dumps({"error": f"the answer is not JSON: {exc}"}).encode()
    with os.fdopen(answer_fd, "wb") as out:
        out.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
