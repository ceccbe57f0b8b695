"""The models loaded on a device: loaded on first use, kept within a memory budget, unloaded once no longer active.

:class:`LoadedModels` keeps one backend and one :class:`~gateway.infer.batcher.Batcher` per model version (name,
version, weights SHA-256, device). A caller *leases* a model for the forward passes of one volume
(:meth:`LoadedModels.lease`); a leased model is never unloaded under it. A model leaves memory

- when it is no longer active: :meth:`LoadedModels.retain` takes the registry's active versions, read for every job,
  so a version replaced, disabled or removed (by ``gateway models`` in another process too) is unloaded, at once if
  idle, else when its last lease ends;
- when the models loaded on its device exceed ``memory_budget_bytes``: the least recently used idle ones go first,
  before a load (to make room for the model's size as measured when it was last loaded, else its weights' size on
  disk) and after it (to fit its measured size). A model larger than the budget still loads, beside no idle model,
  with a warning.

A model that fails to load is remembered with the reason, against its registration's ``changed_at``
(:attr:`gateway.registry.registry.RegisteredModel.changed_at`): its jobs fail at once with that reason until the
version is registered again or its model enabled. Running out of device memory while loading is not remembered: the
idle models are unloaded and the load tried once more, and if that fails too, only this job fails.

The memory of a loaded model: a torch module's parameters and buffers; for any other backend what torch's CUDA
allocator gained during the load, or when that is nothing (ONNX Runtime, whose allocator torch cannot see; the CPU)
an estimate, the size of its weights on disk. :meth:`LoadedModels.loaded` says which one each figure is. The
activations of forward passes are not counted: leave room for them beside the budget.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.errors import GatewayError, ModelError
from gateway.infer.backend import Backend
from gateway.infer.backends import load_backend
from gateway.infer.batcher import Batcher, BatcherStats
from gateway.infer.failures import is_out_of_memory, reason
from gateway.metrics import GatewayMetrics
from gateway.registry.manifest import Manifest

__all__ = ["LoadedModel", "LoadedModels", "ModelVersionRef"]

log = logging.getLogger(__name__)

Key = tuple[str, str, str, str]  # name, version, sha256, device asked for
Version = tuple[str, str, str]  # name, version, sha256

MEASURED_TORCH = "parameters and buffers"
MEASURED_CUDA = "device memory allocated by the load"
ESTIMATED_DISK = "estimate: weights size on disk"


class ModelVersionRef(Protocol):
    """What :meth:`LoadedModels.retain` needs of a model version (a :class:`~gateway.registry.registry.RegisteredModel`
    has it)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class LoadedModel:
    """A model version in memory, as the API and ``gateway`` show it.

    ``memory_bytes`` is measured or estimated as ``measured`` says; ``last_used`` is a Unix time; ``in_use`` the
    number of volumes running through it now; ``retiring`` whether it is no longer active (unloaded when idle).
    """

    name: str
    version: str
    sha256: str
    device: str
    memory_bytes: int
    measured: str
    loaded_at: float
    last_used: float
    in_use: int
    retiring: bool

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "device": self.device,
            "memory_bytes": self.memory_bytes,
            "measured": self.measured,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "in_use": self.in_use,
            "retiring": self.retiring,
        }


@dataclass(eq=False)
class _Entry:
    key: Key
    ref: str
    backend: Backend
    batcher: Batcher
    memory_bytes: int
    measured: str
    loaded_at: float
    last_used: float
    tick: int
    users: int = 0
    retired: str | None = None  # why it is unloaded once idle

    @property
    def device(self) -> str:
        return self.backend.device

    def public(self) -> LoadedModel:
        name, version, sha256, _ = self.key
        return LoadedModel(
            name,
            version,
            sha256,
            self.device,
            self.memory_bytes,
            self.measured,
            self.loaded_at,
            self.last_used,
            self.users,
            self.retired is not None,
        )


@dataclass(frozen=True)
class _Failure:
    changed_at: float | None
    reason: str


class _LoadOutOfMemory(ModelError):
    """A load that ran out of device memory even with no idle model beside it (not remembered: it may fit later)."""


class LoadedModels:
    """The loaded models of one runtime, each behind a batcher; thread-safe.

    Parameters
    ----------
    device
        A resolved device, ``cpu`` or ``cuda:N``.
    batching
        Whether forward passes take up to the model's ``batch_size`` inputs (see
        :class:`~gateway.infer.runtime.InferenceRuntime`).
    memory_budget_bytes
        The most the loaded models of one device may take together (``None``: no limit; versions no longer active
        are unloaded all the same).
    metrics
        Handed to each model's batcher (forward pass sizes and seconds).

    Raises
    ------
    ValueError
        If ``memory_budget_bytes`` is not positive.
    """

    def __init__(
        self,
        device: str,
        batching: bool = True,
        memory_budget_bytes: int | None = None,
        *,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be positive or None, got {memory_budget_bytes}")
        self.device = device
        self.batching = batching
        self.memory_budget_bytes = memory_budget_bytes
        self._metrics = metrics
        self._lock = threading.Lock()  # guards the tables below; never held while loading or closing
        self._load_lock = threading.Lock()  # one load at a time: room is made and memory measured for it alone
        self._entries: dict[Key, _Entry] = {}
        self._failures: dict[Version, _Failure] = {}
        self._sizes: dict[Version, int] = {}  # measured at an earlier load: the room to make before loading again
        self._ticks = itertools.count()

    # -- leases --------------------------------------------------------------------------------------------------

    @contextmanager
    def lease(
        self, manifest: Manifest, folder: Path, sha256: str, changed_at: float | None = None
    ) -> Iterator[Batcher]:
        """The model's batcher, loaded if need be, kept loaded until the ``with`` block ends.

        Parameters
        ----------
        manifest, folder, sha256
            The model version (its package folder; the weights' digest as registered).
        changed_at
            The registration's ``changed_at``: a version that failed to load is tried again only when it differs
            from the failed attempt's (``None`` for a caller without one: never tried again by this runtime).

        Raises
        ------
        ModelError
            If the model fails to load now or failed before (``model X@V failed to load: <reason> (not retried
            until re-registered or re-enabled)``), or does not fit in the device's free memory.
        """
        entry = self._acquire(manifest, folder, sha256, changed_at)
        try:
            yield entry.batcher
        finally:
            self._release(entry)

    def _acquire(self, manifest: Manifest, folder: Path, sha256: str, changed_at: float | None) -> _Entry:
        key = (manifest.name, manifest.version, sha256, self.device)
        with self._lock:
            entry = self._take(key, manifest.ref, changed_at)
        if entry is not None:
            return entry
        with self._load_lock:
            with self._lock:  # loaded, or failed, while this caller waited
                entry = self._take(key, manifest.ref, changed_at)
            return entry if entry is not None else self._load(key, manifest, Path(folder), changed_at)

    def _take(self, key: Key, ref: str, changed_at: float | None) -> _Entry | None:
        """Under the lock: the loaded entry, leased; ``None`` when not loaded; raises for a remembered failure."""
        failure = self._failures.get(key[:3])
        if failure is not None:
            if failure.changed_at == changed_at:
                raise ModelError(_failed(ref, failure.reason))
            del self._failures[key[:3]]  # registered again or re-enabled since: try again
        entry = self._entries.get(key)
        if entry is not None:
            self._touch(entry, 1)
        return entry

    def _touch(self, entry: _Entry, users: int) -> None:
        entry.users += users
        entry.tick = next(self._ticks)
        entry.last_used = time.time()

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            self._touch(entry, -1)
            why = entry.retired if entry.users == 0 and self._entries.get(entry.key) is entry else None
            if why is not None:
                del self._entries[entry.key]
        if why is not None:
            _close(entry, why)
        else:
            self._evict(entry.device, 0, "least recently used, over the memory budget")

    # -- loading -------------------------------------------------------------------------------------------------

    def _load(self, key: Key, manifest: Manifest, folder: Path, changed_at: float | None) -> _Entry:
        """Under the load lock: make room, load, measure, record leased, and keep the device within its budget."""
        weights = folder / manifest.weights
        expected = self._sizes.get(key[:3]) or _size_on_disk(weights)
        self._evict(self.device, expected, "least recently used, to make room for another model")
        before = _allocated(self.device)
        try:
            backend = self._load_backend(manifest, folder)
        except _LoadOutOfMemory:
            raise
        except Exception as exc:
            why = str(exc) if isinstance(exc, GatewayError) else reason(exc)
            with self._lock:
                self._failures[key[:3]] = _Failure(changed_at, why)
            log.warning("%s failed to load on %s: %s", manifest.ref, self.device, why)
            raise ModelError(_failed(manifest.ref, why)) from exc
        memory, measured = _footprint(backend, weights, _allocated(self.device) - before)
        limit = manifest.inference.batch_size if self.batching else 1  # off: one input or patch per forward pass
        wait_s = manifest.inference.max_wait_ms / 1000.0
        batcher = Batcher(backend, limit, wait_s, self.batching, name=manifest.ref, metrics=self._metrics)
        now = time.time()
        with self._lock:
            entry = _Entry(key, manifest.ref, backend, batcher, memory, measured, now, now, next(self._ticks), users=1)
            self._entries[key] = entry
            self._sizes[key[:3]] = memory
        log.info("loaded %s on %s: %s (%s)", manifest.ref, backend.device, _mib(memory), measured)
        self._evict(entry.device, 0, "least recently used, over the memory budget", keep=entry)
        self._warn_if_over(entry)
        return entry

    def _load_backend(self, manifest: Manifest, folder: Path) -> Backend:
        """Load; on running out of device memory, unload every idle model and try once more."""
        try:
            return load_backend(manifest, folder, self.device)
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            log.warning(
                "%s ran out of memory loading on %s; unloading the idle models to retry", manifest.ref, self.device
            )
        self._evict(self.device, None, "to make room for another model after running out of memory")
        try:
            return load_backend(manifest, folder, self.device)
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            raise _LoadOutOfMemory(
                f"model {manifest.ref} does not fit in the free memory of {self.device} beside the models in use: {exc}"
            ) from exc

    def _warn_if_over(self, entry: _Entry) -> None:
        budget = self.memory_budget_bytes
        with self._lock:
            used = self._used(entry.device)
        if budget is None or used <= budget:
            return
        if entry.memory_bytes > budget:
            log.warning(
                "%s takes %s, more than the memory budget of %s on %s: loaded with no idle model beside it",
                entry.ref,
                _mib(entry.memory_bytes),
                _mib(budget),
                entry.device,
            )
        else:
            log.warning(
                "models in use on %s take %s, over the memory budget of %s; idle ones are unloaded as jobs finish",
                entry.device,
                _mib(used),
                _mib(budget),
            )

    # -- unloading -----------------------------------------------------------------------------------------------

    def _used(self, device: str) -> int:
        return sum(e.memory_bytes for e in self._entries.values() if e.device == device)

    def _evict(self, device: str, need: int | None, why: str, keep: _Entry | None = None) -> None:
        """Unload the least recently used idle models of ``device`` until ``need`` more bytes fit in the budget
        (``need=None``: every idle one, budget or not). ``need=0`` never unloads the device's last model: one
        larger than the budget stays loaded, alone."""
        if need is not None and self.memory_budget_bytes is None:
            return
        with self._lock:
            victims = self._victims(device, need, keep)
        for entry in victims:
            _close(entry, why)

    def _victims(self, device: str, need: int | None, keep: _Entry | None) -> list[_Entry]:
        """Under the lock: take the entries :meth:`_evict` unloads out of the table."""
        budget = self.memory_budget_bytes
        on_device = [e for e in self._entries.values() if e.device == device]
        used, left = sum(e.memory_bytes for e in on_device), len(on_device)
        idle = sorted((e for e in on_device if e.users == 0 and e is not keep), key=lambda e: e.tick)
        victims = []
        for entry in idle:
            if need is not None and budget is not None and (used + need <= budget or (need == 0 and left == 1)):
                break
            victims.append(self._entries.pop(entry.key))
            used, left = used - entry.memory_bytes, left - 1
        return victims

    def retain(self, active: Iterable[ModelVersionRef]) -> None:
        """Keep the ``active`` model versions; unload every other one (now if idle, else when its last lease ends).

        Call it with the registry's active versions (:meth:`gateway.registry.registry.Registry.active`) for every
        job. Failed loads of versions not in ``active`` are forgotten too.
        """
        keep = {(m.name, m.version, m.sha256) for m in active}
        victims = []
        with self._lock:
            for version in [v for v in self._failures if v not in keep]:
                del self._failures[version]
            for key, entry in list(self._entries.items()):
                entry.retired = None if key[:3] in keep else "no longer active"
                if entry.retired is not None and entry.users == 0:
                    victims.append(self._entries.pop(key))
        for entry in victims:
            _close(entry, "no longer active")

    def unload(self, name: str, version: str) -> None:
        """Unload every loaded copy of ``name@version``: now if idle, else when its last lease ends."""
        victims = []
        with self._lock:
            for key, entry in list(self._entries.items()):
                if key[:2] == (name, version):
                    entry.retired = "unload asked for"
                    if entry.users == 0:
                        victims.append(self._entries.pop(key))
        for entry in victims:
            _close(entry, "unload asked for")

    def close(self) -> None:
        """Stop every batcher and release every model, in use or not (requests still queued fail)."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self._failures.clear()
        for entry in entries:
            _close(entry, "runtime closed")

    # -- what is loaded ------------------------------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        """The model versions in memory, by device and reference."""
        with self._lock:
            entries = [e.public() for e in self._entries.values()]
        return sorted(entries, key=lambda m: (m.device, m.name, m.version, m.sha256))

    def failed_loads(self) -> dict[str, str]:
        """``name@version`` -> why it failed to load, for the versions not tried again until they change."""
        with self._lock:
            return {f"{name}@{version}": f.reason for (name, version, _), f in self._failures.items()}

    def stats(self) -> dict[str, BatcherStats]:
        """Batcher statistics per loaded model, keyed ``name@version`` (``name@version#sha256[:12]`` for a second
        copy with other weights)."""
        with self._lock:
            entries = list(self._entries.values())
        stats: dict[str, BatcherStats] = {}
        for entry in entries:
            name, version, sha256, _ = entry.key
            ref = f"{name}@{version}"
            stats[ref if ref not in stats else f"{ref}#{sha256[:12]}"] = entry.batcher.stats()
        return stats


def _failed(ref: str, why: str) -> str:
    return f"model {ref} failed to load: {why} (not retried until re-registered or re-enabled)"


def _out_of_memory(exc: BaseException) -> bool:
    """Whether a load failed for want of memory (the backends wrap the allocator's error in a ModelError)."""
    return is_out_of_memory(exc) or (exc.__cause__ is not None and is_out_of_memory(exc.__cause__))


def _close(entry: _Entry, why: str) -> None:
    """Stop the batcher (after its forward pass in progress), release the model, return cached device memory."""
    entry.batcher.close()
    entry.backend.close()
    if entry.device.startswith("cuda") and "torch" in sys.modules:  # only torch's allocator caches device memory
        import torch

        torch.cuda.empty_cache()
    log.info("unloaded %s from %s: %s (%s)", entry.ref, entry.device, _mib(entry.memory_bytes), why)


def _allocated(device: str) -> int:
    """The bytes torch's allocator holds for tensors on ``device`` (0 on the CPU, or while torch is not loaded:
    then it holds none)."""
    if not device.startswith("cuda") or "torch" not in sys.modules:
        return 0
    import torch

    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.memory_allocated(torch.device(device)))


def _size_on_disk(path: Path) -> int:
    """The bytes of a weights file, or of every file in a bundle folder (0 when missing)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _torch_bytes(backend: Backend) -> int | None:
    """The bytes of a torch backend's parameters and buffers (``None`` for another backend)."""
    # TorchBackend keeps its module private; it is read here only, never changed.
    module = getattr(backend, "_module", None)
    if module is None or "torch" not in sys.modules:  # a torch module means torch is loaded; never load it here
        return None
    import torch

    if not isinstance(module, torch.nn.Module):
        return None
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _footprint(backend: Backend, weights: Path, allocated: int) -> tuple[int, str]:
    """The memory a loaded model takes and how that was found (``allocated``: what torch's CUDA allocator gained
    during the load, for a torch-based backend whose module is not visible)."""
    tensors = _torch_bytes(backend)
    if tensors is not None:  # exact; the allocator's figure would count concurrent forward passes too
        return tensors, MEASURED_TORCH
    if allocated > 0:
        return allocated, MEASURED_CUDA
    return _size_on_disk(weights), ESTIMATED_DISK


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
