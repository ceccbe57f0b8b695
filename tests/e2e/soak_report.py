"""What a soak plans and records, and the report on it: the figures of issue 10 and the invariants.

:mod:`soak_scenario` runs a :class:`Plan` and fills a :class:`SoakReport`; ``bench/soak.py`` prints its
:meth:`~SoakReport.table`, ``tests/e2e/test_soak.py`` asserts that :meth:`~SoakReport.violations` is empty.

The invariants: every series sent has exactly one job, finished ``exported``; no job failed (all inputs are valid
and the PACS comes back, so any failure counts; one whose reason is a stop or a crash is a restart-only failure);
every delivery delivered; Orthanc holds exactly the jobs' outputs, each output series with the instances its job
recorded (a second copy under other UIDs would be a stray); a SIGTERM stops the gateway cleanly and hands the
running jobs back; the gateway never exits by itself.
"""

from __future__ import annotations

import json
import pickle
import re
import signal
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.jobs.states import FINISHED, LEASED, JobState

FINISHED_STATES = frozenset(str(s) for s in FINISHED)
LEASED_STATES = frozenset(str(s) for s in LEASED)
#: Words of a failure reason that name a stop or a crash, not the series or the model.
RESTART_WORDS = re.compile(r"interrupted|stopped|lease|handed back|process|killed|shut ?down", re.IGNORECASE)
#: Exit statuses of a clean stop: uvicorn re-raises the SIGTERM it handled once its shutdown is complete.
CLEAN_EXITS = (0, -signal.SIGTERM)

# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Event:
    """A fault at ``at_s`` seconds after the start: ``kill9``, ``sigterm`` or ``outage`` (of ``duration_s``).

    ``when`` (job states) makes it wait, at most ``Plan.when_timeout_s``, until a job is in one of them.
    """

    kind: str
    at_s: float
    when: tuple[str, ...] = ()
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("kill9", "sigterm", "outage"):
            raise ValueError(f"kind must be kill9, sigterm or outage, got {self.kind!r}")
        unknown = set(self.when) - {str(s) for s in JobState}
        if unknown:
            raise ValueError(f"when names unknown job states: {sorted(unknown)}")


@dataclass(frozen=True)
class Plan:
    """What the soak does: how long it sends, what, and which faults (see the module docstring)."""

    send_for_s: float
    series_interval_s: float
    events: tuple[Event, ...]
    slices: int = 16
    size: int = 64
    seed: int = 0
    kill_between_sends: bool = False
    warmup_jobs: int = 3  # finished jobs in a process life before its RSS and descriptors count as warm
    sample_s: float = 2.0
    when_timeout_s: float = 60.0
    restart_delay_s: float = 1.0
    settle_timeout_s: float = 300.0
    quiet_period_s: float = 2.0
    workers: int = 2
    shutdown_grace_s: float = 10.0
    slope_span_s: float = 60.0  # a life's RSS slope counts in the summary when its warm samples span this long


# ---------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Revision:
    """A row of ``series_revisions``."""

    id: int
    series_instance_uid: str
    revision: int
    state: str
    instance_count: int


@dataclass(frozen=True)
class JobRow:
    """A row of ``jobs``."""

    id: int
    revision_id: int
    series_instance_uid: str
    state: str
    attempts: int
    detail: dict[str, Any]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """``detail.outputs``: what the job encoded (kind, SOPInstanceUID, SeriesInstanceUID, file)."""
        return list(self.detail.get("outputs", []))

    @property
    def failure(self) -> str:
        """``detail.failure`` as ``stage: reason`` (empty if none)."""
        failure = self.detail.get("failure") or {}
        return f"{failure.get('stage', '?')}: {failure.get('reason', '?')}" if failure else ""


@dataclass(frozen=True)
class DeliveryRow:
    """A row of ``deliveries``."""

    job_id: int
    sop_instance_uid: str
    state: str
    attempts: int
    history: list[dict[str, Any]]


@dataclass(frozen=True)
class IndexSnapshot:
    """What the gateway's index holds at one moment."""

    revisions: list[Revision]
    jobs: list[JobRow]
    deliveries: list[DeliveryRow]

    def settled(self, series_uids: set[str]) -> bool:
        """Every revision complete, every job finished, every delivery final, and a job for each series."""
        if any(r.state != "complete" for r in self.revisions):
            return False
        if any(j.state not in FINISHED_STATES for j in self.jobs):
            return False
        if any(d.state in ("pending", "sending") for d in self.deliveries):
            return False
        return series_uids <= {j.series_instance_uid for j in self.jobs}


@dataclass(frozen=True)
class PacsInstance:
    """An instance Orthanc holds: its SOP Instance UID, its series' UID and modality."""

    sop_instance_uid: str
    series_instance_uid: str
    modality: str


# ---------------------------------------------------------------------------------------------------- records


@dataclass
class SentSeries:
    """A series the sender made, and how its sending went."""

    number: int
    series_instance_uid: str
    instances: int
    runs: int = 0  # `gateway send` runs
    failed_runs: int = 0
    acked_in_failed_runs: int = 0  # instances acknowledged in runs that did not send them all
    sent: bool = False


@dataclass(frozen=True)
class Sample:
    """One reading of the gateway process: seconds since the soak began, RSS in MB, open descriptors, and jobs
    finished since this process life began."""

    t: float
    rss_mb: float
    fds: int
    finished: int


@dataclass
class Life:
    """One run of the gateway process, from its start to what ended it."""

    number: int
    pid: int
    started_s: float
    finished_before: int
    ended_by: str = "running"
    ended_s: float | None = None
    samples: list[Sample] = field(default_factory=list)

    def warm(self, warmup_jobs: int) -> list[Sample]:
        """The samples taken once this life had finished ``warmup_jobs`` jobs."""
        return [s for s in self.samples if s.finished >= warmup_jobs]


@dataclass(frozen=True)
class Fired:
    """An event as it happened: when, the job (id, state) it found when it waited for one, and what followed."""

    kind: str
    at_s: float
    job: tuple[int, str] | None
    outcome: str
    held: dict[int, str]  # jobs in a leased or encoded state at that moment: id -> state
    exit_code: int | None = None
    stop_s: float | None = None
    job_after: dict[str, Any] | None = None  # the aimed-at job once the process exited (state, hand-backs)
    left: dict[int, str] = field(default_factory=dict)  # jobs still in a leased state once the process exited


def slope_per_min(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; ``None`` for fewer than 3 points or no span."""
    if len(points) < 3:
        return None
    ts = [p[0] for p in points]
    if max(ts) - min(ts) <= 0:
        return None
    mean_t, mean_v = statistics.fmean(ts), statistics.fmean(p[1] for p in points)
    var = sum((t - mean_t) ** 2 for t in ts)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60.0


# ---------------------------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class LifeFigures:
    """A process life's resource figures after warm-up."""

    life: Life
    warm_samples: int
    warm_span_s: float
    rss_first_mb: float | None
    rss_last_mb: float | None
    rss_peak_mb: float | None
    rss_slope: float | None  # MB/min
    fds_min: int | None
    fds_max: int | None
    fds_slope: float | None  # per minute
    jobs: int


@dataclass
class SoakReport:
    """What the soak did and what the gateway and the PACS hold at the end."""

    plan: Plan
    duration_s: float
    settled: bool
    series: list[SentSeries]
    lives: list[Life]
    fired: list[Fired]
    outage_s: list[float]
    unexpected_exits: list[str]
    sender_errors: list[str]
    index: IndexSnapshot
    pacs: list[PacsInstance]
    final_exit: int | None

    # -- derived -------------------------------------------------------------------------------------------------

    def sent(self) -> list[SentSeries]:
        """The series sent whole."""
        return [s for s in self.series if s.sent]

    def jobs_of(self, series_uid: str) -> list[JobRow]:
        """The jobs of a series, oldest revision first."""
        revision = {r.id: r.revision for r in self.index.revisions}
        jobs = [j for j in self.index.jobs if j.series_instance_uid == series_uid]
        return sorted(jobs, key=lambda j: revision.get(j.revision_id, 0))

    def lost(self) -> list[str]:
        """Series sent whole whose latest revision has no finished job."""
        lost = []
        for s in self.sent():
            jobs = self.jobs_of(s.series_instance_uid)
            if not jobs or jobs[-1].state not in FINISHED_STATES:
                lost.append(s.series_instance_uid)
        return lost

    def failed(self) -> list[JobRow]:
        """Jobs that ended ``failed``."""
        return [j for j in self.index.jobs if j.state == JobState.FAILED]

    def restart_failures(self) -> list[JobRow]:
        """Failed jobs whose reason is a stop or a crash, not their series or the model."""
        return [j for j in self.failed() if RESTART_WORDS.search(j.failure)]

    def resent(self) -> list[SentSeries]:
        """Series whose sending was interrupted (a failed run) and repeated."""
        return [s for s in self.sent() if s.failed_runs]

    def split(self) -> list[SentSeries]:
        """Series that made more than one revision (so more than one job)."""
        return [s for s in self.sent() if len(self.jobs_of(s.series_instance_uid)) > 1]

    def expected_outputs(self) -> dict[str, set[str]]:
        """Output SeriesInstanceUID -> its SOP Instance UIDs, over every job's ``detail.outputs``."""
        expected: dict[str, set[str]] = {}
        for job in self.index.jobs:
            for output in job.outputs:
                expected.setdefault(output["SeriesInstanceUID"], set()).add(output["SOPInstanceUID"])
        return expected

    def pacs_problems(self) -> dict[str, list[str]]:
        """What Orthanc holds beside the jobs' outputs: ``stray`` (not any job's output: a second copy under
        other UIDs), ``missing`` (an exported job's output it lacks), ``doubled`` (a SOP Instance UID held twice),
        and ``other series`` (an output series whose instances differ from the job's)."""
        expected = self.expected_outputs()
        wanted = {uid for uids in expected.values() for uid in uids}
        exported = {o["SOPInstanceUID"] for j in self.index.jobs if j.state == JobState.EXPORTED for o in j.outputs}
        held = Counter(i.sop_instance_uid for i in self.pacs)
        by_series: dict[str, set[str]] = {}
        for instance in self.pacs:
            by_series.setdefault(instance.series_instance_uid, set()).add(instance.sop_instance_uid)
        return {
            "stray": sorted(uid for uid in held if uid not in wanted),
            "missing": sorted(exported - set(held)),
            "doubled": sorted(uid for uid, n in held.items() if n > 1),
            "other series": sorted(s for s, uids in by_series.items() if s in expected and uids != expected[s]),
        }

    def extra_result_sets(self) -> int:
        """Result sets in Orthanc beyond one per source series: each job of a series beyond its first whose
        outputs Orthanc holds (a series split into two jobs gets two SEGs, two reports, ...)."""
        held = {i.sop_instance_uid for i in self.pacs}
        extra = 0
        for series in self.sent():
            shown = [
                j
                for j in self.jobs_of(series.series_instance_uid)
                if any(o["SOPInstanceUID"] in held for o in j.outputs)
            ]
            extra += max(0, len(shown) - 1)
        return extra

    def life_figures(self) -> list[LifeFigures]:
        """Per process life: RSS and descriptors after its first ``warmup_jobs`` jobs."""
        figures = []
        for life in self.lives:
            warm = life.warm(self.plan.warmup_jobs)
            rss = [(s.t, s.rss_mb) for s in warm]
            fds = [(s.t, float(s.fds)) for s in warm]
            figures.append(
                LifeFigures(
                    life=life,
                    warm_samples=len(warm),
                    warm_span_s=(warm[-1].t - warm[0].t) if warm else 0.0,
                    rss_first_mb=warm[0].rss_mb if warm else None,
                    rss_last_mb=warm[-1].rss_mb if warm else None,
                    rss_peak_mb=max(s.rss_mb for s in life.samples) if life.samples else None,
                    rss_slope=slope_per_min(rss),
                    fds_min=min(s.fds for s in warm) if warm else None,
                    fds_max=max(s.fds for s in warm) if warm else None,
                    fds_slope=slope_per_min(fds),
                    jobs=life.samples[-1].finished if life.samples else 0,
                )
            )
        return figures

    # -- the invariants ------------------------------------------------------------------------------------------

    def violations(self) -> list[str]:
        """Every broken invariant, one line each (empty: the soak passed)."""
        found: list[str] = []
        if not self.settled:
            found.append("the gateway did not finish every job and delivery before the settle timeout")
        found += [f"the gateway exited by itself: {e}" for e in self.unexpected_exits]
        found += [f"sender: {e}" for e in self.sender_errors]
        found += [f"series {s.number} was never sent whole" for s in self.series if not s.sent]
        found += [f"series {uid} has no finished job (lost)" for uid in self.lost()]
        found += self._revision_violations()
        found += [f"job {j.id} failed: {j.failure}" for j in self.failed()]
        found += [
            f"job {d.job_id}: delivery of {d.sop_instance_uid} is {d.state}"
            for d in self.index.deliveries
            if d.state != "delivered"
        ]
        found += [f"PACS: {what}: {uids[:5]}" for what, uids in self.pacs_problems().items() if uids]
        found += self._stop_violations()
        return found

    def _revision_violations(self) -> list[str]:
        found = []
        jobs_per_revision = Counter(j.revision_id for j in self.index.jobs)
        found += [f"revision {r} has {n} jobs" for r, n in jobs_per_revision.items() if n > 1]
        for s in self.sent():
            jobs = self.jobs_of(s.series_instance_uid)
            if jobs and jobs[-1].state != JobState.EXPORTED:
                found.append(f"series {s.number}: its job {jobs[-1].id} is {jobs[-1].state}, not exported")
            if len(jobs) > 1:
                found.append(self._split_line(s, jobs))
        return found

    def _split_line(self, series: SentSeries, jobs: Sequence[JobRow]) -> str:
        counts = {r.id: r.instance_count for r in self.index.revisions}
        upto, parts = 0, []
        for job in jobs:  # a job's volume is its series up to its revision
            upto += counts.get(job.revision_id, 0)
            parts.append(f"job {job.id} on {upto}")
        why = (
            f"its sending was cut {series.failed_runs} time(s) and repeated"
            if series.failed_runs
            else "it was sent in one run"
        )
        return f"series {series.number} made {len(jobs)} jobs ({', '.join(parts)} instances): {why}"

    def _stop_violations(self) -> list[str]:
        found = []
        for event in self.fired:
            if event.kind != "sigterm":
                continue
            if event.exit_code not in CLEAN_EXITS:
                found.append(f"SIGTERM at {event.at_s:.0f} s: exit status {event.exit_code}")
            after = event.job_after
            if after is not None and after["state"] == JobState.FAILED:
                found.append(f"SIGTERM at {event.at_s:.0f} s: job {after['id']} failed at the stop")
            if event.left:
                found.append(f"SIGTERM at {event.at_s:.0f} s: jobs left in a leased state: {event.left}")
        if self.final_exit is not None and self.final_exit not in CLEAN_EXITS:
            found.append(f"the final SIGTERM: exit status {self.final_exit}")
        return found

    # -- the table -----------------------------------------------------------------------------------------------

    def table(self) -> list[str]:
        """The figures as a Markdown table, then one row per process life."""
        lines = ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in self._figures())]
        lines += [
            "",
            "| life | ended by | s | jobs | warm | RSS first/last/peak MB | RSS MB/min | fds min/max | fds/min |",
            "|---:|---|---:|---:|---:|---|---:|---|---:|",
        ]
        for f in self.life_figures():
            life = f.life
            span = (life.ended_s if life.ended_s is not None else self.duration_s) - life.started_s
            lines.append(
                f"| {life.number} | {life.ended_by} | {span:.0f} | {f.jobs} | {f.warm_samples} | "
                f"{_mb(f.rss_first_mb)} / {_mb(f.rss_last_mb)} / {_mb(f.rss_peak_mb)} | {_num(f.rss_slope)} | "
                f"{_opt(f.fds_min)} / {_opt(f.fds_max)} | {_num(f.fds_slope)} |"
            )
        return lines

    def _figures(self) -> list[tuple[str, str]]:
        states = Counter(j.state for j in self.index.jobs)
        kills = [f for f in self.fired if f.kind == "kill9"]
        terms = [f for f in self.fired if f.kind == "sigterm"]
        problems = self.pacs_problems()
        retried = sum(1 for d in self.index.deliveries if any(h.get("outcome") == "retry" for h in d.history))
        plan = self.plan
        return [
            ("run", f"{self.duration_s / 60:.1f} min, of which {plan.send_for_s / 60:.1f} min sending"),
            (
                "series sent",
                f"{len(self.sent())} ({plan.slices} slices of {plan.size}x{plan.size} each, one every "
                f"{plan.series_interval_s:g} s; {sum(s.runs for s in self.series)} `gateway send` runs, "
                f"{len(self.resent())} series sent again after a cut run)",
            ),
            ("jobs", f"{len(self.index.jobs)}: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))),
            ("series with more than one job", str(len(self.split()))),
            ("kills (-9)", f"{len(kills)} ({_held_summary(kills)})"),
            ("SIGTERMs", f"{len(terms)} ({'; '.join(_term_summary(t) for t in terms) or 'none'})"),
            ("PACS outages", f"{len(self.outage_s)} ({_seconds(self.outage_s)}; {retried} deliveries retried)"),
            ("unexpected exits", str(len(self.unexpected_exits))),
            ("lost jobs", str(len(self.lost()))),
            (
                "duplicates in the PACS",
                f"{len(problems['stray']) + len(problems['doubled'])} copies of an output (under other UIDs or "
                f"twice); {self.extra_result_sets()} second result sets of a series (from a second job); "
                f"{len(self.pacs)} instances held, {len(problems['missing'])} missing",
            ),
            ("jobs failed for a restart-only reason", str(len(self.restart_failures()))),
            ("jobs failed (any reason)", str(len(self.failed()))),
            ("RSS slope after warm-up", self._slope_summary()),
            ("RSS peak", f"{max((f.rss_peak_mb or 0.0) for f in self.life_figures()):.0f} MB"),
            ("open fds after warm-up", _fd_summary(self.life_figures())),
        ]

    def _slope_summary(self) -> str:
        long = [f for f in self.life_figures() if f.rss_slope is not None and f.warm_span_s >= self.plan.slope_span_s]
        if not long:
            return f"no life ran {self.plan.slope_span_s:.0f} s after warm-up"
        slopes = [f.rss_slope for f in long if f.rss_slope is not None]
        longest = max(long, key=lambda f: f.warm_span_s)
        warm = longest.life.warm(self.plan.warmup_jobs)
        first = statistics.median(s.rss_mb for s in warm if s.t <= warm[0].t + 60)
        last = statistics.median(s.rss_mb for s in warm if s.t >= warm[-1].t - 60)
        lives = "life" if len(long) == 1 else "lives"
        return (
            f"max {max(slopes):+.1f} MB/min, median {statistics.median(slopes):+.1f} MB/min over the {len(long)} "
            f"{lives} warm for {self.plan.slope_span_s:.0f} s or more; the longest (life {longest.life.number}, "
            f"{longest.warm_span_s:.0f} s warm): {_num(longest.rss_slope)} MB/min, median RSS {first:.0f} MB in its "
            f"first warm minute and {last:.0f} MB in its last"
        )


def _held_summary(kills: Sequence[Fired]) -> str:
    states = Counter(s for k in kills for s in k.held.values())
    return "jobs held at the kills: " + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none")


def _term_summary(term: Fired) -> str:
    job = f"job {term.job[0]} {term.job[1]}" if term.job else "no job running"
    after = f" -> {term.job_after['state']}" if term.job_after else ""
    took = f", exit {term.exit_code} after {term.stop_s:.1f} s" if term.stop_s is not None else ""
    return f"{job}{after}{took}"


def _fd_summary(figures: Sequence[LifeFigures]) -> str:
    lows = [f.fds_min for f in figures if f.fds_min is not None]
    highs = [f.fds_max for f in figures if f.fds_max is not None]
    slopes = [f.fds_slope for f in figures if f.fds_slope is not None]
    if not lows:
        return "no life long enough"
    return f"{min(lows)}-{max(highs)}; slope max {max(slopes):+.1f}/min" if slopes else f"{min(lows)}-{max(highs)}"


def _seconds(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.0f} s" for v in values) or "none"


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f}"


def _opt(value: int | None) -> str:
    return "—" if value is None else str(value)


def report_json(report: SoakReport) -> dict[str, Any]:
    """The report's raw figures, for a JSON file beside the logs."""
    return {
        "duration_s": report.duration_s,
        "settled": report.settled,
        "violations": report.violations(),
        "series": [vars(s) for s in report.series],
        "lives": [
            {**{k: v for k, v in vars(life).items() if k != "samples"}, "samples": [vars(s) for s in life.samples]}
            for life in report.lives
        ],
        "fired": [vars(f) for f in report.fired],
        "outage_s": report.outage_s,
        "jobs": [
            {
                "id": j.id,
                "series": j.series_instance_uid,
                "state": j.state,
                "attempts": j.attempts,
                "handed_back": j.detail.get("handed_back", []),
                "failure": j.failure,
            }
            for j in report.index.jobs
        ],
        "pacs_problems": report.pacs_problems(),
    }


def write_report(report: SoakReport, out: Path) -> None:
    """The JSON figures (``soak.json``) into ``out``, and the report itself (``soak.pickle``, to print its table
    again with :func:`read_report`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report_json(report), indent=1, default=str))
    (out / "soak.pickle").write_bytes(pickle.dumps(report))


def read_report(out: Path) -> SoakReport:
    """The report :func:`write_report` left in ``out`` (a file this script wrote: pickle is trusted here)."""
    report = pickle.loads((out / "soak.pickle").read_bytes())
    assert isinstance(report, SoakReport)
    return report
