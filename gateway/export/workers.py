"""The export workers: threads that claim due deliveries, send them and record every attempt, until stopped; and a
checker that watches whether each destination answers, resending what an outage killed once it does.

The checker (:mod:`gateway.export.checks`) checks every destination once at start (so that the UI shows each
one's reachability), then every ``export.check_interval_s`` the destinations that have deliveries given up after
retrying; when one answers, those deliveries go back in the queue and their jobs back to ``encoded``
(:func:`gateway.export.queue.revive_destination`). Results held for an unmapped caller that now has a
destination are queued at start (:func:`gateway.export.queue.release_held`).

Several export processes may share one index: each claims under its own name (:attr:`ExportWorkers.owner`) and a
lease of ``export.lease_s``. A keeper thread renews this process's leases every ``lease_s / 3`` and takes back the
claims of any process whose lease expired (:func:`gateway.export.queue.reclaim_expired_claims`), waking the
workers when it took some.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sqlalchemy import select

from gateway.audit.trail import AuditTrail, StudyTally
from gateway.config import DimseDestination, ExportSettings
from gateway.errors import NotFound
from gateway.export import queue
from gateway.export.checks import DestinationCheck, check_destination
from gateway.export.deidentify import CheckedOutcome, Deidentifier, DeidentifyingSender, note_phi_check, pseudonym_seed
from gateway.export.destinations import Sender
from gateway.export.dimse import DimseSender
from gateway.export.outcome import Item, Kind, Outcome, RetryPolicy
from gateway.export.stow import StowSender
from gateway.jobs.lifecycle import owner_identity
from gateway.store.index import Job, Study
from gateway.store.store import StoreIndex

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

__all__ = ["ExportWorkers", "make_sender"]

log = logging.getLogger(__name__)

#: The log level of an attempt's outcome: a delivery is routine (DEBUG), a retry worth a line, an end a warning.
_LEVELS = {"delivered": logging.DEBUG, "warning": logging.INFO, "retry": logging.INFO}
_ENDED = logging.WARNING
_OWNER_MAX = 64  # characters of deliveries.claim_owner


def make_sender(settings: ExportSettings, name: str, *, store: StoreIndex | None = None) -> Sender:
    """The sender for destination ``name`` of ``settings`` (C-STORE or STOW-RS); for a research destination
    (``deidentify`` set), one that sends de-identified copies (:class:`~gateway.export.deidentify.
    DeidentifyingSender`, its pseudonym secret and temporary files in ``store``'s data folder).

    Raises
    ------
    KeyError
        If ``name`` is not a configured destination.
    ValueError
        If the destination de-identifies and no ``store`` is given.
    """
    destination = settings.destinations[name]
    sender: Sender
    if isinstance(destination, DimseDestination):
        sender = DimseSender(destination, calling_ae_title=settings.calling_ae_title, timeout_s=settings.timeout_s)
    else:
        sender = StowSender(destination, timeout_s=settings.timeout_s)
    if destination.deidentify is None:
        return sender
    if store is None:
        raise ValueError(f"destination {name!r} de-identifies: its sender needs the store (for the pseudonym key)")
    deidentifier = Deidentifier(destination.deidentify, pseudonym_seed(store.data_dir, name))
    return DeidentifyingSender(sender, deidentifier, store.data_dir / "tmp")


class ExportWorkers:
    """Threads that drive the export queue (:mod:`gateway.export.queue`), and the destination checker.

    Parameters
    ----------
    store
        The instance store (the queue lives in its index; relative paths are under its data folder).
    settings
        The ``export`` settings: destinations, retry policy, number of workers, poll interval, batch size, check
        interval.
    senders
        A sender per destination name; made from ``settings`` when omitted.
    clock
        Seconds since the epoch (tests may pass their own).
    metrics
        The gateway's metrics: each attempt's outcome per destination, each job's export time.
    owner
        The name of this process in the claims it makes (``host/pid/token``, at most 64 characters); a new
        :func:`~gateway.jobs.lifecycle.owner_identity` when omitted.

    Raises
    ------
    ValueError
        If ``owner`` is empty or longer than 64 characters.
    """

    def __init__(
        self,
        store: StoreIndex,
        settings: ExportSettings,
        *,
        senders: Mapping[str, Sender] | None = None,
        clock: Callable[[], float] = time.time,
        metrics: GatewayMetrics | None = None,
        owner: str | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        owner = owner_identity() if owner is None else owner
        self._audit = audit or AuditTrail.disabled()
        if not 0 < len(owner) <= _OWNER_MAX:
            raise ValueError(f"owner must be 1 to {_OWNER_MAX} characters, got {len(owner)}")
        #: The name this process's claims carry (``host/pid/token``).
        self.owner = owner
        self._store = store
        self._settings = settings
        self._policy = RetryPolicy.from_settings(settings)
        self._senders = (
            dict(senders)
            if senders is not None
            else {n: make_sender(settings, n, store=store) for n in settings.destinations}
        )
        self._clock = clock
        self._metrics = metrics
        self._rng = random.SystemRandom()  # jitter only; SystemRandom needs no seeding
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when deliveries were queued: idle workers look now, not at the poll
        self._threads = [
            threading.Thread(target=self._run, name=f"export-{k}", daemon=True) for k in range(settings.workers)
        ]
        self._checker = threading.Thread(target=self._check_loop, name="export-checker", daemon=True)
        self._keeper = threading.Thread(target=self._keep_loop, name="export-leases", daemon=True)
        self._checks: dict[str, DestinationCheck] = {}
        self._checks_lock = threading.Lock()

    def start(self) -> None:
        """Resume what a gone process left ``sending``, queue held results that now have a destination, then
        start the threads, the lease keeper and the checker."""
        resumed, orphaned = queue.resume(self._store, list(self._senders), owner=self.owner, now=self._clock())
        if resumed or orphaned:
            log.warning(
                "export: %d interrupted deliveries resumed, %d to unconfigured destinations dead", resumed, orphaned
            )
        queue.release_held(self._store, self._settings, now=self._clock())
        for thread in self._threads:
            thread.start()
        self._keeper.start()
        if self._settings.destinations:
            self._checker.start()

    def stop(self) -> None:
        """Stop after the file being sent (and the check under way); what was claimed and not sent goes back to
        the queue."""
        self._stop.set()
        self._wake.set()
        for thread in [*self._threads, self._checker, self._keeper]:
            if thread.is_alive():
                thread.join(timeout=self._settings.timeout_s + 10)
        for sender in self._senders.values():
            sender.close()

    def wake(self) -> None:
        """Deliveries were just queued (a job encoded, a retry): idle workers claim now, not at the next poll."""
        self._wake.set()

    def last_checks(self) -> dict[str, DestinationCheck]:
        """The latest check of each destination checked so far, by name."""
        with self._checks_lock:
            return dict(self._checks)

    def check_now(self, name: str) -> DestinationCheck:
        """Check destination ``name`` now and record the result; if it answers, its given-up deliveries are
        requeued (:func:`gateway.export.queue.revive_destination`).

        Raises
        ------
        gateway.errors.NotFound
            If ``name`` is not a configured destination.
        """
        if name not in self._settings.destinations:
            raise NotFound(f"no export destination {name!r}")
        check = check_destination(self._settings, name)
        before = self._record_check(check)
        if check.ok and before is not None and not before.ok:
            log.info("export: destination %s answers again: %s", name, check.detail)
        elif not check.ok and (before is None or before.ok):
            log.warning("export: destination %s does not answer: %s", name, check.detail)
        if check.ok:
            queue.revive_destination(self._store, name, now=self._clock())
        return check

    def _record_check(self, check: DestinationCheck) -> DestinationCheck | None:
        """Keep ``check`` as its destination's latest; return the one it replaces."""
        with self._checks_lock:
            before = self._checks.get(check.name)
            self._checks[check.name] = check
        return before

    def _check_loop(self) -> None:
        """Every destination once, then those with given-up deliveries every ``check_interval_s``."""
        names = list(self._settings.destinations)
        while not self._stop.is_set():
            for name in names:
                if self._stop.is_set():
                    return
                try:
                    self.check_now(name)
                except Exception:  # the index is unavailable for a moment: never the end of the checker
                    log.exception("export: checking destination %s failed", name)
            if self._stop.wait(self._settings.check_interval_s):
                return
            names = self._to_check()

    def _to_check(self) -> list[str]:
        try:
            revivable = queue.revivable_destinations(self._store)
        except Exception:
            log.exception("export: finding destinations to check failed")
            return []
        return [name for name in revivable if name in self._settings.destinations]

    def problems(self) -> list[str]:
        """What keeps the export from working, for ``/healthz`` (empty when all is well, or when stopped)."""
        if self._stop.is_set():
            return []
        started = [thread for thread in self._threads if thread.ident is not None]
        dead = sum(not thread.is_alive() for thread in started)
        found = [f"{dead} of {len(self._threads)} export workers stopped"] if dead else []
        if self._checker.ident is not None and not self._checker.is_alive():
            found.append("the export destination checker stopped")
        if self._keeper.ident is not None and not self._keeper.is_alive():
            found.append("the export lease heartbeat stopped")
        return found

    def keep_leases(self) -> int:
        """Renew this process's claims, take back the expired claims of any process; how many were taken back
        (the workers are woken if some were). The keeper thread calls this every ``export.lease_s / 3``."""
        now = self._clock()
        queue.renew_claims(self._store, self.owner, self._settings.lease_s, now=now)
        taken = queue.reclaim_expired_claims(self._store, now=now)
        if taken:
            self.wake()
        return taken

    def _keep_loop(self) -> None:
        while not self._stop.wait(self._settings.lease_s / 3):
            try:
                self.keep_leases()
            except Exception:  # the index is unavailable for a moment: the next beat tries again
                log.exception("export: renewing or taking back delivery claims failed")

    def run_once(self) -> bool:
        """Claim one batch for one destination and send it; whether there was one (the threads loop on this)."""
        claimed = queue.claim(
            self._store,
            list(self._senders),
            self._settings.batch_size,
            owner=self.owner,
            lease_s=self._settings.lease_s,
            now=self._clock(),
        )
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
                self._wake.wait(self._settings.poll_s)
                self._wake.clear()

    def _deliver(self, name: str, items: list[queue.ClaimedItem]) -> None:
        reported: set[int] = set()
        delivered = 0
        started, jitter = self._clock(), self._rng.random()  # what failed together is due again together
        studies = _studies_of(self._store, items) if self._audit.enabled else {}
        sent, failed = StudyTally(), StudyTally()
        self._audit_begin(name, items, studies)

        def report(item: Item, outcome: Outcome) -> None:
            reported.add(item.id)
            now = self._clock()
            state = queue.record(self._store, item, outcome, self._policy, jitter=jitter, now=now, retry_from=started)
            if state is None:
                return  # no longer claimed (the job was run again meanwhile): not this attempt's to count
            if isinstance(outcome, CheckedOutcome):  # a research copy: its residual-PHI check joins the history
                note_phi_check(self._store, item.id, now, outcome.phi_check)
            label = queue.DEAD if state == queue.DEAD else outcome.kind.value
            if item.job_id in studies and state in (queue.DELIVERED, queue.DEAD):
                study, patient_id = studies[item.job_id]
                (sent if state == queue.DELIVERED else failed).add(study, patient_id, item.sop_class_uid)
            if state == queue.DELIVERED:
                nonlocal delivered
                delivered += 1
            log.log(
                _LEVELS.get(label, _ENDED), "export to %s: delivery %d %s (%s)", name, item.id, state, _status(outcome)
            )
            if self._metrics is not None:
                self._metrics.export_attempt(name, label)

        try:
            self._senders[name].send(items, report, self._stop.is_set)
        except Exception as exc:  # a sender bug fails the attempt, never the worker
            log.exception("export to %s failed", name)
            outcome = Outcome(Kind.RETRY, f"internal error while sending: {type(exc).__name__}")
            for item in items:
                if item.id not in reported:
                    report(item, outcome)
        self._release([item.id for item in items if item.id not in reported], items[0].claim if items else None)
        self._audit_end(name, sent, failed)
        if delivered:  # the destination answered: that is as good as a check (the overview shows it)
            self._record_check(
                DestinationCheck(name, True, f"delivered {delivered} object(s)", started, self._clock() - started)
            )
        for job_id in sorted({item.job_id for item in items}):
            queue.settle(self._store, job_id, metrics=self._metrics, now=self._clock())

    def _audit_begin(self, name: str, items: Sequence[Item], studies: Mapping[int, tuple[str, str | None]]) -> None:
        """Begin Transferring DICOM Instances, per study of ``items``."""
        tally = StudyTally()
        for item in items:
            if item.job_id in studies:
                tally.add(*studies[item.job_id], item.sop_class_uid)
        host = _host_of(self._settings, name)
        for study in tally.studies():
            self._audit.export_started(name, host, study.study_instance_uid, study.patient_id, study.sop_classes)

    def _audit_end(self, name: str, sent: StudyTally, failed: StudyTally) -> None:
        """DICOM Instances Transferred, per study: what was delivered, and (a minor failure) what went dead."""
        host = _host_of(self._settings, name)
        for study in sent.studies():
            self._audit.instances_exported(name, host, study.study_instance_uid, study.patient_id, study.sop_classes)
        for study in failed.studies():
            self._audit.instances_exported(
                name,
                host,
                study.study_instance_uid,
                study.patient_id,
                study.sop_classes,
                succeeded=False,
                reason="refused by the destination, or out of attempts",
            )

    def _release(self, ids: list[int], claim: str | None) -> None:
        """Claimed but not attempted: due now when stopping, else after the first backoff (the peer misbehaved)."""
        now = self._clock()
        at = now if self._stop.is_set() else now + self._policy.backoff_initial_s
        queue.release(self._store, ids, at=at, claim=claim, now=now)


def _studies_of(store: StoreIndex, items: Sequence[Item]) -> dict[int, tuple[str, str | None]]:
    """Each job's StudyInstanceUID and PatientID (of the study as received), for the audit trail."""
    with store.sessions() as session:
        rows = session.execute(
            select(Job.id, Job.study_instance_uid, Study.patient_id)
            .outerjoin(Study, Study.study_instance_uid == Job.study_instance_uid)
            .where(Job.id.in_({item.job_id for item in items}))
        ).all()
    return {row.id: (row.study_instance_uid, row.patient_id) for row in rows}


def _host_of(settings: ExportSettings, name: str) -> str | None:
    """The destination's host: a DICOM node's, or the STOW-RS URL's."""
    destination = settings.destinations.get(name)
    if isinstance(destination, DimseDestination):
        return destination.host
    return None if destination is None else urlsplit(str(destination.stow_url)).hostname


def _status(outcome: Outcome) -> str:
    """The outcome for the log: its kind and status code only (a peer's free-text comment stays in the index)."""
    return outcome.kind.value + (f", status 0x{outcome.status:04X}" if outcome.status is not None else "")
