"""The job runner: a supervised pool of workers taking jobs from ``received`` to ``encoded`` under leases.

Each worker claims a job (:func:`gateway.jobs.lifecycle.claim`), runs the stages in memory (assemble, infer,
encode: each a function that takes the job and returns an outcome) and writes each outcome with a conditional move.
The runner alone writes states. Around them:

- a **heartbeat** renews this process's leases, and takes back jobs whose lease expired (their worker is gone);
- a **supervisor** catches every exception of a job, database errors included: the job fails with a one-line
  reason (an index error hands it back instead: it is not the job's fault), and a worker thread that died anyway
  is replaced, so the pool keeps its size;
- a **memory budget** admits a job only when its estimated share (from its series' size) fits beside the jobs
  running, so that series arriving together cannot exhaust the machine; a job larger than the budget runs alone;
- **stop** (SIGTERM) claims nothing more, lets running stages finish within the grace period, and hands the rest
  back to ``received`` (never ``failed``), refunding their attempt.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from gateway.assemble.assemble import AssemblyResult
from gateway.config import JobsSettings
from gateway.errors import LeaseLost, OutOfResources
from gateway.export.queue import enqueue
from gateway.infer.results import ModelResult
from gateway.jobs import lifecycle
from gateway.jobs.assembly import assemble_job, of_job_series
from gateway.jobs.encoding import Encoded
from gateway.jobs.inference import Inferred
from gateway.jobs.lifecycle import Lease
from gateway.jobs.placement import Placement
from gateway.jobs.states import JobState
from gateway.metrics import GatewayMetrics
from gateway.process import release_memory
from gateway.store.index import Instance, Job
from gateway.store.store import InstanceStore

__all__ = ["JobRunner", "MemoryBudget", "Pipeline", "estimate_job_bytes"]

log = logging.getLogger(__name__)

#: Bytes a job takes per source voxel while assembled and inferred: the volume (float32), its resampled copy, the
#: model input and output, probabilities and masks. Measured (bench/memory.py): each concurrent 140-slice 512x512 CT
#: job adds about 1.5 GiB to the peak.
BYTES_PER_VOXEL = 44
_SPACE_RETRY_S = 60.0  # a job handed back for want of disk space waits this long before it is claimed again
_INDEX_RETRY_S = 10.0  # ... and one whose index write failed (database locked or unreachable)
_DOING = {"assemble": "assembly", "infer": "inference", "encode": "encoding"}


@dataclass(frozen=True)
class Pipeline:
    """The stages after assembly (:func:`~gateway.jobs.assembly.assemble_job`), run in the same worker:
    :class:`~gateway.jobs.inference.InferenceStage` and :class:`~gateway.jobs.encoding.EncodeStage`."""

    infer: Callable[[int, AssemblyResult], Inferred]
    encode: Callable[[int, Sequence[ModelResult]], Encoded]


def estimate_job_bytes(store: InstanceStore, job_id: int) -> int:
    """Memory a job is expected to take: its series' voxels (every revision up to its own) x :data:`BYTES_PER_VOXEL`."""
    voxels = func.sum(Instance.rows * Instance.columns * func.coalesce(Instance.number_of_frames, 1))
    with store.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            return 0
        total = session.scalar(of_job_series(select(voxels), session, job))
    return int(total or 0) * BYTES_PER_VOXEL


def default_memory_budget() -> int:
    """Half of the machine's physical memory."""
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)


class MemoryBudget:
    """Bytes that running jobs may take together; :meth:`acquire` waits until a share fits (or nothing runs)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._used = 0
        self._running = 0
        self._changed = threading.Condition()

    def acquire(self, share: int, stop: threading.Event, timeout_s: float) -> bool:
        """Take ``share`` once it fits beside the running jobs (or alone); ``False`` if stopped or timed out."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._running and self._used + share > self.total:
                left = deadline - time.monotonic()
                if stop.is_set() or left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
            self._used += share
            self._running += 1
            return True

    def release(self, share: int) -> None:
        """Give back a share taken by :meth:`acquire`."""
        with self._changed:
            self._used -= share
            self._running -= 1
            self._changed.notify_all()

    @property
    def used(self) -> int:
        """Bytes taken by running jobs."""
        return self._used


class _Wakeups:
    """Wake-ups of a pool's idle threads, one at a time: the thread woken claims (perhaps a group of jobs, handed to
    as many idle threads as it wakes) and wakes the next if more jobs are ready. Waking them all at once would have
    each claim one job before any could claim a group. A wake-up with no thread waiting is kept (up to the pool's
    size) for the next thread that waits."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._pending = 0
        self._stopping = False
        self._cond = threading.Condition()

    def one(self) -> None:
        with self._cond:
            self._pending = min(self._most, self._pending + 1)
            self._cond.notify()

    def everyone(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def wait(self, timeout_s: float) -> None:
        """Until a wake-up (taken) or ``timeout_s``."""
        with self._cond:
            if not (self._pending or self._stopping):
                self._cond.wait(timeout_s)
            if self._pending:
                self._pending -= 1


class JobRunner:
    """A supervised pool of workers driving jobs from ``received`` to ``encoded`` (see the module docstring).

    Parameters
    ----------
    store
        The instance store (the job index, the series' files, the free-space watermark).
    settings
        Worker count, polling, lease, grace period, attempts and memory budget.
    pipeline
        The inference and encode stages.
    metrics
        Where each stage's seconds are observed once the stage's outcome is written.
    on_encoded
        Called when a job's deliveries are queued (the export workers' ``wake``): the export starts at once.
    owner
        The process's lease owner name (:func:`gateway.jobs.lifecycle.owner_identity`; made when omitted).
    placement
        Which jobs this pool takes (:class:`~gateway.jobs.placement.Placement`); every job when omitted.
    """

    def __init__(
        self,
        store: InstanceStore,
        settings: JobsSettings,
        pipeline: Pipeline,
        *,
        metrics: GatewayMetrics | None = None,
        on_encoded: Callable[[], None] | None = None,
        owner: str | None = None,
        placement: Placement | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._pipeline = pipeline
        self._metrics = metrics
        self._on_encoded = on_encoded
        #: The name this pool's leases carry: its process's (``host/pid/token``).
        self.owner = owner or lifecycle.owner_identity()
        self._placement = placement
        self.budget = MemoryBudget(settings.memory_budget_bytes or default_memory_budget())
        self._stop = threading.Event()
        self._wakeups = _Wakeups(max(1, settings.workers))
        #: Jobs claimed together with another (a model's batch worth), waiting for an idle thread of this pool.
        self._handoff: queue.SimpleQueue[Lease] = queue.SimpleQueue()
        self._idle = 0  # threads waiting for work, to size a group claim
        self._idle_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._keeper: threading.Thread | None = None

    # -- lifecycle of the pool -------------------------------------------------------------------------------

    def start(self) -> None:
        """Take back jobs left by a gone process, then start the workers and the heartbeat/supervisor thread."""
        if self._settings.workers == 0:
            return
        taken = lifecycle.reclaim_orphans(self._store, self.owner)
        if taken:
            log.warning("%d job(s) interrupted by a stop or crash go round again", len(taken))
        self._workers = [self._spawn(k) for k in range(self._settings.workers)]
        self._keeper = threading.Thread(target=self._keep, name="jobs-heartbeat", daemon=True)
        self._keeper.start()

    def wake(self) -> None:
        """A job may be waiting (a series just completed): an idle worker looks now instead of at the next poll (and,
        having claimed, wakes the next one if more jobs are ready)."""
        self._wakeups.one()

    def stop(self) -> None:
        """Claim nothing more; running stages get the grace period; hand back what is still held."""
        if self._keeper is None:
            return  # never started (a process without the worker role, or jobs.workers = 0): nothing is held
        self._stop.set()
        self._wakeups.everyone()
        deadline = time.monotonic() + self._settings.shutdown_grace_s
        for thread in self._workers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._keeper is not None:
            self._keeper.join(timeout=5)
        try:
            held = lifecycle.hand_back(self._store, self.owner, reason="the gateway stopped before the job finished")
        except DBAPIError:
            log.exception("handing jobs back at stop failed; their leases expire and another start takes them")
            return
        if held:
            log.warning("stopped with %d job(s) running: back to received, they run again at the next start", len(held))

    def problems(self) -> list[str]:
        """What keeps the pool from working, for ``/healthz`` (empty when all is well, or when it is not started)."""
        if not self._workers or self._stop.is_set():
            return []
        found = []
        dead = sum(not thread.is_alive() for thread in self._workers)
        if dead:
            found.append(f"{dead} of {len(self._workers)} job workers stopped")
        if self._keeper is not None and not self._keeper.is_alive():
            found.append("the job lease heartbeat stopped")
        return found

    def _spawn(self, index: int) -> threading.Thread:
        thread = threading.Thread(target=self._work, name=f"job-worker-{index}", daemon=True)
        thread.start()
        return thread

    def _keep(self) -> None:
        """Heartbeat and supervision, every third of a lease."""
        period = max(0.05, self._settings.lease_s / 3)
        while not self._stop.wait(period):
            try:
                lifecycle.renew(self._store, self.owner, self._settings.lease_s)
                if lifecycle.reclaim_expired(self._store):
                    self.wake()
            except Exception:
                log.exception("renewing job leases failed; trying again in %.0f s", period)
            self._replace_dead_workers()

    def _replace_dead_workers(self) -> None:
        for index, thread in enumerate(self._workers):
            if not thread.is_alive() and not self._stop.is_set():
                log.error("job worker %d had stopped; started a new one", index)
                self._workers[index] = self._spawn(index)

    # -- one worker --------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_handed() or self.run_once()
            except Exception:  # claiming failed (index unreachable): never let the thread die for it
                log.exception("claiming a job failed; retrying")
                worked = False
            if not worked:
                with self._idle_lock:
                    self._idle += 1
                try:
                    self._wakeups.wait(self._settings.poll_s)
                finally:
                    with self._idle_lock:
                        self._idle -= 1

    def run_once(self) -> bool:
        """Claim one job and take it as far as it goes; whether there was one (the workers loop on this).

        With idle threads in the pool, the claim takes at once up to a forward pass's worth of the next ready jobs
        the same models apply to (:meth:`_claim_group`); the idle threads run those (:meth:`run_handed`).
        """
        try:
            self._store.check_space()
        except OutOfResources:
            return False  # outputs could not be written: jobs stay received until space is back (retention purges)
        placement = self._placement
        candidate = lifecycle.next_claimable(self._store, skip=placement.passed_over() if placement else ())
        if candidate is None:
            return False
        if placement is not None and not placement.takes(candidate):
            return True  # left to a worker that runs its models: look at the next one at once
        share = estimate_job_bytes(self._store, candidate)
        if not self.budget.acquire(share, self._stop, timeout_s=self._settings.poll_s):
            return False
        try:
            lease = self._claim_group(candidate)
            if lease is None:
                return True  # another worker took it first (or it ran out of attempts): look again at once
            self._supervised(lease)
            return True
        finally:
            self.budget.release(share)
            release_memory()

    def run_handed(self) -> bool:
        """Run a job claimed with another by this pool (:meth:`_claim_group`), if one waits; whether there was one."""
        try:
            lease = self._handoff.get_nowait()
        except queue.Empty:
            return False
        if self._stop.is_set():
            return False  # stop() hands every held job back
        share = estimate_job_bytes(self._store, lease.job_id)
        while not self.budget.acquire(share, self._stop, timeout_s=self._settings.poll_s):
            if self._stop.is_set():
                return False
        try:
            self._supervised(lease)
            return True
        finally:
            self.budget.release(share)
            release_memory()

    def _claim_group(self, candidate: int) -> Lease | None:
        """Claim ``candidate`` and, while threads of this pool are idle, the next ready jobs its models apply to,
        up to the largest ``inference.batch_size`` of those models, in one transaction; this thread's lease."""
        placement = self._placement
        idle = self._idle
        companions: list[int] = []
        if placement is not None and idle > 0:
            models = placement.models_of(candidate)
            want = min(idle, placement.batch_of(models) - 1) if models else 0
            if want > 0:
                ready = lifecycle.claimable_ids(self._store, skip={candidate, *placement.passed_over()}, limit=4 * want)
                companions = [j for j in ready if placement.takes(j) and placement.models_of(j) == models][:want]
        leases = lifecycle.claim_many(
            self._store,
            self.owner,
            self._settings.lease_s,
            [candidate, *companions],
            max_attempts=self._settings.max_attempts,
        )
        mine = next((lease for lease in leases if lease.job_id == candidate), None)
        others = [lease for lease in leases if lease is not mine]
        for lease in others:
            self._handoff.put(lease)
        if others:
            log.info("job %d claimed with %d more for the same models", candidate, len(others))
        for _ in others:
            self._wakeups.one()  # an idle thread for each job handed over
        if leases and lifecycle.next_claimable(self._store) is not None:
            self._wakeups.one()  # more jobs are ready: the next idle thread claims (and wakes on) in turn
        if mine is None and others:  # the candidate was taken meanwhile: run the first of the others here
            return self._handoff.get_nowait()
        return mine

    def _supervised(self, lease: Lease) -> None:
        stage = ["assemble"]
        try:
            self._run(lease, stage)
        except LeaseLost as exc:
            log.info("job %d dropped by this worker: %s", lease.job_id, exc)
        except OutOfResources as exc:
            self._hand_back(lease, _SPACE_RETRY_S, f"no disk space for its outputs: {exc.reason}")
        except DBAPIError as exc:
            log.exception("job %d: index write failed at %s", lease.job_id, stage[0])
            self._hand_back(lease, _INDEX_RETRY_S, f"index error at {stage[0]}: {type(exc.orig).__name__}", False)
        except Exception as exc:
            log.exception("job %d failed at %s", lease.job_id, stage[0])
            self._fail(lease, stage[0], f"{_DOING[stage[0]]} failed: {type(exc).__name__}: {exc}")
        except BaseException as exc:  # the thread dies (the supervisor starts another): the job must not stay held
            self._fail(lease, stage[0], f"{_DOING[stage[0]]} ended its worker: {type(exc).__name__}")
            raise

    def _hand_back(self, lease: Lease, delay_s: float, reason: str, refund: bool = True) -> None:
        try:
            lifecycle.hand_back(
                self._store,
                lease.owner,
                job_ids=[lease.job_id],
                not_before=time.time() + delay_s,
                refund=refund,
                reason=reason,
            )
        except Exception:
            log.exception("job %d could not be handed back; its lease expires and it is taken back", lease.job_id)

    def _fail(self, lease: Lease, stage: str, reason: str) -> None:
        try:
            lifecycle.fail(self._store, lease, stage, reason)
        except Exception:
            log.exception("job %d could not be marked failed; its lease expires and it runs again", lease.job_id)

    def _run(self, lease: Lease, stage: list[str]) -> None:
        """Assemble, infer, encode and queue one claimed job; each outcome is written by a conditional move."""
        lease_s = self._settings.lease_s
        assembled = assemble_job(self._store, lease.job_id)
        state = JobState.FAILED if assembled.failure else JobState.ASSEMBLED
        failure = {"stage": "assemble", "reason": assembled.failure} if assembled.failure else None
        lifecycle.move(
            self._store,
            lease,
            JobState.ASSEMBLING,
            state,
            lease_s=lease_s,
            timing=("assemble_s", assembled.seconds),
            assembly=assembled.summary,
            failure=failure,
        )
        self._observe("assemble", assembled.seconds)
        if assembled.result is None or state is JobState.FAILED or self._stopping():
            return
        stage[0] = "infer"
        lifecycle.move(self._store, lease, JobState.ASSEMBLED, JobState.INFERRING, lease_s=lease_s)
        inferred = self._pipeline.infer(lease.job_id, assembled.result)
        lifecycle.move(
            self._store,
            lease,
            JobState.INFERRING,
            inferred.state,
            lease_s=lease_s,
            timing=("infer_s", inferred.seconds),
            **inferred.entries(),
        )
        self._observe_inference(inferred)
        if inferred.state is not JobState.INFERRED or self._stopping():
            return
        stage[0] = "encode"
        self._store.check_space()  # below the watermark: handed back, to run once retention has freed space
        lifecycle.move(self._store, lease, JobState.INFERRED, JobState.ENCODING, lease_s=lease_s)
        encoded = self._pipeline.encode(lease.job_id, inferred.outcome.results)
        lifecycle.note(
            self._store,
            lease,
            JobState.ENCODING,
            timing=("encode_s", encoded.seconds),
            outputs=encoded.outputs,
            encode_timings=encoded.parts,
        )
        enqueue(
            self._store, lease.job_id, encoded.paths, encoded.destinations, owner=lease.owner, metrics=self._metrics
        )
        if self._on_encoded is not None:
            self._on_encoded()
        self._observe("encode", encoded.seconds)

    def _observe(self, stage: str, seconds: float, model: str = "") -> None:
        if self._metrics is not None:
            self._metrics.job_stage(stage, model, seconds)

    def _observe_inference(self, inferred: Inferred) -> None:
        """The inference stage as a whole (``model=""``) and each model's run on each volume."""
        self._observe("infer", inferred.seconds)
        for result in inferred.outcome.results:
            self._observe("infer", sum(result.timings.values()), result.ref)

    def _stopping(self) -> bool:
        """Stopping: the job goes back at the stage boundary rather than starting a stage it may not finish."""
        return self._stop.is_set()
