"""Memory under concurrent series (issue 10): the gateway's RSS while several CT series arrive at once, with and
without a memory budget.

For each budget (``--budgets``, GiB; default 64, which admits every worker, and 2) a fresh ``gateway serve``
process (four job workers, ``jobs.memory_budget_bytes`` = the budget, quiet period 1 s, no export destination, only
``ct-tissue``, registered and enabled with ``gateway models register`` and ``gateway models enable`` before it
starts) receives ``--series`` synthetic CT series (default 5 of 140 slices of 512x512, written beforehand, one seed
each), sent all at once by as many ``gateway send`` processes. From before the send until 10 s after the last job
finished, every 0.1 s, the benchmark reads the gateway process's RSS (``VmRSS`` of ``/proc/PID/status``) and the
job states in its index (``index.sqlite3``, read-only): the jobs in ``assembling`` .. ``encoding`` are the ones the
budget admitted.

Reported: the RSS before the send (model not loaded yet: it loads on first use), the peak RSS (sampled, and the
kernel's high-water mark ``VmHWM``), the RSS 10 s after the last job finished (is the memory handed back?), the
most jobs assembling .. encoding at once, and the wall time from the send to the last job finished. The runner
estimates a job's share as its voxels x 28 bytes (``gateway.jobs.runner.estimate_job_bytes``): about 0.96 GiB for
a 140-slice 512x512 series, so a 2 GiB budget admits two at a time.

Run ``python bench/memory.py`` (``make bench``); ``--no-write`` leaves ``docs/benchmarks.md`` alone, ``--out DIR``
keeps the samples (CSV) and the gateways' logs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))

from ingest import BenchError, machine, write_section  # noqa: E402  (bench/ is not a package)

from gateway.jobs.runner import BYTES_PER_VOXEL  # noqa: E402
from gateway.jobs.states import FINISHED, LEASED  # noqa: E402
from gateway.synth.ct import write_synthetic_ct  # noqa: E402

from peers import GATEWAY_SCRIPT, GatewayServer, PeerError, log_tail  # noqa: E402  (tests/ helpers shared with benches)

DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## Memory under concurrent series (issue 10)"
MODEL_DIR = REPO / "models" / "ct-tissue"
GIB = 1 << 30
WORKERS = 4
QUIET_PERIOD_S = 5.0  # long enough that a series still arriving under load is not completed early
SAMPLE_S = 0.1
BEFORE_S = 2.0  # sampled before the send: the idle gateway
AFTER_S = 10.0  # ... and after the last job finished
SEND_ASSOCIATIONS = 2  # per `gateway send` process
TIMEOUT_S = 1800.0
_LEASED = tuple(sorted(LEASED))
_FINISHED = tuple(sorted(FINISHED))


# ---------------------------------------------------------------------------------------------------- the gateway


class BudgetGateway(GatewayServer):
    """``gateway serve`` with four workers, the memory budget ``budget`` (bytes), a 1 s quiet period, no export
    destination and no shipped models (``ct-tissue`` is registered by :meth:`register`)."""

    def __init__(self, tmpdir: Path, budget: int) -> None:
        sections: dict[str, Any] = {
            "models": {"register_shipped": False},
            "ingest": {"quiet_period_s": QUIET_PERIOD_S, "completion_poll_s": 0.2},
            "jobs": {"workers": WORKERS, "memory_budget_bytes": budget, "poll_s": 0.2},
            "log_level": "INFO",
        }
        super().__init__(tmpdir, tmpdir / "data", sections)

    @property
    def address(self) -> str:
        """``AET@HOST:PORT`` of the DICOM listener."""
        return f"GATEWAY@127.0.0.1:{self.dicom_port}"

    @property
    def pid(self) -> int:
        """The server's process id (it runs)."""
        if self.process is None:
            raise BenchError("the gateway is not running")
        return self.process.pid

    def register(self, model: Path) -> str:
        """``gateway models register MODEL`` and ``gateway models enable NAME`` before the server starts."""
        registered = self.cli("models", "register", str(model))  # "NAME@VERSION: active, ..."
        name = registered.partition("@")[0]
        return f"{registered}; {self.cli('models', 'enable', name)}"

    def cli(self, *args: str) -> str:
        """Run ``gateway ARGS --config CFG`` (another process); its output."""
        cmd = [str(GATEWAY_SCRIPT), *args, "--config", str(self.config_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(self._env()))
        if done.returncode != 0:
            raise BenchError(f"gateway {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
        return done.stdout.strip()


# ---------------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    """One look at the gateway: when (s since the send), its RSS (bytes) and its jobs' states."""

    t: float
    rss: int
    states: Mapping[str, int]

    @property
    def active(self) -> int:
        """Jobs assembling .. encoding (admitted by the budget, volumes and results in memory)."""
        return sum(self.states.get(s, 0) for s in _LEASED)

    @property
    def finished(self) -> int:
        """Jobs exported, skipped or failed."""
        return sum(self.states.get(s, 0) for s in _FINISHED)


def status_bytes(pid: int, key: str) -> int:
    """A ``kB`` line of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no {key} in /proc/{pid}/status")


class Index:
    """Read-only looks at the gateway's SQLite index (``None`` while it is busy or not there yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=0.05)
        return self._db

    def states(self) -> dict[str, int] | None:
        """Jobs per state."""
        try:
            rows = self._connection().execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        except sqlite3.OperationalError:
            return None
        return {str(state): int(n) for state, n in rows}

    def last_finished_at(self) -> float | None:
        """``finished_at`` (epoch s) of the last job to finish."""
        try:
            value = self._connection().execute("SELECT max(finished_at) FROM jobs").fetchone()[0]
        except sqlite3.OperationalError:
            return None
        return None if value is None else float(value)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# ---------------------------------------------------------------------------------------------------- one run


@dataclass
class Run:
    """What one configuration did."""

    budget: int
    samples: list[Sample] = field(default_factory=list)
    send_s: float = 0.0
    wall_s: float = 0.0  # send started -> last job finished
    hwm: int = 0  # the kernel's high-water mark of the process's RSS
    states: Mapping[str, int] = field(default_factory=dict)

    @property
    def idle(self) -> int:
        """RSS before the send (the last sample before it)."""
        return next(s.rss for s in reversed(self.samples) if s.t < 0)

    @property
    def peak(self) -> int:
        return max(s.rss for s in self.samples)

    @property
    def after(self) -> int:
        """RSS at the last sample (10 s after the last job finished)."""
        return self.samples[-1].rss

    @property
    def most_active(self) -> int:
        return max(s.active for s in self.samples)


@contextlib.contextmanager
def senders(series: Sequence[Path], address: str, logdir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One ``gateway send`` process per series, all started at once; killed if still running at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, folder in enumerate(series):
            cmd = [str(GATEWAY_SCRIPT), "send", str(folder), "--to", address, "--associations", str(SEND_ASSOCIATIONS)]
            with (logdir / f"send-{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_config(budget: int, series: Sequence[Path], workdir: Path) -> Run:
    """Start a gateway with ``budget``, send every series at once and sample until 10 s after the last job."""
    gateway = BudgetGateway(workdir, budget)
    print(f"  {gateway.register(MODEL_DIR)}", flush=True)
    run = Run(budget)
    with gateway:
        index = Index(gateway.data_dir / "index.sqlite3")
        try:
            sample_for(run, gateway.pid, index, time.time() + BEFORE_S, start=time.time() + BEFORE_S)
            start = time.time()
            with senders(series, gateway.address, workdir) as procs:
                finished = sample_until_done(run, gateway, index, procs, start, len(series))
            run.wall_s = finished - start
            sample_for(run, gateway.pid, index, finished + AFTER_S, start=start)
            run.hwm = status_bytes(gateway.pid, "VmHWM")
            run.states = index.states() or {}
        finally:
            index.close()
    return run


def take(run: Run, pid: int, index: Index, start: float) -> Sample:
    """One sample, appended to ``run`` (the states of the last sample when the index was busy)."""
    states = index.states()
    if states is None:
        states = dict(run.samples[-1].states) if run.samples else {}
    sample = Sample(time.time() - start, status_bytes(pid, "VmRSS"), states)
    run.samples.append(sample)
    return sample


def sample_for(run: Run, pid: int, index: Index, until: float, *, start: float) -> None:
    """Sample every 0.1 s until the epoch time ``until``."""
    while time.time() < until:
        take(run, pid, index, start)
        time.sleep(SAMPLE_S)


def sample_until_done(
    run: Run, gateway: BudgetGateway, index: Index, procs: Sequence[subprocess.Popen[bytes]], start: float, jobs: int
) -> float:
    """Sample until every sender is done and ``jobs`` jobs (at least) are finished with none left; return the epoch
    time the last one finished."""
    deadline = start + TIMEOUT_S
    while True:
        sample = take(run, gateway.pid, index, start)
        sent = all(p.poll() is not None for p in procs)
        if sent and not run.send_s:
            run.send_s = time.time() - start
            codes = [p.returncode for p in procs]
            if any(codes):
                raise BenchError(f"gateway send exit codes {codes}: see {gateway.tmpdir}/send-*.log")
        settled = sent and time.time() - start > run.send_s + QUIET_PERIOD_S + 1  # no series still completing
        if settled and sample.finished >= jobs and sample.finished == sum(sample.states.values()):
            return index.last_finished_at() or time.time()
        if time.time() > deadline or not gateway.alive:
            raise BenchError(f"jobs {sample.states} after {time.time() - start:.0f} s:\n{log_tail(gateway.log_path)}")
        time.sleep(SAMPLE_S)


# ---------------------------------------------------------------------------------------------------- report


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def budget_name(budget: int) -> str:
    return f"{budget / GIB:g} GiB"


def table(runs: Sequence[Run], share: int) -> list[str]:
    """Markdown lines: one column per budget, then the first budget's peaks over the last's."""
    first, last = runs[0], runs[-1]
    rows: list[tuple[str, list[str], str]] = [
        ("RSS before the send (GiB; model not loaded yet)", [gib(r.idle) for r in runs], ""),
        (
            "**peak RSS** (GiB, sampled every 0.1 s)",
            [f"**{gib(r.peak)}**" for r in runs],
            f"{first.peak / last.peak:.2f}",
        ),
        ("peak RSS, kernel high-water mark VmHWM (GiB)", [gib(r.hwm) for r in runs], f"{first.hwm / last.hwm:.2f}"),
        ("RSS 10 s after the last job finished (GiB)", [gib(r.after) for r in runs], ""),
        ("most jobs assembling .. encoding at once", [str(r.most_active) for r in runs], ""),
        (
            "budget ÷ estimated share of one job",
            [f"{r.budget / share:.1f}" for r in runs],
            "",
        ),
        ("send (all series in the gateway, s)", [f"{r.send_s:.1f}" for r in runs], ""),
        ("**wall time**, send -> last job finished (s)", [f"**{r.wall_s:.1f}**" for r in runs], ""),
        ("jobs at the end", [", ".join(f"{n} {s}" for s, n in sorted(r.states.items())) for r in runs], ""),
    ]
    names = [f"budget {budget_name(r.budget)}" for r in runs]
    ratio = f"{budget_name(first.budget)} ÷ {budget_name(last.budget)}"
    lines = [f"| | {' | '.join(names)} | {ratio} |", "|---|" + "---:|" * (len(runs) + 1)]
    lines += [f"| {label} | {' | '.join(values)} | {r} |" for label, values, r in rows]
    return lines


def section(runs: Sequence[Run], args: argparse.Namespace, share: int, total_bytes: int) -> str:
    """The markdown section for ``docs/benchmarks.md``."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        HEADING,
        "",
        f"{args.series} synthetic CT series ({args.slices} slices of {args.size}x{args.size} each, "
        f"{total_bytes / 1e6:.0f} MB in all) sent at once by {args.series} `gateway send` processes to a real "
        f"`gateway serve` ({WORKERS} job workers, quiet period {QUIET_PERIOD_S:g} s, no export destination, only "
        "`ct-tissue`), once per `jobs.memory_budget_bytes`. The gateway process's RSS (`VmRSS`) and its jobs' states "
        f"(index, read-only) are sampled every {SAMPLE_S:g} s from before the send until {AFTER_S:g} s after the "
        f"last job finished. The runner estimates each job's share at voxels x {BYTES_PER_VOXEL} bytes = "
        f"{gib(share)} GiB. The last column is the ratio of the peaks.",
        "",
        *table(runs, share),
        "",
        "Machine:",
        "",
        *machine(
            [
                "- CPU only (no GPU)",
                f"- load average at the end: {load} (the machine is shared: other tests ran at the same time)",
            ]
        ),
        "",
    ]
    return "\n".join(lines)


def write_samples(run: Run, path: Path) -> None:
    """The samples as CSV: t_s, rss_bytes, active jobs, finished jobs."""
    rows = ["t_s,rss_bytes,active,finished"]
    rows += [f"{s.t:.2f},{s.rss},{s.active},{s.finished}" for s in run.samples]
    path.write_text("\n".join(rows) + "\n")


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--series", type=int, default=5, help="series sent at once (default 5)")
    parser.add_argument("--slices", type=int, default=140, help="slices per series (default 140)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=[64.0, 2.0], help="jobs.memory_budget_bytes in GiB (default 64 2)"
    )
    parser.add_argument("--out", type=Path, help="keep the samples (CSV) and the gateways' logs here")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.series < 1 or args.slices < 1 or args.size < 32 or min(args.budgets) <= 0:
        parser.error("--series and --slices must be >= 1, --size >= 32, --budgets > 0")
    return args


def write_series(folder: Path, args: argparse.Namespace) -> tuple[list[Path], int]:
    """One synthetic series per sender (seeds 1..N); the folders and their total size."""
    folders = []
    for i in range(args.series):
        folders.append(folder / f"series-{i}")
        write_synthetic_ct(folders[-1], args.slices, rows=args.size, columns=args.size, seed=i + 1)
    total = sum(f.stat().st_size for d in folders for f in d.glob("*.dcm"))
    return folders, total


def keep(workdir: Path, out: Path | None, name: str) -> None:
    """Copy the run's logs to ``out/name`` (when ``--out`` is given)."""
    if out is None or not workdir.is_dir():
        return
    dest = out / name
    dest.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("*.log"):
        shutil.copy2(log, dest / log.name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    share = args.slices * args.size * args.size * BYTES_PER_VOXEL
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        series, total = write_series(Path(tmp) / "series", args)
        print(f"{len(series)} series, {total / 1e6:.0f} MB, written in {time.monotonic() - started:.0f} s", flush=True)
        runs = []
        for i, budget_gib in enumerate(args.budgets):
            budget = int(budget_gib * GIB)
            print(f"budget {budget_name(budget)}:", flush=True)
            workdir = Path(tmp) / f"run-{i}"
            try:
                runs.append(run_config(budget, series, workdir))
            except (BenchError, PeerError) as exc:
                print(f"benchmark failed: {exc}", file=sys.stderr)
                return 1
            finally:
                keep(workdir, args.out, f"budget-{budget_gib:g}GiB")
            r = runs[-1]
            print(f"  peak {gib(r.peak)} GiB, after {gib(r.after)} GiB, at once {r.most_active}, {r.wall_s:.0f} s")
            if args.out is not None:
                write_samples(r, args.out / f"budget-{budget_gib:g}GiB" / "samples.csv")
            shutil.rmtree(workdir / "data", ignore_errors=True)
    text = section(runs, args, share, total)
    print()
    print(text)
    print(f"total time {time.monotonic() - started:.0f} s")
    if not args.no_write:
        write_section(DOC, text, HEADING)
        print(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
