"""End to end on PostgreSQL: two ingest processes and two workers share one index and one data folder.

Real processes: four ``gateway serve`` on one PostgreSQL database (Debian's server, started by the suite) and one
data folder. Two run ``--role ingest,export`` (each a DICOM listener, completion, and export to the PACS), two run
``--role worker``. Orthanc is the PACS. Twenty synthetic CT series are sent at once, each series' instances split
between the two ingest processes (even instances to one, odd to the other, by two ``gateway send`` at the same
time). While a job is being inferred by the first worker, that worker is killed with SIGKILL; the other takes its
jobs over once their leases lapse.

Then: every series has one revision and exactly one job, ``exported``; every output was delivered exactly once and
Orthanc holds exactly the outputs, no more; every lease of every job is recorded and no two leases of a job
overlap in time; the killed worker's lease was taken back; ``/api/workers`` lists the processes, the killed one no
longer alive.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select

from gateway.config import StoreSettings
from gateway.jobs.lifecycle import overlapping_claims
from gateway.store.index import Delivery, Instance, Job, JobClaim, Output, SeriesRevision
from gateway.store.store import InstanceStore
from gateway.synth.ct import write_synthetic_ct

from conftest import require_tool
from peers import GATEWAY_SCRIPT, Orthanc, PeerProcess, ServedGateway, orthanc_binary, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "ct-tissue"
SERIES = 20
SLICES = 12
LEASE_S = 4.0


@pytest.fixture
def index(postgres_url: str) -> Iterator[_Index]:
    """The test's own reader of the shared index."""
    reader = _Index(postgres_url)
    try:
        yield reader
    finally:
        reader.close()


@pytest.fixture
def peers() -> Iterator[list[PeerProcess]]:
    """Peers to stop at the end, whatever happened (in reverse order of start)."""
    started: list[PeerProcess] = []
    try:
        yield started
    finally:
        for peer in reversed(started):
            peer.stop()


class _Index:
    """The shared index, read as an outside program would (its own engine)."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url)
        self.url = url

    def close(self) -> None:
        self.engine.dispose()

    def scalar(self, query: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def rows(self, query: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(query).all())


def _split(series_dirs: list[Path], dest: Path) -> tuple[Path, Path]:
    """Copy every series' even-numbered files under ``dest/a`` and odd-numbered ones under ``dest/b``."""
    halves = dest / "a", dest / "b"
    for folder in series_dirs:
        for k, path in enumerate(sorted(folder.glob("*.dcm"))):
            target = halves[k % 2] / folder.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.name)
    return halves


def _send(folder: Path, to: str, env: dict[str, str], results: dict[str, str]) -> None:
    done = subprocess.run(
        [str(GATEWAY_SCRIPT), "send", str(folder), "--to", to, "--associations", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    results[to] = done.stdout + done.stderr


def _log_tails(gateways: list[ServedGateway]) -> str:
    return "\n".join(
        f"--- {g.args} log ---\n{g.log_path.read_text(errors='replace')[-3000:]}"
        for g in gateways
        if g.log_path.exists()
    )


def test_two_ingest_two_workers_one_killed(
    postgres_url: str, index: _Index, tmp_path: Path, peers: list[PeerProcess]
) -> None:
    if orthanc_binary() is None:
        require_tool("Orthanc")
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=False)
    peers.append(orthanc)
    orthanc.start()

    data = tmp_path / "data"
    sections: dict[str, Any] = {
        "store": {"data_dir": str(data), "min_free_bytes": 0, "database_url": postgres_url},
        "ingest": {"quiet_period_s": 2.0, "completion_poll_s": 0.2},
        "jobs": {"workers": 2, "poll_s": 1.0, "lease_s": LEASE_S},
        "export": {
            "destinations": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
            "default": ["pacs"],
            "poll_s": 1.0,
            "timeout_s": 30.0,
            "workers": 1,
        },
        "cluster": {"heartbeat_s": 1.0},
    }

    def gateway(name: str, role: str) -> ServedGateway:
        return ServedGateway(tmp_path / name, data, sections, ["--role", role])

    ingest = [gateway("ingest-a", "ingest,export"), gateway("ingest-b", "ingest,export")]
    workers = [gateway("worker-1", "worker"), gateway("worker-2", "worker")]
    everyone = [*ingest, *workers]
    registered = ingest[0].cli("models", "register", str(MODEL), "--config", str(ingest[0].config_path))
    assert registered.startswith("ct-tissue@"), registered
    ingest[0].cli("models", "enable", "ct-tissue", "--config", str(ingest[0].config_path))
    for server in everyone:  # all at once: their schema checks, registrations and announcements race
        peers.append(server)
    threads = [threading.Thread(target=server.start) for server in everyone]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(server.alive for server in everyone), _log_tails(everyone)

    series_dirs = []
    for k in range(SERIES):
        folder = tmp_path / "ct" / f"s{k:02d}"
        write_synthetic_ct(folder, SLICES, rows=96, columns=96, seed=100 + k)
        series_dirs.append(folder)
    half_a, half_b = _split(series_dirs, tmp_path / "send")
    env = dict(ingest[0]._env())
    sent: dict[str, str] = {}
    senders = [
        threading.Thread(target=_send, args=(half_a, ingest[0].address, env, sent)),
        threading.Thread(target=_send, args=(half_b, ingest[1].address, env, sent)),
    ]
    for thread in senders:
        thread.start()

    victim = workers[0]
    assert victim.process is not None
    victim_pid = victim.process.pid
    marker = f"/{victim_pid}/"
    inferring = select(func.count()).where(Job.state == "inferring", Job.lease_owner.contains(marker))
    held = select(func.count()).where(Job.lease_owner.contains(marker))
    deadline = time.monotonic() + 120
    while index.scalar(inferring) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert index.scalar(held) > 0, "the first worker never held a job\n" + _log_tails(everyone)
    victim.kill9()
    for thread in senders:
        thread.join()
    total = SERIES * SLICES
    assert all(f"{SLICES * SERIES // 2} sent, 0 failed" in out for out in sent.values()), sent

    exported = select(func.count()).where(Job.state == "exported")
    settled = select(func.count()).where(Job.state.in_(("exported", "failed", "skipped")))
    try:
        wait_until(lambda: index.scalar(settled) >= SERIES, timeout_s=300, what="every job settled")
    except Exception as exc:
        states = index.rows(select(Job.id, Job.state, Job.lease_owner))
        pytest.fail(f"{exc}: {states}\n{_log_tails(everyone)}")
    time.sleep(LEASE_S)  # a duplicate, had there been one, would show now

    # One revision and one job per series, all exported; every instance indexed once.
    assert index.scalar(select(func.count()).select_from(Instance)) == total
    revisions = Counter(uid for (uid,) in index.rows(select(SeriesRevision.series_instance_uid)))
    assert len(revisions) == SERIES and set(revisions.values()) == {1}, revisions
    jobs = Counter(uid for (uid,) in index.rows(select(Job.series_instance_uid)))
    assert len(jobs) == SERIES and set(jobs.values()) == {1}, jobs
    assert index.scalar(exported) == SERIES, index.rows(select(Job.id, Job.state, Job.detail))

    # Every lease recorded and closed; none overlapping; the killed worker's lease taken back by the other.
    claims = index.rows(select(JobClaim.job_id, JobClaim.owner, JobClaim.ended_at, JobClaim.outcome))
    assert claims and all(c.ended_at is not None for c in claims), claims
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "reader", min_free_bytes=0, database_url=postgres_url))
    try:
        assert overlapping_claims(store) == []
    finally:
        store.close()
    taken_back = [c for c in claims if marker in c.owner and c.outcome == "taken back"]
    assert taken_back, claims
    owners = {c.owner.split("/")[1] for c in claims}
    assert len(owners) == 2, owners  # both workers claimed jobs

    # Every output delivered exactly once; Orthanc holds exactly the outputs, each once.
    outputs = {uid for (uid,) in index.rows(select(Output.sop_instance_uid))}
    deliveries = index.rows(select(Delivery.sop_instance_uid, Delivery.state, Delivery.history))
    assert {d.sop_instance_uid for d in deliveries} == outputs and len(deliveries) == len(outputs)
    for delivery in deliveries:
        outcomes = [entry["outcome"] for entry in delivery.history]
        assert delivery.state == "delivered" and outcomes.count("delivered") == 1, delivery
    in_pacs = [i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.rest("GET", "/instances?expand")]
    assert len(in_pacs) == len(set(in_pacs)) == len(outputs) and set(in_pacs) == outputs

    # The processes, as an operator sees them.
    listed = {w["pid"]: w for w in ingest[0].api("/workers")}
    assert victim_pid in listed and listed[victim_pid]["alive"] is False, listed
    for server in [*ingest, workers[1]]:
        assert server.process is not None and listed[server.process.pid]["alive"] is True, listed
