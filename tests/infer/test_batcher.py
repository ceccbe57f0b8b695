"""The batcher: merged forward passes give the same numbers, failures stay with their requests."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from tiny_models import TinyConv, at_once, torchscript_package

from gateway.errors import InferenceError, OutOfMemory
from gateway.infer.backend import Backend
from gateway.infer.backends import load_backend
from gateway.infer.batcher import Batcher

POISON = -12345.0


class Doubler:
    """A test double: doubles its input, multiplied by the ``scale`` extra input when given.

    It runs out of memory above ``limit`` items or on any batch holding a POISON item, as a device would: the one
    fault that cannot be caused on purpose on a CPU. ``fail_with`` raises that instead of running out of memory.
    """

    device = "cpu"

    def __init__(self, limit: int = 1000, fail_with: Exception | None = None) -> None:
        self.limit = limit
        self.fail_with = fail_with
        self.sizes: list[int] = []
        self.gate = threading.Event()  # cleared: a forward pass waits until it is set
        self.gate.set()
        self.entered = threading.Event()  # set once a forward pass has begun

    def run(self, batch: np.ndarray, extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        self.entered.set()
        self.gate.wait()
        self.sizes.append(batch.shape[0])
        poisoned = bool(np.any(batch == POISON))
        if poisoned and self.fail_with is not None:
            raise self.fail_with
        if batch.shape[0] > self.limit or poisoned:
            raise OutOfMemory(f"out of memory for {batch.shape[0]} items")
        scale = extra["scale"][:, 0].reshape(-1, *([1] * (batch.ndim - 1))) if extra else 1.0
        return (batch * 2 * scale).astype(np.float32)

    def close(self) -> None:
        pass


@pytest.fixture
def model(tmp_path: Path) -> Iterator[Backend]:
    backend = load_backend(torchscript_package(tmp_path, TinyConv()), tmp_path, "cpu")
    yield backend
    backend.close()


def items(n: int, seed: int = 0, shape: tuple[int, ...] = (1, 6, 7, 8)) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def submit_together(batcher: Batcher, batches: list[np.ndarray]) -> list[np.ndarray | BaseException]:
    """Submit from one thread per batch, all at once; return each output or error."""
    results: list[np.ndarray | BaseException] = [np.empty(0)] * len(batches)

    def submit(index: int) -> None:
        try:
            results[index] = batcher.run(batches[index])
        except Exception as exc:
            results[index] = exc

    at_once(submit, len(batches), timeout_s=30)
    return results


def test_concurrent_requests_share_forward_passes_and_get_their_own_outputs(model: Backend) -> None:
    inputs = [items(1, seed) for seed in range(8)]
    alone = [model.run(batch) for batch in inputs]
    batcher = Batcher(model, max_batch=8, max_wait_s=0.5)
    try:
        outputs = submit_together(batcher, inputs)
    finally:
        batcher.close()
    for got, want in zip(outputs, alone, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    stats = batcher.stats()
    assert stats.items == 8 and stats.requests == 8
    assert stats.forward_passes < 8
    assert 0 < stats.busy_s <= stats.wall_s and 0 < stats.busy_fraction <= 1


def test_disabled_batching_runs_each_request_alone(model: Backend) -> None:
    batcher = Batcher(model, max_batch=8, max_wait_s=0.5, enabled=False)
    try:
        outputs = submit_together(batcher, [items(1, seed) for seed in range(4)])
    finally:
        batcher.close()
    assert all(isinstance(out, np.ndarray) and out.shape == (1, 2, 6, 7, 8) for out in outputs)
    assert batcher.stats().forward_passes == 4


def test_a_request_larger_than_max_batch_runs_in_chunks() -> None:
    backend = Doubler()
    batcher = Batcher(backend, max_batch=4, max_wait_s=0.0)
    batch = items(10)
    np.testing.assert_array_equal(batcher.run(batch), batch * 2)
    batcher.close()
    assert backend.sizes == [4, 4, 2]


def test_extra_inputs_travel_with_their_items() -> None:
    backend = Doubler()
    batcher = Batcher(backend, max_batch=8, max_wait_s=1.0)
    requests = ((1, 1), (2, 2), (5, 3))  # items, seed (and scale)
    futures = [batcher.submit(items(n, s), {"scale": np.full((n, 2), s, np.float32)}) for n, s in requests]
    for (n, seed), future in zip(requests, futures, strict=True):
        np.testing.assert_allclose(future.result(timeout=10), items(n, seed) * 2 * seed, rtol=1e-6)
    batcher.close()
    assert backend.sizes == [8]  # a full batch does not wait out max_wait_s


def test_out_of_memory_splits_the_batch_in_halves() -> None:
    backend = Doubler(limit=2)
    batcher = Batcher(backend, max_batch=8, max_wait_s=0.0)
    batch = items(8)
    np.testing.assert_array_equal(batcher.run(batch), batch * 2)
    batcher.close()
    assert backend.sizes == [8, 4, 2, 2, 4, 2, 2]
    assert batcher.stats().oom_splits == 3


def test_an_item_that_alone_runs_out_of_memory_fails_only_its_request() -> None:
    backend = Doubler()
    batcher = Batcher(backend, max_batch=8, max_wait_s=0.5)
    poisoned = items(1, 9)
    poisoned[0, 0, 0, 0, 0] = POISON
    inputs = [items(2, 1), items(1, 2), poisoned, items(3, 4)]
    outputs = submit_together(batcher, inputs)
    batcher.close()
    assert max(backend.sizes) > 1  # they did share a forward pass
    for batch, got in zip(inputs, outputs, strict=True):
        if batch is poisoned:
            assert isinstance(got, OutOfMemory)
        else:
            assert isinstance(got, np.ndarray)
            np.testing.assert_array_equal(got, batch * 2)
    assert batcher.stats().failed_requests == 1


def test_any_other_failure_fails_the_requests_of_that_pass_only() -> None:
    backend = Doubler(fail_with=ValueError("the model refused"))
    backend.gate.clear()
    batcher = Batcher(backend, max_batch=2, max_wait_s=0.2)
    poisoned = items(1, 9)
    poisoned[0, 0, 0, 0, 0] = POISON
    futures = [batcher.submit(batch) for batch in (poisoned, items(1, 1), items(1, 2), items(1, 3))]
    backend.gate.set()
    errors = [future.exception(timeout=10) for future in futures]
    batcher.close()
    assert backend.sizes == [2, 2]
    assert all(isinstance(error, InferenceError) for error in errors[:2])
    assert "ValueError: the model refused" in str(errors[0])
    assert errors[2:] == [None, None]


def test_a_real_model_failing_fails_only_that_request(model: Backend) -> None:
    batcher = Batcher(model, max_batch=8, max_wait_s=0.3)
    wrong = items(1, 5, shape=(3, 6, 7, 8))  # three channels for a one-channel model: a different shape, own pass
    outputs = submit_together(batcher, [items(1, 1), wrong, items(1, 2)])
    batcher.close()
    assert isinstance(outputs[1], InferenceError) and "tiny@1.0 failed on cpu" in str(outputs[1])
    assert isinstance(outputs[0], np.ndarray) and isinstance(outputs[2], np.ndarray)


def test_close_fails_queued_requests_and_refuses_new_ones() -> None:
    backend = Doubler()
    backend.gate.clear()
    batcher = Batcher(backend, max_batch=1, max_wait_s=0.0)
    running = batcher.submit(items(1))
    assert backend.entered.wait(timeout=10)
    queued = batcher.submit(items(1, 1))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(InferenceError, match="unloaded"):
        queued.result(timeout=10)
    backend.gate.set()
    closer.join(timeout=10)
    assert running.result(timeout=10).shape == (1, 1, 6, 7, 8)
    with pytest.raises(InferenceError, match="closed"):
        batcher.submit(items(1))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(Doubler(), max_batch=0, max_wait_s=0.0)
    batcher = Batcher(Doubler(), max_batch=2, max_wait_s=0.0)
    with pytest.raises(ValueError, match="batch must be"):
        batcher.submit(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="one row per batch item"):
        batcher.submit(items(2), {"scale": np.ones((3, 1), np.float32)})
    batcher.close()


def test_requests_of_another_shape_queued_between_do_not_break_grouping() -> None:
    """A queued request is taken out of the queue past one of another shape (regression: the queue compared
    requests by value, which compares their arrays, and the batcher thread died leaving every caller waiting)."""
    backend = Doubler()
    backend.gate.clear()
    batcher = Batcher(backend, max_batch=4, max_wait_s=0.0)
    running = batcher.submit(items(1))
    assert backend.entered.wait(timeout=10)
    first, other, second = (
        batcher.submit(items(1, 1)),
        batcher.submit(items(1, 2, shape=(1, 3, 3, 3))),
        batcher.submit(items(1, 3)),
    )
    backend.gate.set()
    outputs = [f.result(timeout=10) for f in (running, first, other, second)]
    batcher.close()
    assert [o.shape for o in outputs] == [(1, 1, 6, 7, 8), (1, 1, 6, 7, 8), (1, 1, 3, 3, 3), (1, 1, 6, 7, 8)]
    assert backend.sizes == [1, 2, 1], "the two requests of one shape shared a forward pass past the other shape"
