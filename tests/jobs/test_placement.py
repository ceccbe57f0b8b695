"""A worker restricted to some models (``cluster.models``) takes only jobs no other model may apply to.

Real registry (two tiny ONNX models), real series stored and completed, real header reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ExportSettings, JobsSettings
from gateway.infer.runtime import InferenceRuntime
from gateway.jobs import lifecycle
from gateway.jobs.encoding import EncodeStage
from gateway.jobs.inference import InferenceStage
from gateway.jobs.placement import Placement, foreign_models
from gateway.jobs.runner import JobRunner, Pipeline
from gateway.jobs.states import JobState
from gateway.registry.registry import Registry
from gateway.store.index import Job
from gateway.store.store import InstanceStore

from job_rows import add_stored_series
from model_packages import manifest_dict, write_package
from peers import wait_until


@pytest.fixture
def registry(instance_store: InstanceStore, tmp_path: Path) -> Registry:
    made = Registry(instance_store, dry_run=None)
    made.register(write_package(tmp_path / "ct-only", manifest_dict("ct-only", select={"modality": ["CT"]})))
    made.register(write_package(tmp_path / "mr-only", manifest_dict("mr-only", select={"modality": ["MR"]})))
    return made


def test_a_worker_of_every_model_takes_every_job(
    instance_store: InstanceStore, registry: Registry, tmp_path: Path
) -> None:
    job_id = add_stored_series(instance_store, tmp_path / "ct")
    assert Placement(instance_store, registry, None).takes(job_id)


def test_a_worker_without_the_model_that_applies_leaves_the_job(
    instance_store: InstanceStore, registry: Registry, tmp_path: Path
) -> None:
    job_id = add_stored_series(instance_store, tmp_path / "ct")  # a CT: ct-only applies, mr-only does not
    assert foreign_models(instance_store, job_id, registry.active(), {"mr-only"}) == ["ct-only"]
    mr_worker = Placement(instance_store, registry, ["mr-only"])
    assert not mr_worker.takes(job_id)
    assert mr_worker.passed_over() == {job_id}
    ct_worker = Placement(instance_store, registry, ["ct-only"])
    assert ct_worker.takes(job_id), "the MR model's rules do not pass on a CT: nothing is foreign"
    assert ct_worker.passed_over() == set()


def test_a_decision_is_made_again_once_the_registry_changed(
    instance_store: InstanceStore, registry: Registry, tmp_path: Path
) -> None:
    job_id = add_stored_series(instance_store, tmp_path / "ct")
    mr_worker = Placement(instance_store, registry, ["mr-only"])
    assert not mr_worker.takes(job_id)
    registry.disable("ct-only")
    assert not mr_worker.takes(job_id), "remembered until told"
    mr_worker.forget()
    assert mr_worker.takes(job_id), "no active model outside its list applies any more"


def test_a_restricted_runner_passes_the_job_over_and_claims_nothing(
    instance_store: InstanceStore, registry: Registry, tmp_path: Path
) -> None:
    job_id = add_stored_series(instance_store, tmp_path / "ct")
    placement = Placement(instance_store, registry, ["mr-only"])
    stages = Pipeline(
        InferenceStage(instance_store, registry, InferenceRuntime("cpu", batching=False), None, runs=["mr-only"]),
        EncodeStage(instance_store, ExportSettings(), tmp_path / "outputs"),
    )
    runner = JobRunner(instance_store, JobsSettings(workers=0), stages, placement=placement)
    assert runner.run_once(), "it looked at the job"
    assert not runner.run_once(), "and passes it over from then on"
    with instance_store.sessions() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.state == JobState.RECEIVED and row.attempts == 0


def test_claim_many_takes_the_claimable_ones_in_one_transaction(index_store: InstanceStore, tmp_path: Path) -> None:
    first = add_stored_series(index_store, tmp_path / "a", seed=1)
    second = add_stored_series(index_store, tmp_path / "b", seed=2, now=10.0)
    held = add_stored_series(index_store, tmp_path / "c", seed=3, now=20.0)
    assert lifecycle.claim(index_store, "host/1/other", 60.0, max_attempts=3, job_id=held) is not None
    leases = lifecycle.claim_many(index_store, "host/2/me", 60.0, [first, second, held], max_attempts=3)
    assert [lease.job_id for lease in leases] == [first, second], "the job another worker holds is skipped"
    mine = [c for j in (first, second) for c in lifecycle.claims_of(index_store, j)]
    assert {c.owner for c in mine} == {"host/2/me"} and len({c.claimed_at for c in mine}) == 1


def test_an_idle_pool_claims_a_batch_of_jobs_for_the_same_model_at_once(
    instance_store: InstanceStore, registry: Registry, tmp_path: Path
) -> None:
    runtime = InferenceRuntime("cpu", batching=True)
    stages = Pipeline(
        InferenceStage(instance_store, registry, runtime, None),
        EncodeStage(instance_store, ExportSettings(), tmp_path / "outputs"),
    )
    placement = Placement(instance_store, registry, None)
    runner = JobRunner(instance_store, JobsSettings(workers=3, poll_s=30.0), stages, placement=placement)
    runner.start()
    try:
        wait_until(lambda: runner._idle == 3, timeout_s=30, what="three idle job threads")
        jobs = [add_stored_series(instance_store, tmp_path / f"ct{k}", seed=k, now=float(k)) for k in range(3)]
        runner.wake()
        wait_until(
            lambda: all(job_state(instance_store, j) == JobState.EXPORTED for j in jobs),
            timeout_s=120,
            what="the three jobs exported",
        )
    finally:
        runner.stop()
        runtime.close()
    claims = [c for j in jobs for c in lifecycle.claims_of(instance_store, j)]
    assert len(claims) == 3 and len({c.claimed_at for c in claims}) == 1, "one transaction claimed the three"
    assert all(c.outcome == "exported" for c in claims)
    assert placement.models_of(jobs[0]) == {"ct-only"}


def test_jobs_for_other_models_are_not_grouped(
    instance_store: InstanceStore, registry: Registry, tmp_path: Path
) -> None:
    ct = add_stored_series(instance_store, tmp_path / "ct", seed=1)
    mr = add_stored_series(instance_store, tmp_path / "mr", seed=2, now=5.0, modality="MR")
    placement = Placement(instance_store, registry, None)
    assert placement.models_of(ct) == {"ct-only"} and placement.models_of(mr) == {"mr-only"}
    assert placement.batch_of({"ct-only"}) == 4  # the tiny model's inference.batch_size (the manifest default)


def job_state(store: InstanceStore, job_id: int) -> str:
    with store.sessions() as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row.state
