"""How backends report failures: one-line causes, and out-of-memory told apart from every other fault."""

from __future__ import annotations

from pathlib import Path

from gateway.errors import InferenceError, ModelError, OutOfMemory

__all__ = ["forward_error", "is_out_of_memory", "load_error", "reason", "weights_path"]

_MAX_REASON = 300
_OOM_TEXTS = ("out of memory", "failed to allocate memory", "can't allocate memory", "cudaerrormemoryallocation")


def reason(exc: BaseException) -> str:
    """The exception's type and message on one line, shortened to a few hundred characters."""
    message = str(exc)
    if "TorchScript interpreter" in message:  # the interpreter's traceback first, the error itself last
        message = message.strip().splitlines()[-1]
    text = " ".join(message.split())
    name = type(exc).__name__
    line = text if text.startswith(f"{name}:") else f"{name}: {text}" if text else name
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says a device (or host) allocation failed: CUDA OOM in torch, ONNX Runtime's allocator."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_TEXTS)


def forward_error(exc: BaseException, ref: str, device: str) -> InferenceError:
    """The gateway error for an exception raised by a forward pass of model ``ref`` on ``device``."""
    if isinstance(exc, InferenceError):
        return exc
    if is_out_of_memory(exc):
        return OutOfMemory(f"{ref} ran out of memory on {device}: {reason(exc)}")
    return InferenceError(f"{ref} failed on {device}: {reason(exc)}")


def load_error(path: Path, exc: BaseException) -> ModelError:
    """The gateway error for weights at ``path`` that fail to load."""
    return ModelError(f"cannot load model weights {path.name}: {reason(exc)}")


def weights_path(folder: Path, weights: str, *, directory: bool = False) -> Path:
    """``folder / weights``, checked to exist (as a directory for a bundle, else as a file).

    Raises
    ------
    ModelError
        Naming the missing file or folder.
    """
    path = folder / weights
    if directory and not path.is_dir():
        raise ModelError(f"model bundle folder {weights} not found in the model package")
    if not directory and not path.is_file():
        raise ModelError(f"model weights file {weights} not found in the model package")
    return path
