"""Prometheus metrics of one gateway: what the stages count as they work, and gauges read when scraped.

One :class:`GatewayMetrics` per :class:`gateway.runtime.Gateway`, each with its own
:class:`prometheus_client.CollectorRegistry` (never the process-wide one: a test process runs many gateways). The
stages get it as an optional argument and call its methods; ``GET /metrics`` (:mod:`gateway.api.metrics`) serves
:meth:`GatewayMetrics.render`.

Counted as it happens:

- ``gateway_instances_received_total{transport,outcome}``: each instance offered by C-STORE (``dimse``) or STOW-RS
  (``stow``) and what became of it (``stored``, ``duplicate``, ``refused`` for want of resources, ``invalid``,
  ``error`` for an unexpected fault); ``gateway_store_seconds``: the time to store one;
- ``gateway_job_stage_seconds{stage,model}``: a job's ``assemble``, ``infer`` (per model), ``encode`` and ``export``;
- ``gateway_inference_batch_size{model}`` and ``gateway_inference_seconds{model}``: each batch a model runs;
- ``gateway_export_attempts_total{destination,outcome}`` and ``gateway_jobs_undelivered_total``.

Read from the index and the gateway at scrape time (two ``GROUP BY`` queries and one ``MIN``, on indexed columns):
``gateway_jobs{state}``, ``gateway_queue_oldest_seconds`` (how long the oldest ``received`` job has waited),
``gateway_deliveries{destination,state}``, ``gateway_disk_free_bytes`` and ``gateway_accepting``.

Several gateway processes may share one index (``gateway serve --role``): each serves its own ``/metrics``, and
every sample it serves carries the label ``worker="<host/pid/token>"`` (the process's owner name, the one its job
leases and the workers table carry), so that the series of several processes never collide, also when a
Prometheus job scrapes them behind one address. The index gauges are the same from every process: aggregate them
with ``max by (state)``, not ``sum``.

This module sits below every stage: it imports only the index's tables, never a stage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.store.index import Delivery, Job

__all__ = [
    "CONTENT_TYPE",
    "WORKER_LABEL",
    "GatewayMetrics",
    "IndexCounts",
    "IngestState",
    "RecentIngest",
    "count_index",
]

log = logging.getLogger(__name__)

#: The text exposition format's content type (what ``GET /metrics`` answers with).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The label every sample of a process's exposition carries: which gateway process it comes from.
WORKER_LABEL = "worker"

#: Outcomes of an offered instance that count as received (the rest count as refused).
RECEIVED_OUTCOMES = frozenset({"stored", "duplicate"})

_DELIVERED = "delivered"  # a delivery's final state once sent (gateway.export.queue)
_DAY_S = 86_400
_HOUR_S = 3_600
_MINUTE_S = 60

_STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_INFER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class RecentIngest:
    """Instances received (stored or duplicate) and refused (any other outcome) in the last hour and day.

    Counted in memory since ``started_at`` (a gateway's start): a window longer than the gateway has run covers
    only what it saw since then.
    """

    started_at: float
    received_hour: int
    refused_hour: int
    received_day: int
    refused_day: int


@dataclass(frozen=True)
class IndexCounts:
    """What the index holds now: jobs by state, the oldest ``received`` job's wait start, deliveries by
    (destination, state)."""

    jobs: Mapping[str, int]
    oldest_received_at: float | None
    deliveries: Mapping[tuple[str, str], int]


@dataclass(frozen=True)
class IngestState:
    """The data folder's free bytes, and whether ingest accepts instances now."""

    free_bytes: int
    accepting: bool


def count_index(sessions: sessionmaker[Session]) -> IndexCounts:
    """Count jobs by state and deliveries by (destination, state), and find when the oldest ``received`` job
    started waiting (its ``updated_at``: the time it entered ``received``, also after a hand-back or a re-run).

    Each query reads an index, not the table (``ix_jobs_state``, ``ix_deliveries_due``,
    ``ix_deliveries_destination``): a few milliseconds at 10,000 jobs and 40,000 deliveries.

    Parameters
    ----------
    sessions
        Read sessions of the index.
    """
    with sessions() as session:
        jobs = {str(state): int(n) for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}
        oldest = session.scalar(select(func.min(Job.updated_at)).where(Job.state == "received"))
        deliveries = _count_deliveries(session)
    return IndexCounts(jobs, None if oldest is None else float(oldest), deliveries)


def _count_deliveries(session: Session) -> dict[tuple[str, str], int]:
    """Deliveries by (destination, state) without a ``GROUP BY`` over the whole table (no index has both columns):
    the states other than ``delivered`` (few rows, found by the state index), and ``delivered`` as the rest of each
    destination's total (counted on the destination index)."""
    states = [str(s) for s in session.scalars(select(Delivery.state).group_by(Delivery.state))]
    totals = session.execute(select(Delivery.destination, func.count()).group_by(Delivery.destination)).all()
    counts: dict[tuple[str, str], int] = {}
    others = [s for s in states if s != _DELIVERED]
    if others:
        rows = session.execute(
            select(Delivery.destination, Delivery.state, func.count())
            .where(Delivery.state.in_(others))
            .group_by(Delivery.destination, Delivery.state)
        )
        counts = {(str(dest), str(state)): int(n) for dest, state, n in rows}
    if _DELIVERED in states:
        for dest, total in totals:
            rest = int(total) - sum(n for (d, _), n in counts.items() if d == dest)
            if rest > 0:
                counts[(str(dest), _DELIVERED)] = rest
    return counts


class _MinuteCounts:
    """Received and refused instances per minute over the last day (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._minutes: dict[int, list[int]] = {}

    def add(self, received: bool, now: float) -> None:
        minute = int(now // _MINUTE_S)
        with self._lock:
            counts = self._minutes.get(minute)
            if counts is None:
                self._prune(minute)
                counts = self._minutes[minute] = [0, 0]
            counts[0 if received else 1] += 1

    def _prune(self, minute: int) -> None:
        oldest = minute - _DAY_S // _MINUTE_S
        for old in [m for m in self._minutes if m <= oldest]:
            del self._minutes[old]

    def window(self, seconds: int, now: float) -> tuple[int, int]:
        """(received, refused) in the ``seconds`` up to ``now``, to the minute."""
        first = int(now // _MINUTE_S) - seconds // _MINUTE_S
        with self._lock:
            counts = [c for m, c in self._minutes.items() if m > first]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)


class _ScrapeCollector(Collector):
    """The gauges read at scrape time, from the index and the gateway."""

    def __init__(
        self,
        sessions: sessionmaker[Session] | None,
        ingest: Callable[[], IngestState] | None,
        job_states: Iterable[str],
    ) -> None:
        self._sessions = sessions
        self._ingest = ingest
        self._job_states = tuple(job_states)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self._index_gauges()
        if self._ingest is not None:
            try:
                state = self._ingest()
            except OSError as exc:  # the data folder cannot be measured: serve the rest
                log.warning("metrics: the data folder's disk could not be measured: %s", exc.strerror)
                return
            yield from _ingest_gauges(state)

    def _index_gauges(self) -> Iterator[Metric]:
        if self._sessions is None:
            return
        try:
            counts = count_index(self._sessions)
        except SQLAlchemyError as exc:  # the index closed or unreachable: the counters are still worth serving
            log.warning("metrics: the index could not be read: %s", type(exc).__name__)
            return
        jobs = GaugeMetricFamily("gateway_jobs", "Jobs in the index, by state.", labels=["state"])
        for state in sorted({*self._job_states, *counts.jobs}):
            jobs.add_metric([state], counts.jobs.get(state, 0))
        yield jobs
        oldest = 0.0 if counts.oldest_received_at is None else max(0.0, time.time() - counts.oldest_received_at)
        yield GaugeMetricFamily(
            "gateway_queue_oldest_seconds", "How long the oldest received job has waited (0 when none).", value=oldest
        )
        deliveries = GaugeMetricFamily(
            "gateway_deliveries",
            "Deliveries in the export queue, by destination and state.",
            labels=["destination", "state"],
        )
        for (destination, state), n in sorted(counts.deliveries.items()):
            deliveries.add_metric([destination, state], n)
        yield deliveries


def _ingest_gauges(state: IngestState) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "gateway_disk_free_bytes", "Free bytes on the data folder's file system.", value=state.free_bytes
    )
    yield GaugeMetricFamily(
        "gateway_accepting",
        "1 while ingest accepts instances (disk above the floor, listener up).",
        value=int(state.accepting),
    )


class _Labelled(Collector):
    """Every metric of ``registry`` with the constant label ``name=value`` added to each of its samples."""

    def __init__(self, registry: CollectorRegistry, name: str, value: str) -> None:
        self._registry = registry
        self._name = name
        self._value = value

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [
                sample._replace(labels={**sample.labels, self._name: self._value}) for sample in metric.samples
            ]
            yield labelled


class GatewayMetrics:
    """The metrics of one gateway, in their own registry.

    Parameters
    ----------
    sessions
        Read sessions of the index, for the scrape-time gauges of jobs, the queue and deliveries (left out: none).
    ingest
        Called at scrape time for the free disk and whether ingest accepts (left out: no such gauges).
    job_states
        Every job state, so that ``gateway_jobs`` shows a state with no job as 0.
    worker
        This process's owner name (``host/pid/token``): :meth:`render` adds it to every sample as the label
        ``worker``. Left out: no such label (one process alone). :attr:`registry` holds the samples without it.
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session] | None = None,
        ingest: Callable[[], IngestState] | None = None,
        job_states: Iterable[str] = (),
        worker: str | None = None,
    ) -> None:
        if worker is not None and not worker:
            raise ValueError("worker must name the process (host/pid/token), or be None")
        self.registry = CollectorRegistry(auto_describe=False)
        #: This process's name, the ``worker`` label of every sample :meth:`render` serves (``None``: no label).
        self.worker = worker
        self._exposed: Collector = self.registry if worker is None else _Labelled(self.registry, WORKER_LABEL, worker)
        #: When counting began (the gateway was made): the start of :meth:`recent_ingest`'s windows.
        self.started_at = time.time()
        self._recent = _MinuteCounts()
        r = self.registry
        self._received = Counter(
            "gateway_instances_received",
            "Instances offered, by transport and outcome.",
            ["transport", "outcome"],
            registry=r,
        )
        self._store_seconds = Histogram(
            "gateway_store_seconds",
            "Time to store one instance received by C-STORE (in place and indexed).",
            buckets=_STORE_BUCKETS,
            registry=r,
        )
        self._stage_seconds = Histogram(
            "gateway_job_stage_seconds",
            "Time a job spent in a stage (model: the model's reference for infer, else empty).",
            ["stage", "model"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self._batch_size = Histogram(
            "gateway_inference_batch_size", "Inputs per inference batch.", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self._infer_seconds = Histogram(
            "gateway_inference_seconds",
            "Time to run one inference batch.",
            ["model"],
            buckets=_INFER_BUCKETS,
            registry=r,
        )
        self._export_attempts = Counter(
            "gateway_export_attempts",
            "Delivery attempts, by destination and outcome.",
            ["destination", "outcome"],
            registry=r,
        )
        self._undelivered = Counter(
            "gateway_jobs_undelivered", "Jobs whose results had no destination to go to.", registry=r
        )
        r.register(_ScrapeCollector(sessions, ingest, job_states))

    def instance_received(self, transport: str, outcome: str, seconds: float | None = None) -> None:
        """Count an offered instance.

        Parameters
        ----------
        transport
            ``dimse`` or ``stow``.
        outcome
            ``stored``, ``duplicate``, ``refused``, ``invalid`` or ``error``.
        seconds
            The time it took to store (observed in ``gateway_store_seconds`` when given).
        """
        self._received.labels(transport, outcome).inc()
        if seconds is not None:
            self._store_seconds.observe(seconds)
        self._recent.add(outcome in RECEIVED_OUTCOMES, time.time())

    def job_stage(self, stage: str, model: str, seconds: float) -> None:
        """Observe the time a job spent in ``stage`` (``assemble``, ``infer``, ``encode``, ``export``); ``model``
        is the model's reference for ``infer``, else ``""``."""
        self._stage_seconds.labels(stage, model).observe(seconds)

    def inference_batch(self, model: str, size: int, seconds: float) -> None:
        """Observe one inference batch of ``size`` inputs that took ``seconds``."""
        self._batch_size.labels(model).observe(size)
        self._infer_seconds.labels(model).observe(seconds)

    def export_attempt(self, destination: str, outcome: str) -> None:
        """Count one delivery attempt to ``destination`` and its outcome (e.g. ``delivered``, ``retry``, ``dead``)."""
        self._export_attempts.labels(destination, outcome).inc()

    def job_undelivered(self) -> None:
        """Count a job whose results had no destination."""
        self._undelivered.inc()

    def recent_ingest(self, now: float | None = None) -> RecentIngest:
        """Instances received and refused in the last hour and the last day (to the minute), since
        :attr:`started_at`."""
        now = time.time() if now is None else now
        received_hour, refused_hour = self._recent.window(_HOUR_S, now)
        received_day, refused_day = self._recent.window(_DAY_S, now)
        return RecentIngest(self.started_at, received_hour, refused_hour, received_day, refused_day)

    def render(self) -> bytes:
        """The text exposition of every metric (the scrape-time gauges read now), each sample labelled with
        :attr:`worker` when it is set."""
        return generate_latest(self._exposed)
