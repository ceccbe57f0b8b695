"""Which jobs a worker process takes: every job, or, with ``cluster.models``, only jobs it can run in full.

A worker started with ``gateway serve --role worker --models a,b`` (one per GPU, say, with the heavy models) runs
only those models. Before it claims a job it reads the header of one of the job's instances and checks the
series-level rules (modality, body part, image type, description: :func:`gateway.route.route.series_checks`) of
every active model. If a model outside its list may apply, it leaves the job to another worker: a job's models all
run in one worker, whose batcher and memory hold the job's volumes once. The volume-level rules (slices,
orientation, ...) need the assembled volume and are checked after the claim, as in any worker.

A job that no live worker takes waits ``received``; ``/api/workers`` lists each worker's models, and the worker
logs, once per job, which model it left the job for.

The same header check groups jobs: a worker with idle job threads that claims a job also claims, at once, up to a
forward pass's worth (the model's ``inference.batch_size``) of the next ready jobs the same models apply to
(:meth:`Placement.models_of`, :meth:`Placement.batch_of`), so that their patches share forward passes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Sequence

from pydicom import dcmread
from sqlalchemy import select

from gateway.registry.registry import RegisteredModel, Registry
from gateway.route.route import series_checks, series_facts
from gateway.store.index import Instance, Job
from gateway.store.store import InstanceStore

__all__ = ["Placement", "applicable_models", "foreign_models"]

log = logging.getLogger(__name__)

_REMEMBERED = 1024  # decisions kept per worker process (a job's series does not change while it waits)


def applicable_models(store: InstanceStore, job_id: int, active: Sequence[RegisteredModel]) -> list[str]:
    """The names of the ``active`` models whose series-level rules the job's series passes (its header, read once).

    Empty when the job has no instance left to read (a purged series): the claim then fails it as any worker would.
    """
    if not active:
        return []
    with store.sessions() as session:
        path = session.scalar(
            select(Instance.path)
            .join(Job, Job.series_instance_uid == Instance.series_instance_uid)
            .where(Job.id == job_id)
            .limit(1)
        )
    if path is None:
        return []
    facts = series_facts(dcmread(store.path_of(path), stop_before_pixels=True))
    return [m.name for m in active if all(check.passed for check in series_checks(facts, m.manifest.select))]


def foreign_models(
    store: InstanceStore, job_id: int, active: Sequence[RegisteredModel], runs: Collection[str]
) -> list[str]:
    """The names of the active models outside ``runs`` whose series-level rules the job's series passes."""
    return applicable_models(store, job_id, [m for m in active if m.name not in runs])


class Placement:
    """A worker's choice of jobs (see the module docstring).

    Parameters
    ----------
    store
        The instance store (the index and the series' files).
    registry
        The model registry (its active models are read for each decision).
    runs
        The model names this worker runs; ``None``: every model, and every job is taken.
    """

    def __init__(self, store: InstanceStore, registry: Registry, runs: Collection[str] | None) -> None:
        self._store = store
        self._registry = registry
        self.runs = None if runs is None else frozenset(runs)
        self._decided: OrderedDict[int, bool] = OrderedDict()
        self._models: OrderedDict[int, frozenset[str]] = OrderedDict()

    def takes(self, job_id: int) -> bool:
        """Whether this worker takes the job (``True`` for a worker that runs every model)."""
        if self.runs is None:
            return True
        known = self._decided.get(job_id)
        if known is not None:
            return known
        foreign = foreign_models(self._store, job_id, self._registry.active(), self.runs)
        if foreign:
            log.info("job %d left for a worker that runs %s", job_id, ", ".join(sorted(foreign)))
        self._decided[job_id] = not foreign
        while len(self._decided) > _REMEMBERED:
            self._decided.popitem(last=False)
        return not foreign

    def forget(self) -> None:
        """Drop the decisions made (the registry changed: a model enabled may change them)."""
        self._decided.clear()
        self._models.clear()

    def models_of(self, job_id: int) -> frozenset[str]:
        """The models this worker runs that may apply to the job (series-level rules; remembered per job)."""
        known = self._models.get(job_id)
        if known is None:
            active = [m for m in self._registry.active() if self.runs is None or m.name in self.runs]
            known = self._models[job_id] = frozenset(applicable_models(self._store, job_id, active))
            while len(self._models) > _REMEMBERED:
                self._models.popitem(last=False)
        return known

    def batch_of(self, models: Collection[str]) -> int:
        """How many jobs of ``models`` fill a forward pass: the largest ``inference.batch_size`` among them."""
        sizes = [m.manifest.inference.batch_size for m in self._registry.active() if m.name in models]
        return max(sizes, default=1)

    def passed_over(self) -> set[int]:
        """The jobs this worker decided to leave to others (those it still remembers)."""
        return {job_id for job_id, taken in self._decided.items() if not taken}
