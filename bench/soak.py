"""Soak (issue 10): a real ``gateway serve`` receives synthetic series for minutes while it is killed, stopped and
its PACS goes down; then every series must have exactly one finished job and the PACS one copy of each output.

The scenario is :mod:`soak_scenario` (``tests/e2e/soak_scenario.py``, shared with ``tests/e2e/test_soak.py``, the
short version in ``make test``). Here the faults fall at random moments drawn from ``--seed``:

- ``kill -9`` of the gateway every ``--kill-interval-s`` on average (uniformly between half and one and a half
  times it), whatever it is doing, receiving included; it is started again at once on the same data folder;
- one SIGTERM while a job is ``inferring`` (the index is polled for one), then a start;
- one outage of Orthanc (``--outage-s``), started again on the same ports and storage.

All of them fall before the last ``--calm-minutes``, during which the gateway runs on without faults: that one
long process life is where a growth of memory or descriptors would show.

A sender runs ``gateway send`` for a new series every ``--series-interval-s``; a run cut short is repeated whole.
The gateway's RSS and open descriptors are sampled every few seconds; their slope is taken per process life over
the samples after its first ``--warmup-jobs`` finished jobs. The table goes to stdout and, unless ``--no-write``,
into ``docs/benchmarks.md``; the logs, data folder and ``soak.json`` stay in ``--out``. Exit 1 if an invariant
broke (each is printed).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from ingest import machine, write_section  # noqa: E402  (bench/ is not a package)
from soak_report import Event, Plan, SoakReport, write_report  # noqa: E402
from soak_scenario import Soak  # noqa: E402

from peers import orthanc_binary  # noqa: E402  (tests/ helpers shared with benches)

DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## Soak (issue 10)"
INFERRING = ("inferring",)


def random_plan(args: argparse.Namespace) -> Plan:
    """The plan of a run: kills at random moments, the SIGTERM and the outage placed at random in the middle."""
    rng = random.Random(args.seed)
    send_for_s = args.minutes * 60
    faults_s = send_for_s - args.calm_minutes * 60
    events = [
        Event("sigterm", rng.uniform(0.4, 0.6) * faults_s, when=INFERRING),
        Event("outage", rng.uniform(0.2, 0.35) * faults_s, duration_s=args.outage_s),
    ]
    at = args.kill_interval_s * rng.uniform(0.5, 1.5)
    while at < faults_s:
        events.append(Event("kill9", at))
        at += args.kill_interval_s * rng.uniform(0.5, 1.5)
    return Plan(
        send_for_s=send_for_s,
        series_interval_s=args.series_interval_s,
        events=tuple(events),
        slices=args.slices,
        size=args.size,
        seed=args.seed,
        warmup_jobs=args.warmup_jobs,
        settle_timeout_s=args.settle_timeout_s,
    )


def section(report: SoakReport, args: argparse.Namespace) -> str:
    """The Markdown section for ``docs/benchmarks.md``."""
    plan = report.plan
    violations = report.violations()
    lines = [
        HEADING,
        "",
        f"`python bench/soak.py --minutes {args.minutes:g} --calm-minutes {args.calm_minutes:g} "
        f"--series-interval-s {args.series_interval_s:g} --kill-interval-s {args.kill_interval_s:g} "
        f"--seed {args.seed}`: a real `gateway serve` (2 job workers, "
        f"`ct-tissue` enabled, quiet period {plan.quiet_period_s:g} s, export backoff 1-5 s) with Orthanc as the "
        f"PACS (every result returned by C-STORE) receives a synthetic CT series every {plan.series_interval_s:g} s "
        "by `gateway send`; it is killed with `kill -9` at random moments, gets one SIGTERM while a job is "
        f"`inferring`, and Orthanc is stopped for {args.outage_s:g} s; the last {args.calm_minutes:g} min run without "
        "faults. Then the gateway finishes what it holds and "
        "the index and Orthanc are compared. RSS and open descriptors are those of the `gateway serve` process, "
        f"sampled every {plan.sample_s:g} s; slopes are least squares per process life after its first "
        f"{plan.warmup_jobs} finished jobs.",
        "",
        *report.table(),
        "",
        "Invariants: " + ("all held." if not violations else f"{len(violations)} broken:"),
        *(f"- {v}" for v in violations),
        "",
        "Machine (CPU only, no GPU; the CPUs are shared with other work running at the same time):",
        "",
        *machine([f"- Orthanc: {orthanc_binary()}"]),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=8.0, help="how long series are sent (default 8)")
    parser.add_argument("--series-interval-s", type=float, default=5.0, help="a new series every (default 5 s)")
    parser.add_argument("--kill-interval-s", type=float, default=60.0, help="mean time between kills (default 60 s)")
    parser.add_argument("--calm-minutes", type=float, default=3.0, help="last minutes without faults (default 3)")
    parser.add_argument("--outage-s", type=float, default=25.0, help="how long Orthanc is down (default 25 s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the series and of the fault times (default 1)")
    parser.add_argument("--slices", type=int, default=16, help="slices per series (default 16)")
    parser.add_argument("--size", type=int, default=64, help="rows and columns (default 64)")
    parser.add_argument("--warmup-jobs", type=int, default=3, help="jobs before a life counts as warm (default 3)")
    parser.add_argument("--settle-timeout-s", type=float, default=600.0, help="time to finish at the end")
    parser.add_argument("--out", type=Path, default=None, help="work folder kept (default: a new temporary one)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if min(args.minutes, args.series_interval_s, args.kill_interval_s, args.outage_s) <= 0:
        parser.error("--minutes, --outage-s and the intervals must be positive")
    if not 0 <= args.calm_minutes < args.minutes:
        parser.error("--calm-minutes must be at least 0 and less than --minutes")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if orthanc_binary() is None:
        print("Orthanc is not installed (make test installs it)", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    plan = random_plan(args)
    print(f"soak in {out}: {len(plan.events)} events over {plan.send_for_s:.0f} s", flush=True)
    report = Soak(out, plan, log=lambda message: print(message, flush=True)).run()
    write_report(report, out)
    text = section(report, args)
    print(text)
    if not args.no_write:
        write_section(DOC, text, HEADING)
    return 1 if report.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
