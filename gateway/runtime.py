"""The running gateway: the stages that live for the whole process, started and stopped together.

Created by the FastAPI lifespan (``gateway serve``) or directly by tests; importing it starts nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pydicom.config

from gateway.config import Settings
from gateway.export.workers import ExportWorkers
from gateway.infer.runtime import InferenceRuntime
from gateway.ingest.completion import CompletionMonitor
from gateway.ingest.dimse import StorageSCP
from gateway.jobs.assembly import AssemblyWorkers
from gateway.jobs.encoding import EncodeStage
from gateway.jobs.inference import InferenceStage
from gateway.registry.registry import RegisteredModel, Registry, shipped_models_dir
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)


def quiet_pydicom() -> int:
    """Read received data tolerantly and keep its values out of the logs; return the mode it replaced.

    pydicom's value validation on reading warns *and logs* each odd value (a malformed name, an over-long ID):
    that would put patient data in the log. The gateway checks what it depends on itself
    (:mod:`gateway.ingest.instance`), so validation on reading is off while a gateway runs in the process.
    """
    previous = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return previous


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
        self.store = InstanceStore(settings.store)
        self.registry = Registry(self.store, max_archive_bytes=settings.models.max_upload_bytes)
        self.monitor = CompletionMonitor(
            self.store.write_sessions, settings.ingest.quiet_period_s, settings.ingest.completion_poll_s
        )
        self.scp = StorageSCP(settings.dicom, self.store) if dimse else None
        self.inference = InferenceRuntime(settings.models.device, batching=settings.models.batching)
        data = settings.store.data_dir
        encode = EncodeStage(self.store, settings.export, data / "outputs")
        results = data / "results" if settings.models.keep_nifti else None
        stage = InferenceStage(self.store, self.registry, self.inference, results, then=encode)
        self.assembly = AssemblyWorkers(self.store, settings.jobs.workers, settings.jobs.poll_s, then=stage)
        self.export = ExportWorkers(self.store, settings.export)
        self._pydicom_mode: int | None = None

    def start(self) -> None:
        """Register the shipped models (disabled), start the completion monitor, the workers, the DICOM listener."""
        if self.settings.models.register_shipped:  # each broken package is logged and skipped
            _log_shipped(self.registry.register_shipped(shipped_models_dir(self.settings.models)))
        self._pydicom_mode = quiet_pydicom()
        self.monitor.start()
        self.assembly.start()
        self.export.start()
        if self.scp is not None:
            try:
                self.scp.start()
            except BaseException:  # e.g. the port is taken: leave no monitor thread or index open behind
                self.assembly.stop()
                self.export.stop()
                self.inference.close()
                self.monitor.stop()
                self.store.close()
                self._restore_pydicom()
                raise

    def stop(self) -> None:
        """Stop accepting, stop the monitor, close the index."""
        if self.scp is not None:
            self.scp.stop()
        self.monitor.stop()
        self.assembly.stop()
        self.export.stop()
        self.inference.close()
        self.store.close()
        self._restore_pydicom()

    def _restore_pydicom(self) -> None:
        if self._pydicom_mode is not None:
            pydicom.config.settings.reading_validation_mode = self._pydicom_mode
            self._pydicom_mode = None
