"""The inference stage of a job: route the assembled volumes and run the models that apply.

The runner (:mod:`gateway.jobs.runner`) moves the job ``inferring`` and records the outcome: ``inferred``, or
``skipped`` / ``failed`` with the reasons; then the encode stage follows on the results still in memory.

Right after assembly, in the same worker, the job's volumes are routed against the enabled models (read from the
registry at that moment, so a model registered while the gateway runs serves the next job) and each model that
qualifies runs. The job records every routing decision with its reason, each result's measurements and where its
files are, and the stage timings. A job no model applies to ends ``skipped``; a model failure fails the job with
the model and the reason, never the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select

from gateway.assemble.assemble import AssemblyResult
from gateway.infer.runtime import InferenceRuntime
from gateway.infer.series import SeriesOutcome, run_models
from gateway.jobs.states import JobState
from gateway.registry.registry import Registry
from gateway.route.route import SeriesFacts, series_facts
from gateway.store.index import Instance
from gateway.store.store import InstanceStore

__all__ = ["InferenceStage", "Inferred"]

log = logging.getLogger(__name__)

NO_MODEL = "no enabled model applies to this series (see inference.routing for each reason)"


@dataclass(frozen=True)
class Inferred:
    """What the inference stage gave: the routing and runs, the NIfTI files written, a failure, the seconds."""

    outcome: SeriesOutcome
    files: dict[str, list[str]]
    failure: str | None
    seconds: float

    @property
    def state(self) -> JobState:
        """``failed`` if a model failed, ``inferred`` if any ran, else ``skipped``."""
        if self.failure:
            return JobState.FAILED
        return JobState.INFERRED if self.outcome.results else JobState.SKIPPED

    def entries(self) -> dict[str, Any]:
        """What the job records of it."""
        state = self.state
        return {
            "inference": {**self.outcome.summary(), "files": self.files},
            "skipped": NO_MODEL if state is JobState.SKIPPED else None,
            "failure": {"stage": "infer", "reason": self.failure} if self.failure else None,
        }


class InferenceStage:
    """Routes and runs the models for an assembled job and records the outcome.

    Parameters
    ----------
    store
        The instance store (the job index lives there).
    registry
        The model registry; :meth:`Registry.active` is read for every job.
    runtime
        The inference runtime shared by all workers (its batchers merge work from concurrent jobs).
    results_dir
        Where each job's NIfTI results go (``<results_dir>/job-<id>/``), or ``None`` to write none (the
        measurements are on the job, the DICOM outputs come from the encode stage).
    runs
        The model names this worker runs (``cluster.models``); ``None``: every active model.
    """

    def __init__(
        self,
        store: InstanceStore,
        registry: Registry,
        runtime: InferenceRuntime,
        results_dir: Path | None,
        *,
        runs: Collection[str] | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._runtime = runtime
        self._results_dir = results_dir
        self._runs = None if runs is None else frozenset(runs)

    def __call__(self, job_id: int, assembly: AssemblyResult) -> Inferred:
        """Route and run the models for ``job_id`` on the volumes assembly built; the runner records the outcome."""
        started = time.monotonic()
        facts = self._facts(assembly)
        active = [m for m in self._registry.active() if self._runs is None or m.name in self._runs]
        outcome = run_models(facts, assembly.volumes, active, self._runtime)
        files = self._write(job_id, outcome)
        failure = "; ".join(f"{f.model}: {f.reason}" for f in outcome.failures) or None
        inferred = Inferred(outcome, files, failure, time.monotonic() - started)
        log.info("job %d %s in %.1f s", job_id, inferred.state.value, inferred.seconds)
        return inferred

    def _facts(self, assembly: AssemblyResult) -> SeriesFacts:
        """Header facts of the series, read from the first instance of its first volume."""
        uid = assembly.volumes[0].slices[0].sop_instance_uid
        with self._store.sessions() as session:
            path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == uid).limit(1))
        assert path is not None, "an assembled volume's instances are in the index"
        return series_facts(dcmread(self._store.path_of(path), stop_before_pixels=True))

    def _write(self, job_id: int, outcome: SeriesOutcome) -> dict[str, list[str]]:
        from gateway.infer.outputs import write_model_outputs  # NIfTI (nibabel) only when results are kept as files

        files: dict[str, list[str]] = {}
        if self._results_dir is None:
            return files
        folder = self._results_dir / f"job-{job_id}"
        for k, result in enumerate(outcome.results):
            stem = f"volume{k}"
            written = write_model_outputs(result, folder, stem)
            files[f"{result.name}@{result.version}"] = [str(p.relative_to(self._results_dir)) for p in written]
        return files
