"""One series through routing and inference: the part shared by ``gateway serve`` (a job) and ``gateway run`` (files).

:func:`run_models` routes the series' volumes against the active models and runs every model that qualifies. A
model that fails does not stop the others: its failure is returned with the reason, and the caller decides what it
means for the job. The models it is given are the ones the runtime keeps loaded: any other version is unloaded
(:meth:`~gateway.infer.runtime.InferenceRuntime.retain`), and a version that failed to load is not loaded again
until it is registered again or its model enabled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.assemble.model import Volume
    from gateway.infer.results import ModelResult
    from gateway.infer.runtime import InferenceRuntime
    from gateway.registry.registry import RegisteredModel
    from gateway.route.route import Decision, SeriesFacts

__all__ = ["ModelFailure", "SeriesOutcome", "run_models"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFailure:
    """A model that qualified but failed on this series, and why (no patient data)."""

    model: str
    reason: str


@dataclass(frozen=True)
class SeriesOutcome:
    """The routing decisions, the results of the models that ran, and the failures."""

    decisions: tuple[Decision, ...]
    results: tuple[ModelResult, ...] = ()
    failures: tuple[ModelFailure, ...] = field(default_factory=tuple)

    def summary(self) -> dict[str, Any]:
        """What a job records: every decision with its reason, each result's measurements, each failure."""
        return {
            "routing": [d.as_dict() for d in self.decisions],
            "results": [result_summary(r) for r in self.results],
            "failures": [{"model": f.model, "reason": f.reason} for f in self.failures],
        }


def result_summary(result: ModelResult) -> dict[str, Any]:
    """A model result as JSON-ready data (measurements, lesions, classifications, notes, timings; no voxels)."""
    return {
        "model": f"{result.name}@{result.version}",
        "sha256": result.sha256,
        "measurements": [m.as_dict() for m in result.measurements],
        "lesions": [lesions.as_dict() for lesions in result.lesions.values()],
        "classifications": [c.as_dict() for c in result.classifications],
        "maps": sorted(result.maps),
        "notes": list(result.notes),
        "timings": dict(result.timings),
    }


def run_models(
    facts: SeriesFacts,
    volumes: Sequence[Volume],
    models: Sequence[RegisteredModel],
    runtime: InferenceRuntime,
) -> SeriesOutcome:
    """Route ``volumes`` against ``models`` and run each model that qualifies.

    Parameters
    ----------
    facts
        The series' header facts (Modality, BodyPartExamined, ImageType, SeriesDescription).
    volumes
        The volumes assembly built for the series.
    models
        The active models (one version each), read from the registry for this series: the runtime keeps these
        loaded and unloads every other version.
    runtime
        Where models run (one loaded session per model and device, batched across concurrent callers).

    Returns
    -------
    SeriesOutcome
        Decisions for every model, results of those that ran, failures with reasons.
    """
    from gateway.route.route import route

    runtime.retain(models)
    by_ref = {f"{m.name}@{m.version}": m for m in models}
    decisions = tuple(route(facts, volumes, [m.manifest for m in models]))
    results: list[ModelResult] = []
    failures: list[ModelFailure] = []
    for decision in decisions:
        if not decision.run or decision.volume_index is None:
            continue
        model = by_ref[decision.model]
        volume = volumes[decision.volume_index]
        try:
            results.append(runtime.run(model.manifest, model.folder, model.sha256, volume, changed_at=model.changed_at))
        except GatewayError as exc:
            failures.append(ModelFailure(decision.model, str(exc)))
        except Exception as exc:  # a model's own bug fails that model on this series, never the caller
            log.exception("model %s failed", decision.model)
            failures.append(ModelFailure(decision.model, f"{type(exc).__name__}: {exc}"))
    return SeriesOutcome(decisions, tuple(results), tuple(failures))
