"""Crash safety: ``kill -9`` of a real ``gateway serve`` mid-transfer loses nothing it acknowledged.

The server runs as its own process (the console script) over a data folder; the test sends a synthetic series to it
over four associations with the gateway's own SCU and kills it from the SCU's progress callback, then inspects the
data folder as the crash left it, restarts the server on it, and resends. What must hold:

* every acknowledged instance is in the index, and its file's data set is byte for byte the one sent;
* every file under ``instances/`` is complete (an unindexed one may exist: the crash fell between link and commit);
* a restart leaves nothing in ``tmp/``, and the revision open at the crash completes exactly once after it;
* a resend stores what was missing, acknowledging the duplicates, and opens exactly one new revision for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from gateway.export.scu import DicomFile, Peer, SendReport, scan, send
from gateway.synth.ct import write_synthetic_ct

from dicom_files import dataset_bytes
from peers import GatewayServer, wait_until

pytestmark = pytest.mark.slow

SLICES = 200
QUIET_S = 1.5


class ServedGateway(GatewayServer):
    """The gateway served over ``data_dir``, with a short quiet period and no job workers."""

    def __init__(self, tmpdir: Path, data_dir: Path) -> None:
        # No wait for a re-send after a restart (ingest.resend_wait_s): these tests restart without re-sending and
        # check each phase's revision on its own; tests/e2e/test_soak.py re-sends after a kill mid-transfer.
        ingest = {"quiet_period_s": QUIET_S, "completion_poll_s": 0.1, "resend_wait_s": 0}
        super().__init__(
            tmpdir, data_dir, {"ingest": ingest, "jobs": {"workers": 0}}
        )  # about ingest: jobs stay "received"

    @property
    def peer(self) -> Peer:
        return Peer("GATEWAY", "127.0.0.1", self.dicom_port)

    def jobs(self) -> list[dict[str, object]]:
        answer = httpx.get(f"http://127.0.0.1:{self.http_port}/api/jobs", timeout=10)
        answer.raise_for_status()
        jobs: list[dict[str, object]] = answer.json()
        return jobs

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)

    def reap(self) -> int:
        """Wait for the process to end (it was killed or told to stop) and return its exit status."""
        proc = self.process
        assert proc is not None
        proc.wait(timeout=30)
        self.stop()  # closes the log
        return proc.returncode

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.reap()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServedGateway]:
    gw = ServedGateway(tmp_path / "run", tmp_path / "data")
    try:
        yield gw
    finally:
        gw.stop()  # SIGTERM, then SIGKILL: never left running, whatever failed


def send_all(files: list[DicomFile], peer: Peer, kill: ServedGateway | None = None, after: int = 0) -> set[Path]:
    """Send ``files`` over 4 associations; return those acknowledged. ``kill`` is SIGKILLed after ``after`` answers."""
    answers = 0
    killed = threading.Event()
    lock = threading.Lock()

    def progress(n: int) -> None:
        nonlocal answers
        with lock:
            answers += n
            due = kill is not None and answers >= after and not killed.is_set()
            if due:
                killed.set()
        if due and kill is not None:
            kill.kill9()

    report = send(files, peer, associations=4, on_progress=progress)
    failed = {path for path, _ in report.failed}
    acked = {f.path for f in files} - failed
    assert len(acked) == report.sent and len(failed) == len(report.failed), "every file has exactly one outcome"
    if kill is not None:
        assert killed.is_set(), "the server was killed mid-transfer"
        # Each association fails its in-flight C-STORE and gives up on the rest at once, rather than trying every
        # remaining file against the dead peer (and waiting out pynetdicom's DIMSE timeout for each).
        reasons = {reason for _, reason in report.failed}
        assert reasons <= {
            "no response (association aborted or timed out)",
            "not sent: the association was lost",
            "association not accepted",
        }, reasons
        assert 0 < report.sent < len(files), report.failed[:3]
    return acked


def index(data_dir: Path) -> tuple[dict[str, tuple[str, int]], list[tuple[int, int, str, int]], list[tuple]]:
    """The index as the disk holds it: {SOP UID: (path, revision id)}, revisions and jobs (server stopped)."""
    with contextlib.closing(sqlite3.connect(data_dir / "index.sqlite3")) as db:
        instances = {
            uid: (path, rev)
            for uid, path, rev in db.execute("SELECT sop_instance_uid, path, revision_id FROM instances")
        }
        revisions = list(
            db.execute("SELECT id, revision, state, instance_count FROM series_revisions ORDER BY revision")
        )
        jobs = list(db.execute("SELECT id, revision_id, state, detail FROM jobs ORDER BY id"))
    return instances, revisions, jobs


def check_files(data_dir: Path, sources: dict[str, Path]) -> dict[str, Path]:
    """Every file under ``instances/`` is a complete copy of a source; return them by SOP Instance UID."""
    found: dict[str, Path] = {}
    for path in (data_dir / "instances").rglob("*"):
        if not path.is_file():
            continue
        ds = pydicom.dcmread(path)
        uid = str(ds.SOPInstanceUID)
        assert uid in sources, f"{path} is not one of the instances sent"
        assert uid not in found, f"{uid} stored twice"
        assert dataset_bytes(path) == dataset_bytes(sources[uid]), f"{path} differs from what was sent"
        found[uid] = path
    return found


def check_crash_state(data_dir: Path, sources: dict[str, Path], acked_uids: set[str]) -> set[str]:
    """What the crash left: every acknowledged instance indexed and intact; return the indexed SOP UIDs."""
    instances, _, _ = index(data_dir)
    on_disk = check_files(data_dir, sources)
    missing = acked_uids - instances.keys()
    assert not missing, f"{len(missing)} acknowledged instance(s) not in the index after the crash"
    for uid, (relpath, _) in instances.items():
        assert on_disk.get(uid) == data_dir / relpath, f"indexed {uid} has no intact file at {relpath}"
    return set(instances)


def tmp_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "tmp").rglob("*") if p.is_file()]


def test_kill_9_mid_transfer(server: ServedGateway, tmp_path: Path) -> None:
    ct = write_synthetic_ct(tmp_path / "ct", SLICES, rows=128, columns=128)
    sources = {uid: tmp_path / "ct" / f"CT{k:06d}.dcm" for k, uid in enumerate(ct.sop_instance_uids, start=1)}
    uid_of = {path: uid for uid, path in sources.items()}
    files = scan([tmp_path / "ct"], SendReport())
    assert len(files) == SLICES
    data = server.data_dir

    phases: list[set[str]] = []  # the instances first indexed in each phase: one revision each
    acked_total: set[str] = set()
    indexed: set[str] = set()
    server.start()
    for kill_after in (5, 120):  # answers (acknowledgements and refusals) before the kill
        acked = {uid_of[p] for p in send_all(files, server.peer, kill=server, after=kill_after)}
        assert server.reap() == -signal.SIGKILL
        acked_total |= acked
        now_indexed = check_crash_state(data, sources, acked_total)
        assert now_indexed >= indexed
        phases.append(now_indexed - indexed)
        indexed = now_indexed
        _, revisions, jobs = index(data)
        assert [(rev, state, count) for _, rev, state, count in revisions][-1] == (len(phases), "open", len(phases[-1]))
        assert len(jobs) == len(phases) - 1, "the revision receiving at the crash had not completed"

        server.start()  # same config, same data folder
        assert tmp_files(data) == [], "a restart clears the partial files of the interrupted run"
        wait_until(lambda: len(server.jobs()) == len(phases), timeout_s=30, what=f"job {len(phases)}")

    assert send_all(files, server.peer) == {f.path for f in files}, (
        "a resend acknowledges every instance, duplicates too"
    )
    phases.append(set(sources) - indexed)
    wait_until(lambda: len(server.jobs()) == len(phases), timeout_s=30, what="the last job")
    assert tmp_files(data) == []
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: the status says how the process ended.
    assert server.terminate() in (0, -signal.SIGTERM)
    log = server.log_path.read_text()
    assert log.count("Application shutdown complete") == 1, "only the last run ended gracefully"
    assert "Traceback" not in log, log[-3000:]

    instances, revisions, jobs = index(data)
    assert set(instances) == set(sources)
    assert check_files(data, sources).keys() == instances.keys(), "no file outside the index is left"
    assert all(phases), "each phase stored something new (else the kill points need moving)"
    assert [(rev, state, count) for _, rev, state, count in revisions] == [
        (k, "complete", len(phase)) for k, phase in enumerate(phases, start=1)
    ], "one revision per phase: the open one completes after each restart, the resend opens the next"
    revision_ids = [rev_id for rev_id, *_ in revisions]
    for rev_id, phase in zip(revision_ids, phases, strict=True):
        assert {uid for uid, (_, r) in instances.items() if r == rev_id} == phase
    assert [(rev_id, state, json.loads(detail)) for _, rev_id, state, detail in jobs] == [
        (rev_id, "received", {"revision": k, "instances": len(phase)})
        for k, (rev_id, phase) in enumerate(zip(revision_ids, phases, strict=True), start=1)
    ], "exactly one job per revision"
