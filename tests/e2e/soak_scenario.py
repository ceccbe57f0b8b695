"""The soak scenario of issue 10: a real ``gateway serve`` fed synthetic series without pause, killed and stopped
under load, its PACS (Orthanc) down for a while; then the invariants.

One copy for its two users: ``bench/soak.py`` runs it for minutes with faults at random moments and prints the
figures; ``tests/e2e/test_soak.py`` runs a short plan whose faults wait for the job states they aim at.

What happens (:class:`Soak`):

- Orthanc (the PACS) starts on ports chosen in advance; ``ct-tissue`` is registered and enabled with the CLI; the
  gateway starts with every result going to Orthanc (``export.default``) by C-STORE.
- A sender thread writes a new synthetic CT series (its own seed, so its own UIDs) every ``series_interval_s``
  and sends it with ``gateway send``. A run that fails (the gateway is down, or went down mid-way) is repeated
  whole once the gateway is back: a series counts as sent when one run had every instance acknowledged.
- The plan's events fire at their times (:class:`Event`): ``kill9`` (SIGKILL, then the gateway is started again
  on the same data folder), ``sigterm`` (a clean stop, then a start), ``outage`` (Orthanc stopped for a while,
  then started again on the same ports and storage). An event with ``when`` waits until a job is in one of those
  states. With ``kill_between_sends`` a SIGKILL or SIGTERM waits for the sender's current run to end.
- A sampler reads the gateway process's RSS (``/proc/PID/status`` VmRSS) and open descriptors (``/proc/PID/fd``)
  every few seconds, per process life.
- At the end the sender stops, the gateway gets time to finish every job and delivery, and a
  :class:`~soak_report.SoakReport` holds what its index (read-only) and Orthanc hold; the invariants are there.

The job states are read from the SQLite index directly (``<data_dir>/index.sqlite3``, opened read-only), so the
scenario depends neither on the HTTP API nor on its tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from soak_report import (
    FINISHED_STATES,
    LEASED_STATES,
    DeliveryRow,
    Event,
    Fired,
    IndexSnapshot,
    JobRow,
    Life,
    PacsInstance,
    Plan,
    Revision,
    Sample,
    SentSeries,
    SoakReport,
)

from gateway.jobs.states import JobState
from gateway.synth.ct import write_synthetic_ct

from peers import GATEWAY_SCRIPT, GatewayServer, OrthancOn, PeerError, free_port, log_tail

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "ct-tissue"
DESTINATION = "pacs"
_SENT = re.compile(r"(\d+) sent, (\d+) failed")
_POLL_S = 0.05


def gateway_sections(pacs_dicom_port: int, plan: Plan) -> dict[str, Any]:
    """The gateway's settings sections: fast completion, two workers, quick retries that outlast an outage."""
    return {
        "models": {"register_shipped": False},
        "ingest": {"quiet_period_s": plan.quiet_period_s, "completion_poll_s": 0.2},
        "jobs": {"workers": plan.workers, "poll_s": 0.2, "shutdown_grace_s": plan.shutdown_grace_s},
        "export": {
            "destinations": {DESTINATION: {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_dicom_port}},
            "default": [DESTINATION],
            "backoff_initial_s": 1.0,
            "backoff_max_s": 5.0,
            "max_attempts": 1000,  # never dead while the PACS is down
            "poll_s": 0.2,
            "timeout_s": 10.0,
            "workers": 1,
        },
    }


# ---------------------------------------------------------------------------------------------------- peers


class SoakGateway(GatewayServer):
    """``gateway serve`` over the soak's data folder, with the CLI, SIGKILL and SIGTERM."""

    @property
    def address(self) -> str:
        """``AET@HOST:PORT`` of the DICOM listener."""
        return f"GATEWAY@127.0.0.1:{self.dicom_port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.process is not None
        return self.process.pid

    def cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """``gateway ARGS`` in another process, with this gateway's environment."""
        return subprocess.run(
            [str(GATEWAY_SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s, env=dict(self._env())
        )

    def kill9(self) -> None:
        """SIGKILL the server (no shutdown code runs), reap it, and clear its process group."""
        os.kill(self.pid, signal.SIGKILL)
        assert self.process is not None
        self.process.wait(timeout=30)
        self.stop()

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM the server alone (as a service manager does) and wait; its exit status, ``None`` if it hung."""
        assert self.process is not None
        process = self.process
        os.kill(process.pid, signal.SIGTERM)
        try:
            code: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        self.stop()
        return code


class Index:
    """The gateway's SQLite index, read-only."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "index.sqlite3"

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            yield conn
        finally:
            conn.close()

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """The rows of a query; an index that does not exist yet, or is busy past the timeout, reads as empty."""
        try:
            with self._connection() as conn:
                return list(conn.execute(sql, args))
        except sqlite3.OperationalError:
            return []

    def job_in(self, states: Sequence[str]) -> tuple[int, str] | None:
        """A job (id, state) in one of ``states``, if any."""
        marks = ",".join("?" * len(states))
        found = self.rows(f"SELECT id, state FROM jobs WHERE state IN ({marks}) ORDER BY id LIMIT 1", *states)
        return (int(found[0][0]), str(found[0][1])) if found else None

    def finished_count(self) -> int:
        """Jobs in a final state."""
        marks = ",".join("?" * len(FINISHED_STATES))
        found = self.rows(f"SELECT count(*) FROM jobs WHERE state IN ({marks})", *sorted(FINISHED_STATES))
        return int(found[0][0]) if found else 0

    def states(self) -> dict[int, str]:
        """Job id -> state."""
        return {int(i): str(s) for i, s in self.rows("SELECT id, state FROM jobs")}

    def job(self, job_id: int) -> dict[str, Any] | None:
        """One job's state, attempts and the hand-backs its detail records."""
        found = self.rows("SELECT state, attempts, detail FROM jobs WHERE id = ?", job_id)
        if not found:
            return None
        state, attempts, detail = found[0]
        handed_back = json.loads(detail or "{}").get("handed_back", [])
        return {"id": job_id, "state": state, "attempts": attempts, "handed_back": handed_back}

    def snapshot(self, tries: int = 5) -> IndexSnapshot:
        """Revisions, jobs and deliveries as they are now, read in one transaction (retried while busy)."""
        for _ in range(tries - 1):
            try:
                return self._snapshot()
            except sqlite3.OperationalError:
                time.sleep(1.0)
        return self._snapshot()

    def _snapshot(self) -> IndexSnapshot:
        with self._connection() as conn:
            conn.execute("BEGIN")  # one read transaction: the three tables at the same moment
            return _snapshot(conn)


def _snapshot(conn: sqlite3.Connection) -> IndexSnapshot:
    revisions = [
        Revision(int(i), str(s), int(r), str(st), int(n))
        for i, s, r, st, n in conn.execute(
            "SELECT id, series_instance_uid, revision, state, instance_count FROM series_revisions"
        )
    ]
    jobs = [
        JobRow(int(i), int(rid), str(s), str(st), int(a), json.loads(d or "{}"))
        for i, rid, s, st, a, d in conn.execute(
            "SELECT id, revision_id, series_instance_uid, state, attempts, detail FROM jobs"
        )
    ]
    deliveries = [
        DeliveryRow(int(j), str(u), str(st), int(a), json.loads(h or "[]"))
        for j, u, st, a, h in conn.execute("SELECT job_id, sop_instance_uid, state, attempts, history FROM deliveries")
    ]
    return IndexSnapshot(revisions, jobs, deliveries)


def pacs_contents(orthanc: OrthancOn) -> list[PacsInstance]:
    """Every instance Orthanc holds (one entry per stored instance)."""
    series = {s["ID"]: s["MainDicomTags"] for s in orthanc.rest("GET", "/series?expand")}
    held = []
    for instance in orthanc.rest("GET", "/instances?expand"):
        tags = series.get(instance["ParentSeries"], {})
        held.append(
            PacsInstance(
                instance["MainDicomTags"]["SOPInstanceUID"],
                tags.get("SeriesInstanceUID", "?"),
                tags.get("Modality", ""),
            )
        )
    return held


# ---------------------------------------------------------------------------------------------------- the soak


class Soak:
    """Runs a :class:`Plan` in ``workdir`` (data folder, logs, series); :meth:`run` returns the report."""

    def __init__(self, workdir: Path, plan: Plan, *, log: Callable[[str], object] | None = None) -> None:
        self.workdir = Path(workdir)
        self.plan = plan
        self.data_dir = self.workdir / "data"
        self.index = Index(self.data_dir)
        self._say = log or (lambda message: None)
        self.series: list[SentSeries] = []
        self.lives: list[Life] = []
        self.fired: list[Fired] = []
        self.unexpected_exits: list[str] = []
        self.outage_s: list[float] = []
        self.gateway: SoakGateway | None = None
        self.orthanc: OrthancOn | None = None
        self.send_lock = threading.Lock()
        self.up = threading.Event()
        self.stop_sending = threading.Event()
        self.abort = threading.Event()
        self._life_lock = threading.Lock()
        self._t0 = time.monotonic()
        self._pacs_ports = (free_port(), free_port())
        self._sections = gateway_sections(self._pacs_ports[1], plan)
        self.sender_errors: list[str] = []

    def now(self) -> float:
        """Seconds since the soak began."""
        return time.monotonic() - self._t0

    # -- the run -------------------------------------------------------------------------------------------------

    def run(self) -> SoakReport:
        """Start the peers, send and fire the events, let the gateway settle, and report."""
        threads = [
            threading.Thread(target=self._send_loop, name="soak-sender", daemon=True),
            threading.Thread(target=self._sample_loop, name="soak-sampler", daemon=True),
        ]
        try:
            self._start_pacs()
            self._prepare_gateway()
            self._t0 = time.monotonic()
            self._start_gateway()
            for thread in threads:
                thread.start()
            self._drive()
            self.stop_sending.set()
            self._wait_for_sender(threads[0])
            settled = self._settle()
            return self._report(settled)
        finally:
            self.abort.set()
            self.stop_sending.set()
            for thread in threads:
                if thread.is_alive():
                    thread.join(timeout=150)
            if self.gateway is not None:
                self.gateway.stop()
            if self.orthanc is not None:
                self.orthanc.stop()

    def _start_pacs(self) -> None:
        http_port, dicom_port = self._pacs_ports
        self.orthanc = OrthancOn(self.workdir / "orthanc", http_port, dicom_port, dicomweb=False)
        self.orthanc.start()

    def _prepare_gateway(self) -> None:
        """Register and enable ct-tissue with the CLI, as an operator does before the first start."""
        gateway = SoakGateway(self.workdir / "setup", self.data_dir, self._sections)
        for args in (("register", str(MODEL)), ("enable", "ct-tissue")):
            done = gateway.cli("models", *args, "--config", str(gateway.config_path))
            if done.returncode != 0:
                raise PeerError(f"gateway models {args[0]}: exit {done.returncode}\n{done.stdout}{done.stderr}")
            self._say(f"models {args[0]}: {done.stdout.strip()}")

    def _start_gateway(self) -> None:
        number = len(self.lives) + 1
        gateway = SoakGateway(self.workdir / f"life{number:02d}", self.data_dir, self._sections)
        gateway.start(timeout_s=180)
        life = Life(number, gateway.pid, self.now(), self.index.finished_count())
        with self._life_lock:
            self.gateway = gateway
            self.lives.append(life)
        self.up.set()
        self._say(f"{self.now():7.1f} s  gateway life {number} up (pid {life.pid})")

    def _end_life(self, how: str) -> None:
        with self._life_lock:
            life = self.lives[-1]
            life.ended_by, life.ended_s = how, self.now()

    def _drive(self) -> None:
        """Fire the events in time order, watch for unexpected exits, end the outage; until sending is over."""
        pending = sorted(self.plan.events, key=lambda e: e.at_s)
        outage_end: float | None = None
        while not self.abort.is_set():
            self._watch()
            if outage_end is not None and self.now() >= outage_end:
                self._end_outage()
                outage_end = None
            event = pending[0] if pending else None
            if event is not None and self.now() >= event.at_s:
                if event.kind == "outage" and outage_end is None:
                    outage_end = self._outage(event)
                    pending.pop(0)
                elif event.kind != "outage" and self._stop_gateway(event):
                    pending.pop(0)
            if not pending and outage_end is None and self.now() >= self.plan.send_for_s:
                return
            time.sleep(_POLL_S)

    def _aimed(self, event: Event) -> tuple[bool, tuple[int, str] | None]:
        """Whether the event may fire now (a job is in its ``when`` states, or it waited long enough); the job."""
        if not event.when:
            return True, None
        found = self.index.job_in(event.when)
        return found is not None or self.now() >= event.at_s + self.plan.when_timeout_s, found

    def _watch(self) -> None:
        """A gateway that exited on its own is recorded and started again (three times at most)."""
        gateway = self.gateway
        if gateway is None or not self.up.is_set() or gateway.alive:
            return
        assert gateway.process is not None
        code = gateway.process.poll()
        self.up.clear()
        self.unexpected_exits.append(f"life {len(self.lives)} exited {code}:\n{log_tail(gateway.log_path, 30)}")
        self._end_life(f"exited by itself ({code})")
        gateway.stop()
        if len(self.unexpected_exits) > 3:
            self.abort.set()
            return
        self._start_gateway()

    def _held(self) -> dict[int, str]:
        return {i: s for i, s in self.index.states().items() if s in LEASED_STATES or s == JobState.ENCODED}

    def _outage(self, event: Event) -> float:
        """Stop Orthanc; when it is to start again."""
        assert self.orthanc is not None
        at = self.now()
        self.orthanc.stop()
        self.fired.append(Fired("outage", at, None, f"Orthanc down for {event.duration_s:.0f} s", self._held()))
        self._say(f"{at:7.1f} s  Orthanc stopped")
        return at + event.duration_s

    def _stop_gateway(self, event: Event) -> bool:
        """SIGKILL or SIGTERM the gateway if the event's aim is met (checked between two sends when the plan says
        so), then start it again; whether it fired."""
        gateway = self.gateway
        assert gateway is not None
        lock = self.send_lock if self.plan.kill_between_sends else contextlib.nullcontext()
        with lock:
            ready, found = self._aimed(event)
            if not ready:
                return False
            at = self.now()
            self.up.clear()
            held = self._held()
            if event.kind == "kill9":
                gateway.kill9()
                self._end_life("kill -9")
                self.fired.append(Fired("kill9", at, found, "killed", held))
            else:
                began = time.monotonic()
                code = gateway.terminate(self.plan.shutdown_grace_s + 60)
                took = time.monotonic() - began
                self._end_life("SIGTERM")
                after = self.index.job(found[0]) if found else None
                left = {i: s for i, s in self.index.states().items() if s in LEASED_STATES}
                outcome = "stopped" if code is not None else "did not exit"
                self.fired.append(Fired("sigterm", at, found, outcome, held, code, took, after, left))
        self._say(f"{at:7.1f} s  {event.kind} (aimed at job {found}; held {held})")
        time.sleep(self.plan.restart_delay_s)
        self._start_gateway()
        return True

    def _end_outage(self) -> None:
        assert self.orthanc is not None
        began = [f.at_s for f in self.fired if f.kind == "outage"][-1]
        self.orthanc.start()
        self.outage_s.append(self.now() - began)
        self._say(f"{self.now():7.1f} s  Orthanc back after {self.outage_s[-1]:.0f} s")

    def _wait_for_sender(self, sender: threading.Thread) -> None:
        """The sender finishes the series it is sending (the gateway is kept running meanwhile)."""
        while sender.is_alive() and not self.abort.is_set():
            self._watch()
            sender.join(timeout=0.2)

    def _settle(self) -> bool:
        """Let the gateway finish every job and delivery; whether it did before the timeout."""
        deadline = time.monotonic() + self.plan.settle_timeout_s
        uids = {s.series_instance_uid for s in self.series if s.sent}
        while time.monotonic() < deadline and not self.abort.is_set():
            self._watch()
            if self.index.snapshot().settled(uids):
                return True
            time.sleep(0.5)
        return False

    def _report(self, settled: bool) -> SoakReport:
        """Read the index and Orthanc, then stop the gateway cleanly (its exit status is part of the report)."""
        time.sleep(self.plan.sample_s)  # a last sample of the settled process
        snapshot = self.index.snapshot()
        assert self.orthanc is not None
        pacs = pacs_contents(self.orthanc)
        final_exit: int | None = None
        if self.gateway is not None and self.gateway.alive:
            self.up.clear()
            final_exit = self.gateway.terminate(self.plan.shutdown_grace_s + 60)
            self._end_life("end (SIGTERM)")
        return SoakReport(
            plan=self.plan,
            duration_s=self.now(),
            settled=settled,
            series=list(self.series),
            lives=list(self.lives),
            fired=list(self.fired),
            outage_s=list(self.outage_s),
            unexpected_exits=list(self.unexpected_exits),
            sender_errors=list(self.sender_errors),
            index=snapshot,
            pacs=pacs,
            final_exit=final_exit,
        )

    # -- the sender ----------------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        number = 0
        while not self.stop_sending.is_set() and not self.abort.is_set():
            began = time.monotonic()
            try:
                self._send_series(number)
            except Exception as exc:  # recorded: the report fails on it
                self.sender_errors.append(f"series {number}: {type(exc).__name__}: {exc}")
            number += 1
            self.stop_sending.wait(max(0.0, began + self.plan.series_interval_s - time.monotonic()))

    def _send_series(self, number: int) -> None:
        folder = self.workdir / "series" / f"{number:04d}"
        desc = write_synthetic_ct(
            folder,
            self.plan.slices,
            rows=self.plan.size,
            columns=self.plan.size,
            seed=self.plan.seed * 100_000 + number,
        )
        record = SentSeries(number, str(desc.series_instance_uid), self.plan.slices)
        self.series.append(record)
        while not self.abort.is_set():
            if not self.up.wait(timeout=1.0):
                continue
            lock = self.send_lock if self.plan.kill_between_sends else contextlib.nullcontext()
            with lock:
                gateway = self.gateway
                if gateway is None or not self.up.is_set():
                    continue
                done = gateway.cli("send", str(folder), "--to", gateway.address, "--associations", "1", timeout_s=120)
            record.runs += 1
            counts = _SENT.search(done.stdout)
            sent = int(counts.group(1)) if counts else 0
            if done.returncode == 0 and sent == record.instances:
                record.sent = True
                return
            record.failed_runs += 1
            record.acked_in_failed_runs += sent
            time.sleep(0.5)

    # -- the sampler ---------------------------------------------------------------------------------------------

    def _sample_loop(self) -> None:
        while not self.abort.wait(self.plan.sample_s):
            with self._life_lock:
                life = self.lives[-1] if self.lives else None
            if life is None or life.ended_s is not None:
                continue
            reading = _read_proc(life.pid)
            if reading is None:
                continue
            finished = self.index.finished_count() - life.finished_before
            with self._life_lock:
                if life.ended_s is None:
                    life.samples.append(Sample(self.now(), reading[0], reading[1], finished))


def _read_proc(pid: int) -> tuple[float, int] | None:
    """(VmRSS in MB, open descriptors) of a process; ``None`` if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return (int(match.group(1)) / 1024, fds) if match else None
