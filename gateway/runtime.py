"""The running gateway: the stages that live for the whole process, started and stopped together.

Created by the FastAPI lifespan (``gateway serve``) or directly by tests; importing it starts nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gateway.admin_token import ensure_admin_token
from gateway.config import Settings
from gateway.export.workers import ExportWorkers
from gateway.infer.runtime import InferenceRuntime
from gateway.ingest.completion import CompletionMonitor
from gateway.ingest.dimse import StorageSCP
from gateway.jobs.encoding import EncodeStage
from gateway.jobs.inference import InferenceStage
from gateway.jobs.runner import JobRunner, Pipeline
from gateway.jobs.states import JobState
from gateway.metrics import GatewayMetrics, IngestState
from gateway.process import LibrarySettings
from gateway.registry.registry import RegisteredModel, Registry, shipped_models_dir
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
        self.store = InstanceStore(settings.store, ingest=settings.ingest)
        self.registry = Registry.from_settings(self.store, settings.models)
        #: The gateway's metrics (``GET /metrics``), fed by every stage below.
        self.metrics = GatewayMetrics(
            sessions=self.store.sessions, ingest=self.ingest_state, job_states=[state.value for state in JobState]
        )
        self.scp = StorageSCP(settings.dicom, self.store, metrics=self.metrics) if dimse else None
        self.inference = InferenceRuntime(
            settings.models.device,
            batching=settings.models.batching,
            memory_budget_bytes=settings.models.memory_budget_bytes,
            metrics=self.metrics,
        )
        data = settings.store.data_dir
        encode = EncodeStage(self.store, settings.export, data / "outputs")
        results = data / "results" if settings.models.keep_nifti else None
        infer = InferenceStage(self.store, self.registry, self.inference, results)
        self.export = ExportWorkers(self.store, settings.export, metrics=self.metrics)
        self.jobs = JobRunner(
            self.store, settings.jobs, Pipeline(infer, encode), metrics=self.metrics, on_encoded=self.export.wake
        )
        self.monitor = CompletionMonitor(
            self.store.write_sessions,
            settings.ingest.quiet_period_s,
            settings.ingest.completion_poll_s,
            on_complete=self.jobs.wake,
            resend_wait_s=settings.ingest.resend_wait_s,
        )
        self.retention = RetentionWorker(self.store, settings.retention)
        self.library = LibrarySettings(data / "tmp")
        #: The data folder's admin token if this start made it (the only time it is known), else None.
        self.new_admin_token: str | None = None

    def start(self) -> None:
        """Apply the library settings, register the shipped models (disabled), start the completion monitor, the
        job runner, the export workers and the DICOM listener."""
        self.new_admin_token = ensure_admin_token(self.settings)  # a data folder's first start, if none is configured
        self.library.apply()
        if self.settings.models.register_shipped:  # each broken package is logged and skipped
            _log_shipped(self.registry.register_shipped(shipped_models_dir(self.settings.models)))
        self.jobs.start()
        self.export.start()
        self.retention.start()
        if self.scp is not None:
            try:
                self.scp.start()
            except BaseException:  # e.g. the port is taken: leave no monitor thread or index open behind
                self._stop_stages()
                raise
        self.monitor.start()  # last: its quiet period after a restart counts from when senders can reach us again

    def problems(self) -> list[str]:
        """Why the gateway cannot do its work now (the store closed or its index not answering, a stage's workers
        dead, the DICOM listener down); empty if none."""
        found = [*self.store.problems(), *self.jobs.problems(), *self.export.problems()]
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
        if self.scp is not None:
            self.scp.stop()
        self._stop_stages()

    def _stop_stages(self) -> None:
        self.monitor.stop()
        self.jobs.stop()
        self.export.stop()
        self.retention.stop()
        self.inference.close()
        self.store.close()
        self.library.restore()
