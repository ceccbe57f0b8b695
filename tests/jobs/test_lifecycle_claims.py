"""The record of job leases (``job_claims``): each claim opens a row, each end of the lease closes it with when and
how, and :func:`gateway.jobs.lifecycle.overlapping_claims` finds leases of one job that overlap.

On both engines (the ``index_store`` fixture: SQLite and a real PostgreSQL server).
"""

from __future__ import annotations

import subprocess
import sys
import threading

from gateway.jobs import lifecycle
from gateway.jobs.lifecycle import HANDED_BACK, TAKEN_BACK, Claim
from gateway.jobs.states import JobState
from gateway.store.index import JobClaim
from gateway.store.store import InstanceStore

from job_rows import add_job


def ends(store: InstanceStore, job_id: int) -> list[tuple[str, float, float | None, str | None]]:
    """(owner, claimed_at, ended_at, outcome) of each lease of the job, oldest first."""
    return [(c.owner, c.claimed_at, c.ended_at, c.outcome) for c in lifecycle.claims_of(store, job_id)]


def test_a_lease_is_recorded_from_its_claim_to_the_state_its_job_reached(index_store: InstanceStore) -> None:
    job_id = add_job(index_store)
    lease = lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3, now=100.0)
    assert lease is not None
    assert ends(index_store, job_id) == [("host/1/a", 100.0, None, None)]
    lifecycle.move(index_store, lease, JobState.ASSEMBLING, JobState.ASSEMBLED, lease_s=60.0, now=101.0)
    lifecycle.move(index_store, lease, JobState.ASSEMBLED, JobState.INFERRING, lease_s=60.0, now=102.0)
    assert ends(index_store, job_id) == [("host/1/a", 100.0, None, None)], "a move between leased states keeps it"
    lifecycle.move(index_store, lease, JobState.INFERRING, JobState.SKIPPED, now=105.0)
    assert ends(index_store, job_id) == [("host/1/a", 100.0, 105.0, "skipped")]
    assert lifecycle.overlapping_claims(index_store) == []


def test_a_hand_back_and_a_failure_close_the_lease_with_how_it_ended(index_store: InstanceStore) -> None:
    job_id = add_job(index_store)
    assert lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3, now=100.0) is not None
    assert lifecycle.hand_back(index_store, "host/1/a", reason="stop", now=110.0) == [job_id]
    lease = lifecycle.claim(index_store, "host/2/b", 60.0, max_attempts=3, now=120.0)
    assert lease is not None
    assert lifecycle.fail(index_store, lease, "infer", "boom", now=130.0)
    assert ends(index_store, job_id) == [
        ("host/1/a", 100.0, 110.0, HANDED_BACK),
        ("host/2/b", 120.0, 130.0, "failed"),
    ]
    assert not lifecycle.fail(index_store, lease, "infer", "again", now=140.0), "no lease: nothing more is closed"
    assert ends(index_store, job_id)[-1] == ("host/2/b", 120.0, 130.0, "failed")


def test_a_lease_taken_back_ends_when_it_expired_not_when_it_was_taken(index_store: InstanceStore) -> None:
    job_id = add_job(index_store)
    assert lifecycle.claim(index_store, "host/1/a", 5.0, max_attempts=3, now=100.0) is not None
    assert lifecycle.renew(index_store, "host/1/a", 5.0, now=103.0) == 1  # expires at 108
    assert lifecycle.reclaim_expired(index_store, now=150.0) == [job_id]
    assert lifecycle.claim(index_store, "host/2/b", 5.0, max_attempts=3, now=151.0) is not None
    assert ends(index_store, job_id) == [("host/1/a", 100.0, 108.0, TAKEN_BACK), ("host/2/b", 151.0, None, None)]
    assert lifecycle.overlapping_claims(index_store) == []


def test_a_lease_of_a_gone_process_ends_when_it_was_taken_back(index_store: InstanceStore) -> None:
    job_id = add_job(index_store)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    me = lifecycle.owner_identity()
    gone = f"{me.split('/')[0]}/{int(child.stdout)}/dead"
    assert lifecycle.claim(index_store, gone, 3600.0, max_attempts=3, now=100.0) is not None
    assert lifecycle.reclaim_orphans(index_store, me, now=200.0) == [job_id]
    assert ends(index_store, job_id) == [(gone, 100.0, 200.0, TAKEN_BACK)], "the lease ran to 3700: taken at 200"


def test_a_job_out_of_attempts_fails_without_a_new_lease(index_store: InstanceStore) -> None:
    job_id = add_job(index_store)
    for attempt in range(2):
        assert lifecycle.claim(index_store, f"host/{attempt}/x", 1.0, max_attempts=2, now=100.0 * attempt) is not None
        lifecycle.reclaim_expired(index_store, now=100.0 * attempt + 50)
    assert lifecycle.claim(index_store, "host/9/x", 1.0, max_attempts=2, now=1000.0) is None
    assert ends(index_store, job_id) == [
        ("host/0/x", 0.0, 1.0, TAKEN_BACK),
        ("host/1/x", 100.0, 101.0, TAKEN_BACK),
    ]


def test_workers_that_claim_and_hand_back_in_a_race_never_hold_one_job_at_once(index_store: InstanceStore) -> None:
    jobs = [add_job(index_store) for _ in range(3)]
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            for _ in range(15):
                lease = lifecycle.claim(index_store, name, 60.0, max_attempts=1000)
                if lease is not None:
                    lifecycle.move(index_store, lease, JobState.ASSEMBLING, JobState.ASSEMBLED, lease_s=60.0)
                    lifecycle.hand_back(index_store, name, job_ids=[lease.job_id], reason="race")
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"host/{k}/w",)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    claims = [c for job_id in jobs for c in lifecycle.claims_of(index_store, job_id)]
    assert len(claims) > len(jobs), "each job was leased more than once"
    assert all(c.outcome == HANDED_BACK and c.ended_at is not None for c in claims)
    assert lifecycle.overlapping_claims(index_store) == []


def test_overlapping_claims_finds_leases_of_one_job_that_overlap(index_store: InstanceStore) -> None:
    first, second = add_job(index_store), add_job(index_store)
    rows = [
        (first, 0.0, 10.0),  # 1
        (first, 5.0, 15.0),  # 2: overlaps 1
        (first, 15.0, 20.0),  # 3: touches 2 (starts as it ends): no overlap
        (first, 30.0, None),  # 4: open
        (first, 1000.0, 1001.0),  # 5: within the open one
        (second, 5.0, 12.0),  # 6: another job, at the same time as 1 and 2
    ]
    with index_store.write_sessions.begin() as session:
        for job_id, start, end in rows:
            session.add(JobClaim(job_id=job_id, owner="host/1/a", claimed_at=start, ended_at=end, outcome=None))
    ids = [c.id for c in lifecycle.claims_of(index_store, first)] + [
        c.id for c in lifecycle.claims_of(index_store, second)
    ]
    assert lifecycle.overlapping_claims(index_store) == [(first, ids[0], ids[1]), (first, ids[3], ids[4])]
    assert lifecycle.claims_of(index_store, second) == [Claim(ids[5], second, "host/1/a", 5.0, 12.0, None)]
