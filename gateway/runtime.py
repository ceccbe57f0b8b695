"""The running gateway: the stages that live for the whole process, started and stopped together.

Created by the FastAPI lifespan (``gateway serve``) or directly by tests; importing it starts nothing.

A process runs the stages of its roles (``cluster.roles``, ``gateway serve --role``), and several processes may
share one index and data folder:

- ``ingest``: the DICOM listener, series completion, the retention worker and (in the app) the HTTP faces;
- ``worker``: the job runner (assembly, routing, inference, encoding) and the model runtime;
- ``export``: the export workers.

Every stage object is made whatever the roles (they are cheap, and the HTTP faces read their state); only the
stages of the process's roles start. Stages hand work on through :mod:`gateway.store.notify`: a completed series,
a job handed back or re-run wakes the job workers, queued deliveries wake the export workers, a change of the
model registry makes the model runtime drop what is no longer active. On PostgreSQL the wake-ups reach the other
processes (LISTEN/NOTIFY); on SQLite they stay in the process. The polls are the fallback either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gateway.admin_token import ensure_admin_token
from gateway.audit.configuration import record_configuration
from gateway.audit.trail import AuditTrail
from gateway.config import Settings
from gateway.export.workers import ExportWorkers
from gateway.infer.runtime import InferenceRuntime
from gateway.ingest.completion import CompletionMonitor
from gateway.ingest.dimse import StorageSCP
from gateway.jobs.encoding import EncodeStage
from gateway.jobs.inference import InferenceStage
from gateway.jobs.lifecycle import owner_identity
from gateway.jobs.placement import Placement
from gateway.jobs.presence import PresenceKeeper
from gateway.jobs.runner import JobRunner, Pipeline
from gateway.jobs.states import JobState
from gateway.metrics import GatewayMetrics, IngestState
from gateway.process import LibrarySettings
from gateway.registry.registry import RegisteredModel, Registry, shipped_models_dir
from gateway.store.notify import DELIVERIES, JOBS, MODELS, make_notifier
from gateway.store.retention import DiskUsage, RetentionWorker
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)


def _log_shipped(shipped: Sequence[RegisteredModel]) -> None:
    """Say which shipped (demonstration) models are registered but disabled, and which an operator enabled."""
    disabled = sorted({m.name for m in shipped if not m.enabled})
    enabled = sorted({m.name for m in shipped if m.enabled})
    if disabled:
        log.info(
            "shipped demonstration models registered but disabled: %s; enable one with `gateway models enable NAME`",
            ", ".join(disabled),
        )
    if enabled:
        log.warning(
            "shipped demonstration models enabled: %s; they were trained or built on phantoms, not validated on "
            "patient images (`gateway models disable NAME` turns one off)",
            ", ".join(enabled),
        )


class Gateway:
    """Store, registry, completion monitor, job workers, inference, export workers and (optionally) the DICOM listener.

    Parameters
    ----------
    settings
        The gateway settings.
    dimse
        Whether to run the DICOM listener (tests of the HTTP side may leave it off).
    """

    def __init__(self, settings: Settings, *, dimse: bool = True) -> None:
        self.settings = settings
        #: The roles this process runs (``cluster.roles``).
        self.roles = frozenset(settings.cluster.roles)
        #: This process's name in job leases, delivery claims and the workers table (``host/pid/token``).
        self.owner = owner_identity()
        self.store = InstanceStore(settings.store, ingest=settings.ingest)
        #: Wake-ups between stages, and between processes on PostgreSQL.
        self.notifier = make_notifier(self.store.write_engine, enabled=settings.cluster.notify)
        #: The audit trail (``audit``): DICOM audit messages of what this process does, to the file and syslog.
        self.audit = AuditTrail.from_settings(settings.audit, settings.store.data_dir, ae_title=settings.dicom.ae_title)
        self.registry = Registry.from_settings(self.store, settings.models)
        self.registry.on_change = self.models_changed
        self.registry.audit = self.audit
        #: The gateway's metrics (``GET /metrics``), fed by every stage below.
        self.metrics = GatewayMetrics(
            sessions=self.store.sessions,
            ingest=self.ingest_state,
            job_states=[state.value for state in JobState],
            worker=self.owner,
        )
        self.scp = (
            StorageSCP(settings.dicom, self.store, metrics=self.metrics, audit=self.audit)
            if dimse and "ingest" in self.roles
            else None
        )
        self.inference = InferenceRuntime(
            settings.models.device,
            batching=settings.models.batching,
            memory_budget_bytes=settings.models.memory_budget_bytes,
            metrics=self.metrics,
        )
        #: This process in the workers list (``/api/workers``): its roles, device and models, and a heartbeat.
        self.presence = PresenceKeeper(
            self.store,
            self.owner,
            roles=settings.cluster.roles,
            device=self.inference.device if self.runs("worker") else None,
            models=settings.cluster.models,
            heartbeat_s=settings.cluster.heartbeat_s,
        )
        data = settings.store.data_dir
        encode = EncodeStage(self.store, settings.export, data / "outputs")
        results = data / "results" if settings.models.keep_nifti else None
        runs = settings.cluster.models
        #: Which jobs this process's workers take (all, or with ``cluster.models`` those they can run in full).
        self.placement = Placement(self.store, self.registry, runs)
        infer = InferenceStage(self.store, self.registry, self.inference, results, runs=runs)
        self.export = ExportWorkers(
            self.store, settings.export, metrics=self.metrics, owner=self.owner, audit=self.audit
        )
        self.jobs = JobRunner(
            self.store,
            settings.jobs,
            Pipeline(infer, encode),
            metrics=self.metrics,
            on_encoded=self.wake_export,
            owner=self.owner,
            placement=self.placement,
        )
        self.monitor = CompletionMonitor(
            self.store.write_sessions,
            settings.ingest.quiet_period_s,
            settings.ingest.completion_poll_s,
            on_complete=self.wake_jobs,
            resend_wait_s=settings.ingest.resend_wait_s,
        )
        self.retention = RetentionWorker(self.store, settings.retention, audit=self.audit)
        self.library = LibrarySettings(self.store.tmp_dir)
        #: The data folder's admin token if this start made it (the only time it is known), else None.
        self.new_admin_token: str | None = None

    def runs(self, role: str) -> bool:
        """Whether this process runs ``role`` (``ingest``, ``worker`` or ``export``)."""
        return role in self.roles

    def wake_jobs(self) -> None:
        """A job may be claimable now (a series completed, a job was handed back or re-run): wake the job workers,
        this process's and, on PostgreSQL, every other process's."""
        self.notifier.publish(JOBS)

    def wake_export(self) -> None:
        """Deliveries were queued (a job encoded, a retry or a resend): wake the export workers everywhere."""
        self.notifier.publish(DELIVERIES)

    def models_changed(self) -> None:
        """The model registry changed (registered, enabled, disabled, removed): every process reconciles."""
        self.notifier.publish(MODELS)

    def _retain_active(self) -> None:
        """Drop loaded model versions that are no longer the active ones (a model disabled, removed or replaced),
        and the placement's decisions (a model enabled may change them)."""
        self.placement.forget()
        try:
            self.inference.retain(self.registry.active())
        except Exception:
            log.exception("reconciling the loaded models with the registry failed; the next job's load does it")

    def start(self) -> None:
        """Apply the library settings, then start the stages of this process's roles: the job runner (``worker``),
        the export workers (``export``), the retention worker, the DICOM listener and the completion monitor
        (``ingest``, which also registers the shipped models, disabled)."""
        self.new_admin_token = ensure_admin_token(self.settings)  # a data folder's first start, if none is configured
        self.library.apply()
        self.presence.start()
        if self.runs("ingest") and self.settings.models.register_shipped:  # each broken package is logged, skipped
            _log_shipped(self.registry.register_shipped(shipped_models_dir(self.settings.models)))
        if self.runs("worker"):
            self.notifier.subscribe(JOBS, self.jobs.wake)
            self.notifier.subscribe(MODELS, self._retain_active)
        if self.runs("export"):
            self.notifier.subscribe(DELIVERIES, self.export.wake)
        self.notifier.start()
        if self.runs("worker"):
            self.jobs.start()
        if self.runs("export"):
            self.export.start()
        if self.runs("ingest"):
            self.retention.start()
        if self.scp is not None:
            try:
                self.scp.start()
            except BaseException:  # e.g. the port is taken: leave no monitor thread or index open behind
                self._stop_stages()
                raise
        if self.runs("ingest"):
            self.monitor.start()  # last: its quiet period after a restart counts from when senders can reach us
        self.audit.application_started()
        if self.audit.enabled:  # what changed in the settings since this process's last start
            record_configuration(self.audit, self.settings)

    def problems(self) -> list[str]:
        """Why the gateway cannot do its work now (the store closed or its index not answering, a stage's workers
        dead, the DICOM listener down); empty if none."""
        found = [
            *self.store.problems(),
            *self.jobs.problems(),
            *self.export.problems(),
            *self.notifier.problems(),
            *self.presence.problems(),
        ]
        if self.scp is not None and not self.scp.running:
            found.append("the DICOM listener is not running")
        return found

    def disk_usage(self) -> DiskUsage:
        """The data folder's file system against the retention watermarks and the ingest floor, measured now."""
        return DiskUsage.measure(self.store.data_dir, self.settings.retention, self.store.settings.min_free_bytes)

    def ingest_state(self) -> IngestState:
        """Free disk, and whether ingest accepts instances now: free space at or above ``store.min_free_bytes``,
        the store open with its index answering, and, where this gateway runs one, the DICOM listener serving
        (``gateway_accepting``)."""
        disk = self.disk_usage()
        serving = self.scp is None or self.scp.running
        return IngestState(disk.free_bytes, disk.accepting and serving and not self.store.problems())

    def stop(self) -> None:
        """Stop accepting (associations in progress are aborted), then the stages: running jobs get the grace
        period and the rest go back to ``received``; close the index, undo the library settings."""
        self.audit.application_stopped()
        if self.scp is not None:
            self.scp.stop()
        self._stop_stages()

    def _stop_stages(self) -> None:
        self.monitor.stop()
        self.jobs.stop()
        self.export.stop()
        self.retention.stop()
        if self.runs("worker"):
            self.wake_jobs()  # what this process handed back: another worker takes it now, not at its next poll
        self.notifier.stop()
        self.presence.stop()
        self.inference.close()
        self.store.close()
        self.library.restore()
        self.audit.close()  # last: what the stages reported while stopping is sent
