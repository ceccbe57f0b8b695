"""Read-only views of jobs for the faces (web UI, JSON API, CLI): compact summaries, counts, model latency.

A job's ``detail`` holds everything a stage recorded (5 KB or more with measurements); a list shows only what a
reader scans: state, series, the models that ran, a one-line failure, whether the results reached a destination,
and the time spent in each stage, in the order a job meets them::

    completion (quiet period) -> assemble -> queue -> infer -> encode -> export

``completion`` is the series revision's quiet period (from its last instance to its completion), ``queue`` the
wait from the job becoming ``received`` to a worker claiming it (recorded at the claim,
:func:`gateway.jobs.lifecycle.claim`; in time it comes before assembly, the bar keeps the order operators read
it in); the others are the stage timings the runner and the export queue record.

Lists page in SQL, newest first, so a page costs the same with 10 or 10,000 jobs in the index.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from gateway.errors import NotFound
from gateway.jobs.states import JobState
from gateway.store.index import Instance, Job, Series, SeriesRevision, Study
from gateway.store.store import StoreIndex

__all__ = [
    "JobSummary",
    "ModelLatency",
    "SeriesSummary",
    "StageTimes",
    "StudySummary",
    "failure_line",
    "job_summaries",
    "job_summary",
    "model_latency",
    "models_run",
    "oldest_waiting",
    "stage_times",
    "states_count",
    "study_summaries",
    "undelivered_condition",
]

_Query = TypeVar("_Query", bound=Select[*tuple[Any, ...]])

#: The stages of the time bar, in order, and the key of ``detail["timings"]`` each one is read from.
STAGES: tuple[str, ...] = ("completion", "assemble", "queue", "infer", "encode", "export")
_TIMING_KEYS = {
    "assemble": "assemble_s",
    "queue": "queue_s",
    "infer": "infer_s",
    "encode": "encode_s",
    "export": "export_s",
}
_FAILURE_MAX = 300  # characters of a failure shown in a list


@dataclass(frozen=True)
class StageTimes:
    """Seconds a job spent in each stage (``None`` when not, or not yet, known)."""

    completion: float | None
    assemble: float | None
    queue: float | None
    infer: float | None
    encode: float | None
    export: float | None

    def as_dict(self) -> dict[str, float | None]:
        """The stages in bar order, name -> seconds."""
        return {stage: getattr(self, stage) for stage in STAGES}

    @property
    def total(self) -> float:
        """The known seconds added up (the bar's length)."""
        return sum(value for value in self.as_dict().values() if value is not None)


@dataclass(frozen=True)
class JobSummary:
    """What a list shows of a job (no patient data beyond the UIDs; none of the measurements)."""

    id: int
    state: str
    revision: int
    study_instance_uid: str
    series_instance_uid: str
    series_description: str | None
    modality: str | None
    models_run: tuple[str, ...]
    created_at: float
    updated_at: float
    finished_at: float | None
    undelivered: bool
    failure: str | None
    stages: StageTimes

    @property
    def problem(self) -> bool:
        """Whether the job needs a look: it failed, or its results reached no destination."""
        return self.state == JobState.FAILED or self.undelivered

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the API's compact job)."""
        return {
            "id": self.id,
            "state": self.state,
            "revision": self.revision,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "series_description": self.series_description,
            "modality": self.modality,
            "models_run": list(self.models_run),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "undelivered": self.undelivered,
            "failure": self.failure,
            "stages": self.stages.as_dict(),
        }


@dataclass(frozen=True)
class ModelLatency:
    """A model's recent record: runs (results and failures), failures, and its inference seconds' p50 and p95."""

    runs: int
    failures: int
    p50_s: float | None
    p95_s: float | None


# -- reading a job's detail ------------------------------------------------------------------------------------


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def stage_times(detail: Mapping[str, Any], revision: SeriesRevision | None) -> StageTimes:
    """A job's stage times from its detail and its series revision (the completion's quiet period)."""
    timings = detail.get("timings") or {}
    completion = None
    if revision is not None and revision.completed_at is not None:
        completion = max(0.0, revision.completed_at - revision.last_received_at)
    values = {stage: _seconds(timings.get(key)) for stage, key in _TIMING_KEYS.items()}
    return StageTimes(completion=completion, **values)


def models_run(detail: Mapping[str, Any]) -> tuple[str, ...]:
    """The models (``name@version``) the job's routing ran, each once, in routing order."""
    routing = (detail.get("inference") or {}).get("routing") or []
    return tuple(dict.fromkeys(str(d["model"]) for d in routing if d.get("run") and d.get("model")))


def failure_line(detail: Mapping[str, Any]) -> str | None:
    """The job's failure reason as one bounded line (``None`` if it has none)."""
    reason = (detail.get("failure") or {}).get("reason")
    if not reason:
        return None
    text = " ".join(str(reason).split())
    return text if len(text) <= _FAILURE_MAX else text[: _FAILURE_MAX - 1] + "…"


def _undelivered(detail: Mapping[str, Any]) -> bool:
    return bool((detail.get("export") or {}).get("undelivered"))


def _summary(job: Job, series: Series | None, revision: SeriesRevision | None) -> JobSummary:
    detail: Mapping[str, Any] = job.detail or {}
    return JobSummary(
        id=int(job.id),
        state=str(job.state),
        revision=int(revision.revision) if revision is not None else int(detail.get("revision") or 0),
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid,
        series_description=series.series_description if series is not None else None,
        modality=series.modality if series is not None else None,
        models_run=models_run(detail),
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        undelivered=_undelivered(detail),
        failure=failure_line(detail),
        stages=stage_times(detail, revision),
    )


# -- queries -----------------------------------------------------------------------------------------------------


def undelivered_condition() -> Any:
    """SQL condition: the job is ``exported`` with ``detail.export.undelivered`` true (SQLite and PostgreSQL)."""
    flag = Job.detail[("export", "undelivered")].as_boolean()
    return and_(Job.state == JobState.EXPORTED, flag.is_(True))


def _summary_query() -> Select[Job, Series, SeriesRevision]:
    return (
        select(Job, Series, SeriesRevision)
        .outerjoin(Series, Series.series_instance_uid == Job.series_instance_uid)
        .outerjoin(SeriesRevision, SeriesRevision.id == Job.revision_id)
    )


def _filtered(query: _Query, state: str | None, modality: str | None, problems: bool) -> _Query:
    if state is not None:
        query = query.where(Job.state == state)
    if modality is not None:
        query = query.where(
            Job.series_instance_uid.in_(select(Series.series_instance_uid).where(Series.modality == modality))
        )
    if problems:
        query = query.where(or_(Job.state == JobState.FAILED, undelivered_condition()))
    return query


def job_summaries(
    store: StoreIndex,
    *,
    state: str | None = None,
    modality: str | None = None,
    problems: bool = False,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[JobSummary], int]:
    """A page of job summaries, newest first, and how many jobs match in all.

    Parameters
    ----------
    store
        The index (an :class:`~gateway.store.store.InstanceStore` or the index alone).
    state
        Only jobs in this state.
    modality
        Only jobs of series of this Modality.
    problems
        Only jobs that need a look: ``failed``, or ``exported`` with results that reached no destination.
    limit, offset
        The page.
    """
    if limit < 0 or offset < 0:
        raise ValueError(f"limit ({limit}) and offset ({offset}) must not be negative")
    page = _filtered(_summary_query(), state, modality, problems).order_by(Job.id.desc()).limit(limit).offset(offset)
    count = _filtered(select(func.count(Job.id)), state, modality, problems)
    with store.sessions() as session:
        total = int(session.scalar(count) or 0)
        rows = session.execute(page).all() if limit else []
        return [_summary(job, series, revision) for job, series, revision in rows], total


def job_summary(store: StoreIndex, job_id: int) -> JobSummary:
    """One job's summary.

    Raises
    ------
    gateway.errors.NotFound
        If there is no job ``job_id``.
    """
    with store.sessions() as session:
        row = session.execute(_summary_query().where(Job.id == job_id)).first()
        if row is None:
            raise NotFound(f"no job {job_id}")
        return _summary(*row)


def states_count(store: StoreIndex) -> dict[str, int]:
    """How many jobs are in each state (every known state listed, 0 included; an unknown state found is added)."""
    with store.sessions() as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    counts = dict.fromkeys((s.value for s in JobState), 0)
    counts.update({str(state): int(n) for state, n in rows})
    return counts


def oldest_waiting(store: StoreIndex, *, now: float | None = None) -> JobSummary | None:
    """The job that has waited longest in ``received`` (its ``queue`` stage: the wait so far), or ``None``."""
    now = time.time() if now is None else now
    with store.sessions() as session:
        row = session.execute(_summary_query().where(Job.state == JobState.RECEIVED).order_by(Job.id).limit(1)).first()
        if row is None:
            return None
        summary = _summary(*row)
    since = _waiting_since(row[0])
    return replace(summary, stages=replace(summary.stages, queue=max(0.0, now - since)))


def _waiting_since(job: Job) -> float:
    """When the job last became ``received`` (made, handed back, re-run)."""
    queued = _seconds((job.detail or {}).get("queued_at"))
    return queued if queued is not None else job.created_at


def model_latency(store: StoreIndex, *, last: int = 500) -> dict[str, ModelLatency]:
    """Per model (``name@version``): runs, failures, and p50/p95 of its inference seconds over recent jobs.

    Reads the inference record of the newest ``last`` jobs that ran inference (their ``detail.inference``), so the
    cost is bounded whatever the index holds.
    """
    inference = Job.detail["inference"]
    ran = Job.state.not_in((JobState.RECEIVED, JobState.ASSEMBLING, JobState.ASSEMBLED, JobState.INFERRING))
    query = select(inference).where(ran).order_by(Job.id.desc()).limit(last)
    with store.sessions() as session:
        records = [r for r in session.scalars(query) if isinstance(r, dict)]
    return _latencies(records)


def _latencies(records: Iterable[Mapping[str, Any]]) -> dict[str, ModelLatency]:
    seconds: dict[str, list[float]] = {}
    runs: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for record in records:
        for result in record.get("results") or []:
            model = str(result.get("model"))
            runs[model] += 1
            value = _seconds((result.get("timings") or {}).get("infer_s"))
            seconds.setdefault(model, []).extend([] if value is None else [value])
        for failure in record.get("failures") or []:
            model = str(failure.get("model"))
            runs[model] += 1
            failures[model] += 1
    return {model: _latency(seconds.get(model, []), runs[model], failures[model]) for model in sorted(runs)}


def _latency(values: list[float], runs: int, failed: int) -> ModelLatency:
    if not values:
        return ModelLatency(runs, failed, None, None)
    if len(values) == 1:
        return ModelLatency(runs, failed, values[0], values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return ModelLatency(runs, failed, round(cuts[49], 3), round(cuts[94], 3))


# -- studies ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSummary:
    """A series as received: its instances, revisions, and its newest job (what reprocessing would follow)."""

    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instances: int
    revisions: int
    revision_state: str | None  # the newest revision's: open, held or complete
    last_job_id: int | None
    last_job_state: str | None


@dataclass(frozen=True)
class StudySummary:
    """A study as received (no patient data: its UID, date and series)."""

    study_instance_uid: str
    study_date: str | None
    received_at: float
    series: tuple[SeriesSummary, ...]


def study_summaries(store: StoreIndex, *, limit: int = 20, offset: int = 0) -> tuple[list[StudySummary], int]:
    """A page of studies, the newest received first, with their series; and how many studies there are."""
    with store.sessions() as session:
        total = int(session.scalar(select(func.count(Study.study_instance_uid))) or 0)
        studies = session.scalars(
            select(Study).order_by(Study.created_at.desc(), Study.study_instance_uid).limit(limit).offset(offset)
        ).all()
        uids = [s.study_instance_uid for s in studies]
        series = session.scalars(
            select(Series).where(Series.study_instance_uid.in_(uids)).order_by(Series.series_number, Series.created_at)
        ).all()
        by_series = _series_facts(session, [s.series_instance_uid for s in series])
    grouped: dict[str, list[SeriesSummary]] = {uid: [] for uid in uids}
    for row in series:
        grouped[row.study_instance_uid].append(_series_summary(row, by_series))
    return [
        StudySummary(s.study_instance_uid, s.study_date, s.created_at, tuple(grouped[s.study_instance_uid]))
        for s in studies
    ], total


def _series_facts(session: Session, uids: list[str]) -> dict[str, dict[str, Any]]:
    """Per series: instance count, revision count and newest state, newest job id and state (four queries)."""
    facts: dict[str, dict[str, Any]] = {uid: {} for uid in uids}
    counts = select(Instance.series_instance_uid, func.count()).where(Instance.series_instance_uid.in_(uids))
    for uid, n in session.execute(counts.group_by(Instance.series_instance_uid)):
        facts[uid]["instances"] = int(n)
    newest = (
        select(SeriesRevision.series_instance_uid, func.max(SeriesRevision.revision), func.count())
        .where(SeriesRevision.series_instance_uid.in_(uids))
        .group_by(SeriesRevision.series_instance_uid)
    )
    latest_revisions = {uid: (int(top), int(n)) for uid, top, n in session.execute(newest)}
    states = session.execute(
        select(SeriesRevision.series_instance_uid, SeriesRevision.revision, SeriesRevision.state).where(
            SeriesRevision.series_instance_uid.in_(uids)
        )
    )
    for uid, number, state in states:
        top, n = latest_revisions[uid]
        if number == top:
            facts[uid].update(revisions=n, revision_state=state)
    last_jobs = select(func.max(Job.id)).where(Job.series_instance_uid.in_(uids)).group_by(Job.series_instance_uid)
    for job_id, uid, state in session.execute(
        select(Job.id, Job.series_instance_uid, Job.state).where(Job.id.in_(last_jobs))
    ):
        facts[uid].update(last_job_id=int(job_id), last_job_state=str(state))
    return facts


def _series_summary(series: Series, facts: dict[str, dict[str, Any]]) -> SeriesSummary:
    known = facts.get(series.series_instance_uid, {})
    return SeriesSummary(
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        series_number=series.series_number,
        series_description=series.series_description,
        instances=known.get("instances", 0),
        revisions=known.get("revisions", 0),
        revision_state=known.get("revision_state"),
        last_job_id=known.get("last_job_id"),
        last_job_state=known.get("last_job_state"),
    )
