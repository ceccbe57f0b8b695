"""Delivery claims shared by several export processes on one index: each claim names its process and expires, a
live process's claims are never taken, a gone one's are taken back and sent once; on SQLite and on a real
PostgreSQL server. Each export process is an :class:`ExportWorkers` with its own owner name, as ``gateway serve
--role export`` makes one per process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from pacs import EARLIER, deliveries, fast_export, job_of, make_job, outputs, sop_instance_uid, wait_for
from sqlalchemy import update

from gateway.config import ExportSettings
from gateway.export import queue
from gateway.export.destinations import Sender
from gateway.export.outcome import Item, Kind, Outcome, RetryPolicy
from gateway.export.workers import ExportWorkers, make_sender
from gateway.jobs.lifecycle import owner_identity
from gateway.jobs.states import JobState
from gateway.store.index import Delivery
from gateway.store.store import InstanceStore

from peers import MinimalSCP

POLICY = RetryPolicy(max_attempts=3, backoff_initial_s=10, backoff_max_s=100)
T0 = 1_000_000.0
HOST = owner_identity().split("/", 1)[0]
#: Processes of other hosts: their pids mean nothing here, only their leases count.
ALPHA, BETA = "alpha.test/101/aaaa0001", "beta.test/202/bbbb0002"


@pytest.fixture
def instance_store(index_store: InstanceStore) -> InstanceStore:
    """The store of these tests: its index on SQLite, then on a real PostgreSQL server."""
    return index_store


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[MinimalSCP]:
    with MinimalSCP(tmp_path / "pacs") as peer:
        yield peer


@pytest.fixture
def gone_pid() -> int:
    """The pid of a process of this host that has ended (a finished child, reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


@pytest.fixture
def live_child() -> Iterator[subprocess.Popen[bytes]]:
    """A process of this host that runs until the test kills it (another export process, as far as the index
    knows)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait(timeout=30)


class Witness:
    """The real sender of one export process, noting which process sent each delivery, under which claim token
    (each note is one C-STORE the destination answered)."""

    def __init__(self, sender: Sender, owner: str, sent: list[tuple[str, int, str]]) -> None:
        self._sender, self._owner, self._sent = sender, owner, sent

    def send(
        self, items: Sequence[Item], report: Callable[[Item, Outcome], None], stopping: Callable[[], bool]
    ) -> None:
        def noted(item: Item, outcome: Outcome) -> None:
            assert isinstance(item, queue.ClaimedItem)
            self._sent.append((self._owner, item.id, item.claim))
            report(item, outcome)

        self._sender.send(items, noted, stopping)

    def close(self) -> None:
        self._sender.close()


def to_scp(scp: MinimalSCP, **values: object) -> ExportSettings:
    return fast_export(destinations={"pacs": {"ae_title": "MINIMAL", "host": "127.0.0.1", "port": scp.port}}, **values)


def process(
    store: InstanceStore, settings: ExportSettings, owner: str, sent: list[tuple[str, int, str]]
) -> ExportWorkers:
    """One export process: its workers, named ``owner``, sending through a :class:`Witness`."""
    sender = Witness(make_sender(settings, "pacs"), owner, sent)
    return ExportWorkers(store, settings, senders={"pacs": sender}, owner=owner)


def received(scp: MinimalSCP) -> set[str]:
    return {path.stem for path in scp.outdir.glob("*.dcm")}


def owners(store: InstanceStore) -> dict[int, tuple[str, str | None]]:
    """Each delivery's state and claim owner, by id."""
    return {row.id: (row.state, row.claim_owner) for row in deliveries(store)}


def test_two_export_processes_deliver_each_instance_once(
    instance_store: InstanceStore, scp: MinimalSCP, tmp_path: Path
) -> None:
    files = outputs(tmp_path / "out", 30)
    job = make_job(instance_store)
    assert queue.enqueue(instance_store, job, files, ["pacs"]) == 30
    settings = to_scp(scp, workers=2, batch_size=3)
    sent: list[tuple[str, int, str]] = []
    first, second = process(instance_store, settings, ALPHA, sent), process(instance_store, settings, BETA, sent)
    first.start()
    second.start()
    try:
        wait_for(lambda: job_of(instance_store, job).state != JobState.ENCODED, what="the export of 30 deliveries")
    finally:
        first.stop()
        second.stop()
    assert job_of(instance_store, job).state == JobState.EXPORTED
    by_delivery = Counter(delivery for _, delivery, _ in sent)
    assert len(by_delivery) == 30 and set(by_delivery.values()) == {1}, "each delivery sent once, by one process"
    assert {owner for owner, _, _ in sent} <= {ALPHA, BETA}
    assert received(scp) == {sop_instance_uid(f) for f in files}
    for row in deliveries(instance_store, job):
        assert [h["outcome"] for h in row.history] == ["delivered"] and row.attempts == 1
        assert (row.claim, row.claim_owner, row.claim_expires_at) == (None, None, None)


def test_concurrent_claims_never_take_a_delivery_twice(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 40), ["pacs"], now=T0)
    claimed: dict[str, list[int]] = {ALPHA: [], BETA: [], EARLIER: []}
    start = threading.Barrier(len(claimed))

    def claim_all(owner: str) -> None:
        start.wait()
        while (batch := queue.claim(instance_store, ["pacs"], 3, owner=owner, lease_s=60.0, now=T0)) is not None:
            claimed[owner].extend(item.id for item in batch[1])

    threads = [threading.Thread(target=claim_all, args=(owner,)) for owner in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    ids = [delivery for batch in claimed.values() for delivery in batch]
    assert len(ids) == 40 and len(set(ids)) == 40, "every delivery claimed, none by two claims"
    found = owners(instance_store)
    for owner, batch in claimed.items():
        assert all(found[delivery] == ("sending", owner) for delivery in batch)
    rows = deliveries(instance_store, job)
    assert {row.claim_expires_at for row in rows} == {T0 + 60.0}
    assert len({row.claim for row in rows}) >= 40 // 3, "one token per claim"


def test_a_starting_process_takes_back_only_the_claims_of_gone_processes(
    instance_store: InstanceStore, tmp_path: Path, live_child: subprocess.Popen[bytes], gone_pid: int
) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 6), ["pacs"], now=T0)
    live_here, gone_here = f"{HOST}/{live_child.pid}/live0001", f"{HOST}/{gone_pid}/gone0001"
    leases = {live_here: 600.0, ALPHA: 600.0, gone_here: 600.0, BETA: 10.0, EARLIER: 600.0}
    held: dict[str, int] = {}
    for owner, lease_s in leases.items():
        (item,) = queue.claim(instance_store, ["pacs"], 1, owner=owner, lease_s=lease_s, now=T0)[1]  # type: ignore[index]
        held[owner] = item.id
    (older,) = queue.claim(instance_store, ["pacs"], 1, owner=ALPHA, lease_s=600.0, now=T0)[1]  # type: ignore[index]
    with instance_store.write_sessions.begin() as session:  # as a gateway older than claim leases left it
        session.execute(update(Delivery).where(Delivery.id == older.id).values(claim_owner=None, claim_expires_at=None))

    me = owner_identity()
    assert queue.resume(instance_store, ["pacs"], owner=me, now=T0 + 20) == (4, 0)
    found = owners(instance_store)
    assert found[held[live_here]] == ("sending", live_here), "a live process of this host keeps its claims"
    assert found[held[ALPHA]] == ("sending", ALPHA), "so does one of another host whose lease runs"
    for taken in (held[gone_here], held[BETA], held[EARLIER], older.id):
        assert found[taken] == ("pending", None)


def test_claims_of_gone_processes_are_taken_back_and_sent_once(
    instance_store: InstanceStore, scp: MinimalSCP, tmp_path: Path, live_child: subprocess.Popen[bytes]
) -> None:
    """A first process holds claims while a second starts; then the first dies: the second sends them, once."""
    files = outputs(tmp_path / "out", 4)
    job = make_job(instance_store)
    now = time.time()
    queue.enqueue(instance_store, job, files, ["pacs"], now=now - 1)
    first = f"{HOST}/{live_child.pid}/first001"
    queue.claim(instance_store, ["pacs"], 2, owner=first, lease_s=600.0, now=now)
    queue.claim(instance_store, ["pacs"], 2, owner="gamma.test/303/cccc0003", lease_s=600.0, now=now)
    sent: list[tuple[str, int, str]] = []
    settings = to_scp(scp, poll_s=3600.0, lease_s=0.3)  # only a wake sends what is taken back while it runs
    second = process(instance_store, settings, owner_identity(), sent)
    second.start()
    try:
        assert {state for state, _ in owners(instance_store).values()} == {"sending"}, "nothing taken at start"
        assert second.keep_leases() == 0 and not sent
        live_child.kill()  # the first process dies; the process of the other host too: its lease lapses
        live_child.wait(timeout=30)
        with instance_store.write_sessions.begin() as session:
            session.execute(
                update(Delivery).where(Delivery.claim_owner.like("gamma.test/%")).values(claim_expires_at=now)
            )
        wait_for(lambda: len(received(scp)) == 2, what="the expired claims taken back by the keeper and sent")
        assert {owner for owner, _, _ in sent} == {second.owner}
    finally:
        second.stop()
    restarted = process(instance_store, settings, owner_identity(), sent)
    restarted.start()  # this host's dead process's claims are taken back at once, not when their lease lapses
    try:
        wait_for(lambda: job_of(instance_store, job).state != JobState.ENCODED, what="the dead process's claims sent")
    finally:
        restarted.stop()
    assert job_of(instance_store, job).state == JobState.EXPORTED
    assert received(scp) == {sop_instance_uid(f) for f in files}
    assert sorted(Counter(delivery for _, delivery, _ in sent).values()) == [1, 1, 1, 1], "each sent once"
    assert all([h["outcome"] for h in row.history] == ["delivered"] for row in deliveries(instance_store, job))


def test_renew_extends_only_the_owners_claims(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 3), ["pacs"], now=T0)
    queue.claim(instance_store, ["pacs"], 2, owner=ALPHA, lease_s=60.0, now=T0)
    queue.claim(instance_store, ["pacs"], 1, owner=BETA, lease_s=60.0, now=T0)
    assert queue.renew_claims(instance_store, ALPHA, 60.0, now=T0 + 50) == 2
    assert queue.renew_claims(instance_store, "nobody.test/1/none0000", 60.0, now=T0 + 50) == 0
    leases = sorted((row.claim_owner or "", row.claim_expires_at) for row in deliveries(instance_store, job))
    assert leases == [(ALPHA, T0 + 110), (ALPHA, T0 + 110), (BETA, T0 + 60)]
    assert queue.reclaim_expired_claims(instance_store, now=T0 + 70) == 1, "only the claim not renewed lapsed"
    assert sorted(state for state, _ in owners(instance_store).values()) == ["pending", "sending", "sending"]


def test_reclaim_leaves_unexpired_claims_alone(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    (mine,) = queue.claim(instance_store, ["pacs"], 1, owner=ALPHA, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    (theirs,) = queue.claim(instance_store, ["pacs"], 1, owner=BETA, lease_s=5.0, now=T0)[1]  # type: ignore[index]
    assert queue.reclaim_expired_claims(instance_store, now=T0 + 5) == 0, "a lease that ends now still holds"
    assert queue.reclaim_expired_claims(instance_store, now=T0 + 6) == 1
    found = owners(instance_store)
    assert found[mine.id] == ("sending", ALPHA) and found[theirs.id] == ("pending", None)
    assert queue.reclaim_expired_claims(instance_store, now=T0 + 59) == 0


def test_an_outcome_is_recorded_only_under_its_own_claim(
    instance_store: InstanceStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process whose claim lapsed and was taken sends on, but its outcome is not written: the new claimer's is."""
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    stale, spare = queue.claim(instance_store, ["pacs"], 2, owner=ALPHA, lease_s=10.0, now=T0)[1]  # type: ignore[index]
    assert queue.reclaim_expired_claims(instance_store, now=T0 + 20) == 2
    fresh, other = queue.claim(instance_store, ["pacs"], 2, owner=BETA, lease_s=60.0, now=T0 + 20)[1]  # type: ignore[index]
    assert fresh.id == stale.id and fresh.claim != stale.claim
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.export.queue"):
        assert queue.record(instance_store, stale, Outcome(Kind.DELIVERED), POLICY, now=T0 + 21) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"export: delivery {stale.id} was claimed again meanwhile; this attempt's outcome is dropped"
    ]
    assert queue.release(instance_store, [spare.id], at=T0, claim=spare.claim, now=T0 + 21) == 0, "BETA's now"
    assert owners(instance_store) == {fresh.id: ("sending", BETA), other.id: ("sending", BETA)}
    assert queue.record(instance_store, fresh, Outcome(Kind.DELIVERED), POLICY, now=T0 + 22) == "delivered"
    assert queue.release(instance_store, [other.id], at=T0 + 30, claim=other.claim, now=T0 + 22) == 1
    delivered, released = deliveries(instance_store, job)
    assert [h["outcome"] for h in delivered.history] == ["delivered"] and delivered.attempts == 1
    assert (delivered.claim, delivered.claim_owner, delivered.claim_expires_at) == (None, None, None)
    assert (released.state, released.claim_owner, released.claim_expires_at) == ("pending", None, None)
    with pytest.raises(TypeError, match=r"item must be a delivery claimed by queue\.claim"):
        queue.record(instance_store, Item(fresh.id, job, fresh.path, "", "", ""), Outcome(Kind.DELIVERED), POLICY)


def test_the_keeper_renews_this_process_claims_and_takes_back_lapsed_ones(
    instance_store: InstanceStore, tmp_path: Path
) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    settings = fast_export(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 9}}, lease_s=30.0)
    workers = ExportWorkers(instance_store, settings, owner=ALPHA, clock=lambda: T0 + 25)
    assert workers.owner == ALPHA
    (mine,) = queue.claim(instance_store, ["pacs"], 1, owner=ALPHA, lease_s=30.0, now=T0)[1]  # type: ignore[index]
    (lapsed,) = queue.claim(instance_store, ["pacs"], 1, owner=BETA, lease_s=20.0, now=T0)[1]  # type: ignore[index]
    try:
        assert workers.keep_leases() == 1
    finally:
        workers.stop()
    rows = {row.id: row for row in deliveries(instance_store, job)}
    assert (rows[mine.id].state, rows[mine.id].claim_expires_at) == ("sending", T0 + 25 + 30)
    assert (rows[lapsed.id].state, rows[lapsed.id].claim_owner) == ("pending", None)


def test_an_export_process_is_named(instance_store: InstanceStore) -> None:
    settings = fast_export()
    host, pid, token = ExportWorkers(instance_store, settings).owner.split("/")
    assert (host, int(pid), len(token)) == (HOST, os.getpid(), 8)
    with pytest.raises(ValueError, match="owner must be 1 to 64 characters"):
        ExportWorkers(instance_store, settings, owner="")
    with pytest.raises(ValueError, match="owner must be 1 to 64 characters, got 65"):
        ExportWorkers(instance_store, settings, owner="h" * 65)
