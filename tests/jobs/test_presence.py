"""The workers table: a process announces itself, beats, stops; the list of the live ones (with the leases and
deliveries each holds) and of those gone a while; pruning; and the keeper thread, through an index fault."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from sqlalchemy import text, update

from gateway import __version__
from gateway.jobs import lifecycle
from gateway.jobs.presence import PresenceKeeper, announce, heartbeat, live_workers, prune, stopped
from gateway.store.index import Delivery, Worker
from gateway.store.store import InstanceStore

from job_rows import add_delivery, add_job


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def row(store: InstanceStore, owner: str) -> Worker | None:
    with store.sessions() as session:
        return session.get(Worker, owner)


def test_live_workers_lists_each_process_with_what_it_holds(index_store: InstanceStore) -> None:
    announce(index_store, "gpu-1/41/aa", roles=["worker"], device="cuda:0", models=["ct-lung"], now=100.0)
    announce(index_store, "web-1/7/bb", roles=["ingest", "export"], device=None, models=None, now=100.0)
    job_id = add_job(index_store)
    assert lifecycle.claim(index_store, "gpu-1/41/aa", 60.0, max_attempts=3, now=101.0) is not None
    sent = [add_delivery(index_store, job_id, state="sending") for _ in range(2)] + [add_delivery(index_store, job_id)]
    with index_store.write_sessions.begin() as session:
        session.execute(update(Delivery).where(Delivery.id.in_(sent)).values(claim_owner="web-1/7/bb"))
    assert heartbeat(index_store, "gpu-1/41/aa", now=110.0)
    views = live_workers(index_store, now=112.0, stale_after_s=15.0)
    assert [v.as_dict() for v in views] == [
        {
            "owner": "gpu-1/41/aa",
            "host": "gpu-1",
            "pid": 41,
            "roles": ["worker"],
            "device": "cuda:0",
            "models": ["ct-lung"],
            "version": __version__,
            "started_at": 100.0,
            "heartbeat_at": 110.0,
            "stopped_at": None,
            "last_heartbeat_s": 2.0,
            "leases": 1,
            "sending": 0,
            "alive": True,
        },
        {
            "owner": "web-1/7/bb",
            "host": "web-1",
            "pid": 7,
            "roles": ["ingest", "export"],
            "device": None,
            "models": None,
            "version": __version__,
            "started_at": 100.0,
            "heartbeat_at": 100.0,
            "stopped_at": None,
            "last_heartbeat_s": 12.0,
            "leases": 0,
            "sending": 2,  # the third delivery is pending: nobody sends it
            "alive": True,
        },
    ]


def test_a_stopped_or_silent_process_is_listed_gone_for_a_while_then_pruned(index_store: InstanceStore) -> None:
    for owner in ("h/1/crashed", "h/2/stopped", "h/3/alive"):
        announce(index_store, owner, roles=["worker"], device=None, models=None, now=100.0)
    assert stopped(index_store, "h/2/stopped", now=105.0)
    assert heartbeat(index_store, "h/3/alive", now=200.0)
    views = live_workers(index_store, now=201.0, stale_after_s=15.0)
    assert [(v.owner, v.alive) for v in views] == [("h/3/alive", True), ("h/1/crashed", False), ("h/2/stopped", False)]
    assert [v.owner for v in live_workers(index_store, now=201.0, stale_after_s=15.0, keep_gone_s=97.0)] == [
        "h/3/alive",
        "h/2/stopped",
    ], "the crashed one was last heard from at 100, the stopped one at 105"
    assert prune(index_store, 97.0, now=201.0) == 1
    assert row(index_store, "h/1/crashed") is None and row(index_store, "h/2/stopped") is not None
    assert not heartbeat(index_store, "h/1/crashed", now=202.0), "a pruned process must announce itself again"


def test_announcing_again_starts_the_process_anew(index_store: InstanceStore) -> None:
    announce(index_store, "h/1/a", roles=["worker"], device="cpu", models=None, now=100.0)
    stopped(index_store, "h/1/a", now=150.0)
    announce(index_store, "h/1/a", roles=["worker", "export"], device="cuda:1", models=["m"], now=200.0)
    found = row(index_store, "h/1/a")
    assert found is not None
    assert (found.roles, found.device, found.models, found.started_at, found.stopped_at) == (
        "worker,export",
        "cuda:1",
        ["m"],
        200.0,
        None,
    )
    with pytest.raises(ValueError, match="owner"):
        announce(index_store, "", roles=["worker"], device=None, models=None)


def test_the_keeper_announces_beats_and_stops(index_store: InstanceStore) -> None:
    owner = lifecycle.owner_identity()
    keeper = PresenceKeeper(index_store, owner, roles=["ingest", "worker"], device="cpu", heartbeat_s=0.05)
    keeper.start()
    try:
        first = row(index_store, owner)
        assert first is not None and first.roles == "ingest,worker" and first.stopped_at is None
        wait_for(lambda: (r := row(index_store, owner)) is not None and r.heartbeat_at > first.heartbeat_at)
        with index_store.write_sessions.begin() as session:  # as a prune by another process would
            session.delete(session.get(Worker, owner))
        wait_for(lambda: row(index_store, owner) is not None)
        assert keeper.problems() == []
        assert [v.owner for v in live_workers(index_store, stale_after_s=30.0)] == [owner]
    finally:
        keeper.stop()
    found = row(index_store, owner)
    assert found is not None and found.stopped_at is not None
    assert [v.alive for v in live_workers(index_store, stale_after_s=30.0)] == [False]
    assert keeper.problems() == [], "a stopped keeper has nothing to report"


def test_the_keeper_logs_a_failed_heartbeat_says_so_and_recovers(
    instance_store: InstanceStore, caplog: pytest.LogCaptureFixture
) -> None:
    owner = lifecycle.owner_identity()
    keeper = PresenceKeeper(instance_store, owner, roles=["worker"], heartbeat_s=0.05)
    keeper.start()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.jobs.presence"):
            with instance_store.write_sessions.begin() as session:  # the table is gone for a while: a real fault
                session.execute(text("ALTER TABLE workers RENAME TO workers_away"))
            wait_for(lambda: keeper.problems() != [])
            assert keeper.problems()[0].startswith("the presence heartbeat has not reached the index for")
            with instance_store.write_sessions.begin() as session:
                session.execute(text("ALTER TABLE workers_away RENAME TO workers"))
            wait_for(lambda: keeper.problems() == [])
        failures = [r.getMessage() for r in caplog.records if "presence heartbeat failed" in r.getMessage()]
        assert failures and all("\n" not in message for message in failures)
        assert [v.alive for v in live_workers(instance_store, stale_after_s=1.0)] == [True]
    finally:
        keeper.stop()


def test_a_keeper_needs_a_positive_heartbeat(instance_store: InstanceStore) -> None:
    with pytest.raises(ValueError, match="heartbeat_s"):
        PresenceKeeper(instance_store, "h/1/a", roles=["worker"], heartbeat_s=0)
