"""One thread per model that merges concurrent requests into shared forward passes.

Callers (jobs, and the patches of their sliding windows) :meth:`Batcher.submit` batches ``[n, channels, ...]``
and get a future. The batcher's thread takes the oldest request, waits up to ``max_wait_s`` (from that request's
arrival) for more requests of the same item shape and extra-input shapes, up to ``max_batch`` items, runs one
forward pass on their concatenation and hands each caller its slice of the output. Extra inputs (a diffusion
model's b-values) are ``[n, ...]`` per request and are concatenated alongside.

Failures stay with the requests they concern: when the device runs out of memory
(:class:`~gateway.errors.OutOfMemory`) the batch is split in halves and retried, down to single items, and only
requests whose item still fails get the error; any other exception fails the requests of that forward pass only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import InferenceError, OutOfMemory
from gateway.infer.backend import Backend
from gateway.infer.failures import reason
from gateway.metrics import GatewayMetrics

__all__ = ["Batcher", "BatcherStats"]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
Extra = Mapping[str, Array]


@dataclass(frozen=True)
class BatcherStats:
    """What a batcher has done since it started.

    ``busy_s / wall_s`` is the fraction of time the device spent in forward passes (GPU busy, roughly).
    """

    requests: int
    items: int
    forward_passes: int
    oom_splits: int
    failed_requests: int
    busy_s: float
    wall_s: float

    @property
    def items_per_pass(self) -> float:
        """Mean items per forward pass."""
        return self.items / self.forward_passes if self.forward_passes else 0.0

    @property
    def busy_fraction(self) -> float:
        """Fraction of wall time spent in forward passes."""
        return self.busy_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        """JSON-ready numbers, derived ones included."""
        return {
            "requests": self.requests,
            "items": self.items,
            "forward_passes": self.forward_passes,
            "oom_splits": self.oom_splits,
            "failed_requests": self.failed_requests,
            "busy_s": round(self.busy_s, 6),
            "wall_s": round(self.wall_s, 6),
            "items_per_pass": round(self.items_per_pass, 3),
            "busy_fraction": round(self.busy_fraction, 4),
        }


@dataclass(eq=False)  # identity: the queue removes requests by identity, never by comparing their arrays
class _Request:
    batch: Array
    extra: dict[str, Array]
    key: tuple[Any, ...]
    arrived: float
    future: Future[Array] = field(default_factory=Future)

    @property
    def size(self) -> int:
        return int(self.batch.shape[0])


def _key(batch: Array, extra: dict[str, Array]) -> tuple[Any, ...]:
    """Requests with equal keys can share a forward pass."""
    return (batch.shape[1:], tuple((name, value.shape[1:]) for name, value in sorted(extra.items())))


def _checked(batch: npt.NDArray[Any], extra: Extra | None) -> tuple[Array, dict[str, Array]]:
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim < 2 or batch.shape[0] < 1:
        raise ValueError(f"batch must be [n >= 1, channels, ...], got shape {batch.shape}")
    extras = {name: np.asarray(value, dtype=np.float32) for name, value in (extra or {}).items()}
    for name, value in extras.items():
        if value.ndim < 1 or value.shape[0] != batch.shape[0]:
            raise ValueError(f"extra input {name!r} must have one row per batch item ({batch.shape[0]})")
    return batch, extras


def _gather(outputs: list[tuple[int, Array]], start: int, stop: int) -> Array:
    """Items ``start:stop`` of the forward passes' outputs: a view when one pass holds them all."""
    pieces = []
    for first, output in sorted(outputs, key=lambda item: item[0]):
        last = first + output.shape[0]
        if first < stop and start < last:
            pieces.append(output[max(start, first) - first : min(stop, last) - first])
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class Batcher:
    """A model's request queue and the thread that runs it.

    Parameters
    ----------
    backend
        The loaded model.
    max_batch
        The most items in one forward pass (a larger single request runs in chunks of this size).
    max_wait_s
        How long the oldest request waits for others to join its forward pass.
    enabled
        ``False`` runs every request on its own, at once (for comparison).
    name
        The model's ``name@version``: the thread's name, and the ``model`` label of its metrics.
    metrics
        Where each forward pass's size and seconds are observed.
    """

    def __init__(
        self,
        backend: Backend,
        max_batch: int,
        max_wait_s: float,
        enabled: bool = True,
        name: str = "model",
        *,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.enabled = enabled
        self.name = name
        self._metrics = metrics
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._started = time.perf_counter()
        self._counts = {"requests": 0, "items": 0, "forward_passes": 0, "oom_splits": 0, "failed_requests": 0}
        self._busy = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # -- callers -------------------------------------------------------------------------------------------------

    def submit(self, batch: npt.NDArray[Any], extra: Extra | None = None) -> Future[Array]:
        """Queue ``batch`` ``[n, channels, ...]`` (and ``extra`` inputs, ``[n, ...]`` each) for a forward pass.

        Returns
        -------
        concurrent.futures.Future
            Resolves to the model's raw output for these ``n`` items, or to the
            :class:`~gateway.errors.InferenceError` that failed them.

        Raises
        ------
        ValueError
            If the batch or an extra input has the wrong shape.
        InferenceError
            If the batcher is closed.
        """
        array, extras = _checked(batch, extra)
        request = _Request(array, extras, _key(array, extras), time.perf_counter())
        with self._cond:
            if self._closed:
                raise InferenceError("the model's batcher is closed")
            self._queue.append(request)
            self._counts["requests"] += 1
            self._cond.notify()
        return request.future

    def run(self, batch: npt.NDArray[Any], extra: Extra | None = None) -> Array:
        """Submit ``batch`` and wait for its output (see :meth:`submit`)."""
        return self.submit(batch, extra).result()

    def stats(self) -> BatcherStats:
        """Counts and times so far."""
        with self._cond:
            return BatcherStats(**self._counts, busy_s=self._busy, wall_s=time.perf_counter() - self._started)

    def close(self) -> None:
        """Stop the thread after the forward pass in progress; requests still queued fail."""
        self._fail_queued(InferenceError("the model was unloaded before this request ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the thread ----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                group = self._next_group()
            except BaseException as exc:  # a bug in grouping must not strand the queued callers
                log.exception("batcher failed unexpectedly")
                self._fail_queued(InferenceError(f"batcher failed: {reason(exc)}"))
                return
            if group is None:
                return
            try:
                self._execute(group)
            except BaseException as exc:  # never leave a caller waiting, whatever happened
                log.exception("batcher failed unexpectedly")
                self._fail(group, InferenceError(f"batcher failed: {reason(exc)}"))

    def _ready(self, key: tuple[Any, ...]) -> bool:
        return sum(r.size for r in self._queue if r.key == key) >= self.max_batch

    def _next_group(self) -> list[_Request] | None:
        """Wait for work and take the next group (under the lock); ``None`` when closed."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue[0]
            if self.enabled:
                deadline = first.arrived + self.max_wait_s
                while not self._closed and not self._ready(first.key) and time.perf_counter() < deadline:
                    self._cond.wait(timeout=max(0.0, deadline - time.perf_counter()))
            if self._closed:  # close() has failed what was queued
                return None
            return self._take(first)

    def _take(self, first: _Request) -> list[_Request]:
        group = [first]
        self._queue.popleft()
        if self.enabled:
            total = first.size
            for request in list(self._queue):
                if request.key == first.key and total + request.size <= self.max_batch:
                    group.append(request)
                    self._queue.remove(request)
                    total += request.size
        return [r for r in group if r.future.set_running_or_notify_cancel()]

    def _execute(self, group: list[_Request]) -> None:
        if not group:
            return
        batch = np.concatenate([r.batch for r in group]) if len(group) > 1 else group[0].batch
        extra = {name: np.concatenate([r.extra[name] for r in group]) for name in group[0].extra}
        outputs: list[tuple[int, Array]] = []
        errors: dict[int, InferenceError] = {}
        for start in range(0, batch.shape[0], self.max_batch):
            self._run_range(batch, extra, start, min(start + self.max_batch, batch.shape[0]), outputs, errors)
        self._deliver(group, outputs, errors)

    def _run_range(
        self,
        batch: Array,
        extra: dict[str, Array],
        start: int,
        stop: int,
        outputs: list[tuple[int, Array]],
        errors: dict[int, InferenceError],
    ) -> None:
        """Run items ``start:stop`` and record ``(start, output)``; on OutOfMemory split in halves, down to single
        items; record the error of each item that fails."""
        try:
            output = self._forward(batch[start:stop], {name: value[start:stop] for name, value in extra.items()})
        except OutOfMemory as exc:
            if stop - start == 1:
                errors[start] = exc
                return
            with self._cond:
                self._counts["oom_splits"] += 1
            log.info("out of memory on %d items; retrying in halves", stop - start)
            middle = (start + stop) // 2
            self._run_range(batch, extra, start, middle, outputs, errors)
            self._run_range(batch, extra, middle, stop, outputs, errors)
            return
        except InferenceError as exc:
            errors.update(dict.fromkeys(range(start, stop), exc))
            return
        outputs.append((start, output))

    def _forward(self, batch: Array, extra: dict[str, Array]) -> Array:
        began = time.perf_counter()
        try:
            output = self.backend.run(batch, extra or None)
        except InferenceError:
            raise
        except Exception as exc:  # a backend that does not translate its errors
            raise InferenceError(f"forward pass failed: {reason(exc)}") from exc
        finally:
            seconds = time.perf_counter() - began
            with self._cond:
                self._busy += seconds
                self._counts["forward_passes"] += 1
                self._counts["items"] += batch.shape[0]
            if self._metrics is not None:
                self._metrics.inference_batch(self.name, int(batch.shape[0]), seconds)
        if not isinstance(output, np.ndarray) or output.ndim < 1 or output.shape[0] != batch.shape[0]:
            shape = getattr(output, "shape", type(output).__name__)
            raise InferenceError(f"model returned {shape} for a batch of {batch.shape[0]}")
        return output

    def _deliver(
        self, group: list[_Request], outputs: list[tuple[int, Array]], errors: dict[int, InferenceError]
    ) -> None:
        start = 0
        for request in group:
            stop = start + request.size
            failed = next((errors[i] for i in range(start, stop) if i in errors), None)
            if failed is not None:
                self._count_failure()
                request.future.set_exception(failed)
            else:
                request.future.set_result(_gather(outputs, start, stop))
            start = stop

    def _fail_queued(self, error: InferenceError) -> None:
        """Close: refuse new requests and fail every queued one with ``error``."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for request in pending:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(error)

    def _fail(self, group: list[_Request], error: InferenceError) -> None:
        for request in group:
            if not request.future.done():
                self._count_failure()
                request.future.set_exception(error)

    def _count_failure(self) -> None:
        with self._cond:
            self._counts["failed_requests"] += 1
