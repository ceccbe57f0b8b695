"""The inference stage of a job: ``assembled -> inferring -> inferred`` (or ``skipped`` / ``failed``, with reasons).

Then the encode stage follows in the same thread (``then``), on the results still in memory.

Right after assembly, in the same worker, the job's volumes are routed against the enabled models (read from the
registry at that moment, so a model registered while the gateway runs serves the next job) and each model that
qualifies runs. The job records every routing decision with its reason, each result's measurements and where its
files are, and the stage timings. A job no model applies to ends ``skipped``; a model failure fails the job with
the model and the reason, never the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from gateway.assemble.assemble import AssemblyResult
from gateway.infer.outputs import write_model_outputs
from gateway.infer.results import ModelResult
from gateway.infer.runtime import InferenceRuntime
from gateway.infer.series import SeriesOutcome, run_models
from gateway.jobs.record import advance, record
from gateway.jobs.states import JobState
from gateway.registry.registry import Registry
from gateway.route.route import SeriesFacts, series_facts
from gateway.store.index import Instance
from gateway.store.store import InstanceStore

__all__ = ["InferenceStage"]

log = logging.getLogger(__name__)


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
    then
        The next stage, called in the same thread with the job id and the results of a job that ended ``inferred``.
    """

    def __init__(
        self,
        store: InstanceStore,
        registry: Registry,
        runtime: InferenceRuntime,
        results_dir: Path | None,
        then: Callable[[int, Sequence[ModelResult]], None] | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._runtime = runtime
        self._results_dir = results_dir
        self._then = then

    def __call__(self, job_id: int, assembly: AssemblyResult) -> None:
        """Run the stage for ``job_id`` (already ``assembled``) on the volumes assembly built."""
        if not advance(self._store, job_id, JobState.ASSEMBLED, JobState.INFERRING):
            return
        started = time.monotonic()
        outcome: SeriesOutcome | None = None
        files: dict[str, list[str]] = {}
        try:
            facts = self._facts(assembly)
            outcome = run_models(facts, assembly.volumes, self._registry.active(), self._runtime)
            files = self._write(job_id, outcome)
        except Exception as exc:  # one bad job fails, never the worker
            log.exception("inference of job %d failed", job_id)
            self._finish(job_id, None, {}, f"inference failed: {type(exc).__name__}: {exc}", started)
            return
        failure = "; ".join(f"{f.model}: {f.reason}" for f in outcome.failures) or None
        self._finish(job_id, outcome, files, failure, started)
        if failure is None and outcome.results and self._then is not None:
            self._then(job_id, outcome.results)

    def _facts(self, assembly: AssemblyResult) -> SeriesFacts:
        """Header facts of the series, read from the first instance of its first volume."""
        uid = assembly.volumes[0].slices[0].sop_instance_uid
        with self._store.sessions() as session:
            path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == uid).limit(1))
        assert path is not None, "an assembled volume's instances are in the index"
        return series_facts(dcmread(self._store.path_of(path), stop_before_pixels=True))

    def _write(self, job_id: int, outcome: SeriesOutcome) -> dict[str, list[str]]:
        files: dict[str, list[str]] = {}
        if self._results_dir is None:
            return files
        folder = self._results_dir / f"job-{job_id}"
        for k, result in enumerate(outcome.results):
            stem = f"volume{k}"
            written = write_model_outputs(result, folder, stem)
            files[f"{result.name}@{result.version}"] = [str(p.relative_to(self._results_dir)) for p in written]
        return files

    def _finish(
        self,
        job_id: int,
        outcome: SeriesOutcome | None,
        files: dict[str, list[str]],
        failure: str | None,
        started: float,
    ) -> None:
        seconds = time.monotonic() - started
        ran = bool(outcome and outcome.results)
        state = JobState.FAILED if failure else (JobState.INFERRED if ran else JobState.SKIPPED)
        skipped = outcome is not None and not ran and not failure
        no_model = "no enabled model applies to this series (see inference.routing for each reason)"
        record(
            self._store,
            job_id,
            timing=("infer_s", seconds),
            state=state,
            inference={**outcome.summary(), "files": files} if outcome is not None else None,
            skipped=no_model if skipped else None,
            failure={"stage": "infer", "reason": failure} if failure is not None else None,
        )
        log.info("job %d %s in %.1f s", job_id, state.value, seconds)
