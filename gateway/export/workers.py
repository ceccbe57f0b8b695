"""The export workers: threads that claim due deliveries, send them and record every attempt, until stopped."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping

from gateway.config import DimseDestination, ExportSettings
from gateway.export import queue
from gateway.export.destinations import Sender
from gateway.export.dimse import DimseSender
from gateway.export.outcome import Item, Kind, Outcome, RetryPolicy
from gateway.export.stow import StowSender
from gateway.store.store import StoreIndex

__all__ = ["ExportWorkers", "make_sender"]

log = logging.getLogger(__name__)


def make_sender(settings: ExportSettings, name: str) -> Sender:
    """The sender for destination ``name`` of ``settings`` (C-STORE or STOW-RS).

    Raises
    ------
    KeyError
        If ``name`` is not a configured destination.
    """
    destination = settings.destinations[name]
    if isinstance(destination, DimseDestination):
        return DimseSender(destination, calling_ae_title=settings.calling_ae_title, timeout_s=settings.timeout_s)
    return StowSender(destination, timeout_s=settings.timeout_s)


class ExportWorkers:
    """Threads that drive the export queue (:mod:`gateway.export.queue`).

    Parameters
    ----------
    store
        The instance store (the queue lives in its index; relative paths are under its data folder).
    settings
        The ``export`` settings: destinations, retry policy, number of workers, poll interval, batch size.
    senders
        A sender per destination name; made from ``settings`` when omitted.
    clock
        Seconds since the epoch (tests may pass their own).
    """

    def __init__(
        self,
        store: StoreIndex,
        settings: ExportSettings,
        *,
        senders: Mapping[str, Sender] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._settings = settings
        self._policy = RetryPolicy.from_settings(settings)
        self._senders = (
            dict(senders) if senders is not None else {n: make_sender(settings, n) for n in settings.destinations}
        )
        self._clock = clock
        self._rng = random.SystemRandom()  # jitter only; SystemRandom needs no seeding
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"export-{k}", daemon=True) for k in range(settings.workers)
        ]

    def start(self) -> None:
        """Resume what a previous run left ``sending``, then start the threads."""
        resumed, orphaned = queue.resume(self._store, list(self._senders), now=self._clock())
        if resumed or orphaned:
            log.warning(
                "export: %d interrupted deliveries resumed, %d to unconfigured destinations dead", resumed, orphaned
            )
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop after the file being sent; what was claimed and not sent goes back to the queue."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=self._settings.timeout_s + 10)
        for sender in self._senders.values():
            sender.close()

    def problems(self) -> list[str]:
        """What keeps the export from working, for ``/healthz`` (empty when all is well, or when stopped)."""
        started = [thread for thread in self._threads if thread.ident is not None]
        dead = sum(not thread.is_alive() for thread in started)
        if self._stop.is_set() or not dead:
            return []
        return [f"{dead} of {len(self._threads)} export workers stopped"]

    def run_once(self) -> bool:
        """Claim one batch for one destination and send it; whether there was one (the threads loop on this)."""
        claimed = queue.claim(self._store, list(self._senders), self._settings.batch_size, now=self._clock())
        if claimed is None:
            return False
        name, items = claimed
        self._deliver(name, items)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # the index is unavailable for a moment: never the end of the worker
                log.exception("export: claiming or recording deliveries failed; retrying")
                busy = False
            if not busy:
                self._stop.wait(self._settings.poll_s)

    def _deliver(self, name: str, items: list[Item]) -> None:
        reported: set[int] = set()
        started, jitter = self._clock(), self._rng.random()  # what failed together is due again together

        def report(item: Item, outcome: Outcome) -> None:
            reported.add(item.id)
            now = self._clock()
            state = queue.record(self._store, item, outcome, self._policy, jitter=jitter, now=now, retry_from=started)
            log.info("export to %s: delivery %d %s (%s)", name, item.id, state, _status(outcome))

        try:
            self._senders[name].send(items, report, self._stop.is_set)
        except Exception as exc:  # a sender bug fails the attempt, never the worker
            log.exception("export to %s failed", name)
            outcome = Outcome(Kind.RETRY, f"internal error while sending: {type(exc).__name__}")
            for item in items:
                if item.id not in reported:
                    report(item, outcome)
        self._release([item.id for item in items if item.id not in reported])
        for job_id in sorted({item.job_id for item in items}):
            queue.settle(self._store, job_id, now=self._clock())

    def _release(self, ids: list[int]) -> None:
        """Claimed but not attempted: due now when stopping, else after the first backoff (the peer misbehaved)."""
        now = self._clock()
        at = now if self._stop.is_set() else now + self._policy.backoff_initial_s
        queue.release(self._store, ids, at=at, now=now)


def _status(outcome: Outcome) -> str:
    """The outcome for the log: its kind and status code only (a peer's free-text comment stays in the index)."""
    return outcome.kind.value + (f", status 0x{outcome.status:04X}" if outcome.status is not None else "")
