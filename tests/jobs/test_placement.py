"""A worker restricted to some models (``cluster.models``) takes only jobs no other model may apply to.

Real registry (two tiny ONNX models), real series stored and completed, real header reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ExportSettings, JobsSettings
from gateway.infer.runtime import InferenceRuntime
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
