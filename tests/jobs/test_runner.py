"""The job runner and the job lifecycle: conditional moves, leases, reclaims, the supervisor, stop, the memory budget.

The lifecycle tests run on SQLite and on a real PostgreSQL server (the ``index_store`` fixture): the same
conditional statements must hold on both. The runner tests take real synthetic series through real stages, with
a stage wrapped where a test needs a fault or a pause it cannot cause otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from gateway.assemble.assemble import AssemblyResult
from gateway.config import ExportSettings, JobsSettings, StoreSettings
from gateway.errors import LeaseLost
from gateway.infer.results import ModelResult
from gateway.infer.runtime import InferenceRuntime
from gateway.jobs import lifecycle, operations
from gateway.jobs.encoding import Encoded, EncodeStage
from gateway.jobs.inference import InferenceStage, Inferred
from gateway.jobs.runner import BYTES_PER_VOXEL, JobRunner, MemoryBudget, Pipeline, estimate_job_bytes
from gateway.jobs.states import LEASED, TRANSITIONS, JobState
from gateway.registry.registry import Registry
from gateway.store.index import Job
from gateway.store.store import InstanceStore

from job_rows import add_stored_series
from model_packages import manifest_dict, write_package

#: Store a small synthetic CT series (8 slices) and complete it; the new job's id.
add_series = partial(add_stored_series, slices=8)


def job(store: InstanceStore, job_id: int) -> Job:
    with store.sessions() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


# -- the lifecycle, on both engines ------------------------------------------------------------------------------


def test_every_move_is_in_the_table_and_conditional_on_state_and_lease(
    index_store: InstanceStore, tmp_path: Path
) -> None:
    job_id = add_series(index_store, tmp_path / "ct")
    lease = lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3)
    assert lease is not None and lease.job_id == job_id
    assert (JobState.ASSEMBLING, JobState.EXPORTED) not in TRANSITIONS
    with pytest.raises(ValueError, match="not in the table"):
        lifecycle.move(index_store, lease, JobState.ASSEMBLING, JobState.EXPORTED)
    with pytest.raises(LeaseLost):  # the wrong state: nothing written
        lifecycle.move(index_store, lease, JobState.ASSEMBLED, JobState.INFERRING, note="x")
    with pytest.raises(LeaseLost):  # another owner: nothing written
        lifecycle.move(index_store, lifecycle.Lease(job_id, "host/2/b"), JobState.ASSEMBLING, JobState.ASSEMBLED)
    assert job(index_store, job_id).state == JobState.ASSEMBLING and "note" not in job(index_store, job_id).detail
    lifecycle.move(index_store, lease, JobState.ASSEMBLING, JobState.ASSEMBLED, lease_s=60.0, timing=("a_s", 1.25))
    row = job(index_store, job_id)
    assert row.state == JobState.ASSEMBLED and row.lease_owner == "host/1/a"
    assert set(row.detail["timings"]) == {"queue_s", "a_s"} and row.detail["timings"]["a_s"] == 1.25


def test_concurrent_claims_take_each_job_once(index_store: InstanceStore, tmp_path: Path) -> None:
    ids = [add_series(index_store, tmp_path / f"ct{k}", seed=k, now=10.0 * k) for k in range(6)]
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (lease := lifecycle.claim(index_store, name, 60.0, max_attempts=3)) is not None:
            with lock:
                claims.append((name, lease.job_id))

    threads = [threading.Thread(target=worker, args=(f"host/{k}/w",)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(job_id for _, job_id in claims) == ids, f"each job claimed exactly once: {claims}"
    for name, job_id in claims:
        assert job(index_store, job_id).lease_owner == name


def test_an_expired_lease_is_reclaimed_and_its_old_owner_can_write_nothing(
    index_store: InstanceStore, tmp_path: Path
) -> None:
    job_id = add_series(index_store, tmp_path / "ct")
    first = lifecycle.claim(index_store, "host/1/a", 5.0, max_attempts=3, now=100.0)
    assert first is not None
    assert lifecycle.renew(index_store, "host/1/a", 5.0, now=103.0) == 1  # the heartbeat: expires at 108 now
    assert lifecycle.reclaim_expired(index_store, now=107.0) == []
    assert lifecycle.reclaim_expired(index_store, now=109.0) == [job_id]
    second = lifecycle.claim(index_store, "host/2/b", 5.0, max_attempts=3, now=110.0)
    assert second is not None and second.job_id == job_id
    with pytest.raises(LeaseLost):
        lifecycle.move(index_store, first, JobState.ASSEMBLING, JobState.ASSEMBLED)
    row = job(index_store, job_id)
    assert row.lease_owner == "host/2/b" and row.attempts == 2
    assert [step["why"] for step in row.detail["handed_back"]] == ["its lease expired"]


def test_a_job_that_keeps_taking_its_process_down_fails_after_max_attempts(
    index_store: InstanceStore, tmp_path: Path
) -> None:
    job_id = add_series(index_store, tmp_path / "ct")
    for attempt in range(3):
        assert lifecycle.claim(index_store, f"host/{attempt}/x", 1.0, max_attempts=3, now=100.0 * attempt) is not None
        lifecycle.reclaim_expired(index_store, now=100.0 * attempt + 50)
    assert lifecycle.claim(index_store, "host/9/x", 1.0, max_attempts=3, now=1000.0) is None
    row = job(index_store, job_id)
    assert row.state == JobState.FAILED and row.finished_at == 1000.0
    assert "interrupted 3 times" in row.detail["failure"]["reason"]


def test_a_job_handed_back_keeps_its_attempt_and_waits_until_not_before(
    index_store: InstanceStore, tmp_path: Path
) -> None:
    job_id = add_series(index_store, tmp_path / "ct")
    lease = lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3, now=100.0)
    assert lease is not None
    handed = lifecycle.hand_back(index_store, "host/1/a", not_before=200.0, reason="no space", now=101.0)
    assert handed == [job_id]
    row = job(index_store, job_id)
    assert row.state == JobState.RECEIVED and row.attempts == 0 and row.lease_owner is None
    assert lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3, now=150.0) is None, "not before 200"
    assert lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3, now=201.0) is not None


def test_a_gone_process_of_this_host_has_its_jobs_taken_back_at_once(
    index_store: InstanceStore, tmp_path: Path
) -> None:
    job_id = add_series(index_store, tmp_path / "ct")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    me = lifecycle.owner_identity()
    host = me.split("/")[0]
    gone = f"{host}/{int(child.stdout)}/dead"
    assert lifecycle.claim(index_store, gone, 3600.0, max_attempts=3) is not None
    living = add_series(index_store, tmp_path / "ct2", seed=1, now=5.0)
    assert lifecycle.claim(index_store, f"{host}/{os.getppid()}/live", 3600.0, max_attempts=3) is not None
    assert lifecycle.reclaim_orphans(index_store, me) == [job_id]
    assert job(index_store, job_id).state == JobState.RECEIVED
    assert job(index_store, living).state == JobState.ASSEMBLING, "a live process keeps its job"


# -- the runner ---------------------------------------------------------------------------------------------------


class Stages:
    """Real inference and encode stages over a registry with one small model, with hooks for faults and pauses."""

    def __init__(self, store: InstanceStore, tmp_path: Path) -> None:
        self.registry = Registry(store)
        package = write_package(tmp_path / "tiny", manifest_dict("tiny-seg"))
        self.registry.register(package)
        self.runtime = InferenceRuntime("cpu", batching=False)
        self._infer = InferenceStage(store, self.registry, self.runtime, None)
        self._encode = EncodeStage(store, ExportSettings(), tmp_path / "outputs")
        self.fault: BaseException | None = None
        self.pause = threading.Event()
        self.paused = threading.Event()
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def infer(self, job_id: int, assembly: AssemblyResult) -> Inferred:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            if self.pause.is_set():
                self.paused.set()
                while self.pause.is_set():
                    time.sleep(0.01)
            if self.fault is not None:
                raise self.fault
            return self._infer(job_id, assembly)
        finally:
            with self._lock:
                self.inside -= 1

    def encode(self, job_id: int, results: Sequence[ModelResult]) -> Encoded:
        return self._encode(job_id, results)

    def pipeline(self) -> Pipeline:
        return Pipeline(self.infer, self.encode)


@pytest.fixture
def stages(instance_store: InstanceStore, tmp_path: Path) -> Iterator[Stages]:
    made = Stages(instance_store, tmp_path)
    yield made
    made.runtime.close()


def wait_for(predicate: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_job_runs_to_exported_and_the_lease_ends_with_it(
    instance_store: InstanceStore, stages: Stages, tmp_path: Path
) -> None:
    job_id = add_series(instance_store, tmp_path / "ct")
    assert JobRunner(instance_store, JobsSettings(workers=0), stages.pipeline()).run_once()
    row = job(instance_store, job_id)
    assert row.state == JobState.EXPORTED, row.detail  # no destination: nothing to send
    assert row.lease_owner is None and row.lease_expires_at is None and row.finished_at is not None
    assert {o["kind"] for o in row.detail["outputs"]} >= {"SEG", "SR"}
    (claim,) = lifecycle.claims_of(instance_store, job_id)
    assert claim.ended_at is not None and claim.outcome == "exported", claim


def test_queued_deliveries_wake_the_export_at_once(
    instance_store: InstanceStore, stages: Stages, tmp_path: Path
) -> None:
    job_id = add_series(instance_store, tmp_path / "ct")
    woken: list[int] = []
    runner = JobRunner(instance_store, JobsSettings(workers=0), stages.pipeline(), on_encoded=lambda: woken.append(1))
    assert runner.run_once()
    assert job(instance_store, job_id).state == JobState.EXPORTED and woken == [1]


def test_an_unexpected_error_fails_the_job_with_one_line_and_the_pool_keeps_working(
    instance_store: InstanceStore, stages: Stages, tmp_path: Path
) -> None:
    first = add_series(instance_store, tmp_path / "ct1")
    stages.fault = RuntimeError("boom\nwith a second line")
    runner = JobRunner(instance_store, JobsSettings(workers=1, poll_s=0.05), stages.pipeline())
    runner.start()
    try:
        wait_for(lambda: job(instance_store, first).state == JobState.FAILED)
        stages.fault = None
        second = add_series(instance_store, tmp_path / "ct2", seed=2, now=50.0)
        runner.wake()
        wait_for(lambda: job(instance_store, second).state == JobState.EXPORTED)
    finally:
        runner.stop()
    failure = job(instance_store, first).detail["failure"]
    assert failure == {"stage": "infer", "reason": "inference failed: RuntimeError: boom with a second line"}


def test_an_index_error_hands_the_job_back_instead_of_failing_it(
    instance_store: InstanceStore, stages: Stages, tmp_path: Path
) -> None:
    job_id = add_series(instance_store, tmp_path / "ct")
    stages.fault = OperationalError("UPDATE jobs", {}, Exception("database is locked"))
    assert JobRunner(instance_store, JobsSettings(workers=0), stages.pipeline()).run_once()
    row = job(instance_store, job_id)
    assert row.state == JobState.RECEIVED and row.lease_expires_at is not None and row.lease_expires_at > time.time()
    assert "index error at infer" in row.detail["handed_back"][-1]["why"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the test
def test_a_worker_thread_that_dies_is_replaced_and_its_job_is_not_left_held(
    instance_store: InstanceStore, stages: Stages, tmp_path: Path
) -> None:
    first = add_series(instance_store, tmp_path / "ct1")
    stages.fault = SystemExit(3)  # ends the worker thread
    runner = JobRunner(instance_store, JobsSettings(workers=1, poll_s=0.05, lease_s=0.3), stages.pipeline())
    runner.start()
    try:
        wait_for(lambda: job(instance_store, first).state == JobState.FAILED)
        stages.fault = None
        second = add_series(instance_store, tmp_path / "ct2", seed=2, now=50.0)
        wait_for(lambda: job(instance_store, second).state == JobState.EXPORTED)  # a new worker took it
    finally:
        runner.stop()
    assert "ended its worker: SystemExit" in job(instance_store, first).detail["failure"]["reason"]


def test_stop_hands_a_running_job_back_to_received_never_failed(
    instance_store: InstanceStore, stages: Stages, tmp_path: Path
) -> None:
    job_id = add_series(instance_store, tmp_path / "ct")
    stages.pause.set()
    runner = JobRunner(instance_store, JobsSettings(workers=1, poll_s=0.05, shutdown_grace_s=0.2), stages.pipeline())
    runner.start()
    try:
        assert stages.paused.wait(30)
        assert job(instance_store, job_id).state == JobState.INFERRING
    finally:
        runner.stop()  # the stage is still running after the grace period
    row = job(instance_store, job_id)
    assert row.state == JobState.RECEIVED and row.attempts == 0, "handed back, its attempt refunded"
    stages.pause.clear()  # the abandoned stage finishes: its write is refused, the job stays received
    wait_for(lambda: stages.inside == 0)
    time.sleep(0.2)
    assert job(instance_store, job_id).state == JobState.RECEIVED
    assert JobRunner(instance_store, JobsSettings(workers=0), stages.pipeline()).run_once()  # the next start
    assert job(instance_store, job_id).state == JobState.EXPORTED


def test_a_job_cancelled_while_it_runs_is_dropped_by_its_worker_not_failed(
    instance_store: InstanceStore, stages: Stages, tmp_path: Path
) -> None:
    job_id = add_series(instance_store, tmp_path / "ct")
    stages.pause.set()
    runner = JobRunner(instance_store, JobsSettings(workers=1, poll_s=0.05), stages.pipeline())
    runner.start()
    try:
        assert stages.paused.wait(30)
        operations.cancel(instance_store, job_id, by="test")
        stages.pause.clear()  # the stage finishes; the worker's next write is refused and it drops the job
        wait_for(lambda: stages.inside == 0 and runner.budget.used == 0)
        later = add_series(instance_store, tmp_path / "ct2", seed=2, now=50.0)
        wait_for(lambda: job(instance_store, later).state == JobState.EXPORTED)  # the worker carries on
        assert runner.problems() == []
    finally:
        runner.stop()
    row = job(instance_store, job_id)
    assert row.state == JobState.CANCELLED and "failure" not in row.detail
    assert "inference" not in row.detail and "outputs" not in row.detail, "nothing written after the cancel"
    assert [c.outcome for c in lifecycle.claims_of(instance_store, job_id)] == ["cancelled"]
    assert row.detail["cancelled"]["from"] == "inferring"


def test_the_memory_budget_keeps_jobs_that_do_not_fit_together_apart(
    instance_store: InstanceStore, stages: Stages, tmp_path: Path
) -> None:
    ids = [add_series(instance_store, tmp_path / f"ct{k}", seed=k, now=10.0 * k) for k in range(3)]
    share = estimate_job_bytes(instance_store, ids[0])
    assert share == 8 * 32 * 32 * BYTES_PER_VOXEL
    settings = JobsSettings(workers=3, poll_s=0.05, memory_budget_bytes=int(share * 1.5))
    runner = JobRunner(instance_store, settings, stages.pipeline())
    runner.start()
    try:
        wait_for(lambda: all(job(instance_store, k).state == JobState.EXPORTED for k in ids))
    finally:
        runner.stop()
    assert stages.most_inside == 1, "two jobs never fit in the budget together"


def test_a_job_larger_than_the_whole_budget_runs_alone() -> None:
    budget = MemoryBudget(100)
    stop = threading.Event()
    assert budget.acquire(500, stop, timeout_s=0.1), "nothing else runs: it is admitted"
    assert not budget.acquire(10, stop, timeout_s=0.1), "nothing beside it"
    budget.release(500)
    assert budget.acquire(10, stop, timeout_s=0.1) and budget.used == 10


def test_no_job_is_claimed_while_the_disk_is_below_the_watermark(stages: Stages, tmp_path: Path) -> None:
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "data2", min_free_bytes=0))
    try:
        job_id = add_series(store, tmp_path / "ct")
        store.settings.min_free_bytes = 1 << 60  # more than any disk has
        assert not JobRunner(store, JobsSettings(workers=0), stages.pipeline()).run_once()
        assert job(store, job_id).state == JobState.RECEIVED
    finally:
        store.close()


def test_leased_states_are_exactly_those_between_the_durable_ones() -> None:
    durable_or_final = set(JobState) - LEASED
    assert durable_or_final == {
        JobState.RECEIVED,
        JobState.ENCODED,
        JobState.EXPORTED,
        JobState.SKIPPED,
        JobState.FAILED,
        JobState.CANCELLED,
    }
    for state in LEASED:
        assert (state, JobState.RECEIVED) in TRANSITIONS and (state, JobState.FAILED) in TRANSITIONS


def test_a_reclaimed_job_of_an_old_gateway_without_a_lease_goes_round_again(
    instance_store: InstanceStore, tmp_path: Path
) -> None:
    job_id = add_series(instance_store, tmp_path / "ct")
    with instance_store.write_sessions.begin() as session:  # as gateway 0.1.0 left a job it was encoding
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.ENCODING))
    assert lifecycle.reclaim_expired(instance_store) == [job_id]
    with instance_store.sessions() as session:
        assert session.scalar(select(Job.state).where(Job.id == job_id)) == JobState.RECEIVED
