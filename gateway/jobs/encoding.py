"""The encode stage of a job: its results as DICOM objects, written durably; the runner then queues their export.

Each model result becomes DICOM objects in the source study (a SEG, its TID 1500 SR, the outlines as a presentation
state and the key images as a key object selection, burned-in key images when a destination of the job asks for
them; or Parametric Maps), written durably under ``<data_dir>/outputs/job-<id>/`` and recorded in the index's
``outputs`` table, which QIDO-RS and WADO-RS serve (:mod:`gateway.store.outputs`; never ``instances``: the
gateway does not run models on its own results); then, in one transaction, a delivery per file and destination
(for the kinds that destination takes) is queued and the job moves to ``encoded``
(:func:`gateway.export.queue.enqueue`). From there the export workers own it: a restart resumes the queue and
sends each file once. Outputs keep their UIDs when a job is run again (:mod:`gateway.encode.uids`), so
a re-run replaces what a PACS holds instead of doubling it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy import select

import gateway
from gateway.config import ExportSettings, OutputKind
from gateway.export.destinations import destinations_for, for_models
from gateway.infer.results import ModelResult
from gateway.store.index import Instance, Job
from gateway.store.outputs import OutputRecord, record_job_outputs
from gateway.store.store import InstanceStore

__all__ = ["SERIES_NUMBER_BASE", "EncodeStage", "Encoded"]

log = logging.getLogger(__name__)

#: SeriesNumber of the first result's SEG (its SR takes the next); each further result adds 10.
SERIES_NUMBER_BASE = 9000


@dataclass(frozen=True)
class Encoded:
    """What the encode stage wrote: each output (model, kind, UIDs, file), the files, where they go, the seconds
    per kind, and the stage's seconds."""

    outputs: list[dict[str, Any]]
    paths: list[Path]
    destinations: dict[str, frozenset[OutputKind]]
    parts: dict[str, float]
    seconds: float


class EncodeStage:
    """Encodes an inferred job's results, stores the files and queues their deliveries.

    Parameters
    ----------
    store
        The instance store (the job index and the source instances).
    export
        The export settings (which destinations each series' results go to).
    outputs_dir
        Where each job's DICOM outputs go (``<outputs_dir>/job-<id>/``).
    """

    def __init__(self, store: InstanceStore, export: ExportSettings, outputs_dir: Path) -> None:
        self._store = store
        self._export = export
        self._outputs_dir = outputs_dir

    def __call__(self, job_id: int, results: Sequence[ModelResult]) -> Encoded:
        """Encode ``job_id``'s results (the job is ``encoding``) and write the files; the runner queues them."""
        started = time.monotonic()
        destinations = destinations_for(self._export, self._source(job_id))
        destinations = for_models(destinations, self._export, {result.name for result in results})
        key_images = any("sc" in kinds for kinds in destinations.values())  # only some destinations want them
        parts: dict[str, float] = {}
        outputs, paths = self._encode(job_id, results, key_images, parts)
        seconds = time.monotonic() - started
        log.info("job %d: %d DICOM output(s) in %.1f s", job_id, len(outputs), seconds)
        encode_parts = {key: round(value, 3) for key, value in parts.items()}  # seconds per kind, and writing
        return Encoded(outputs, paths, destinations, encode_parts, seconds)

    def _encode(
        self, job_id: int, results: Sequence[ModelResult], key_images: bool, parts: dict[str, float]
    ) -> tuple[list[dict[str, Any]], list[Path]]:
        from gateway.encode import encode_result, write_objects  # highdicom and OpenCV load with the first job

        folder = self._outputs_dir / f"job-{job_id}"
        outputs: list[dict[str, Any]] = []
        paths: list[Path] = []
        records: list[OutputRecord] = []
        sources = self._sources(results)  # read once for every result: they are mostly the same images
        for k, result in enumerate(results):
            objects = encode_result(
                result,
                sources,
                series_number=SERIES_NUMBER_BASE + 10 * k,
                gateway_version=gateway.__version__,
                key_images=key_images,
                timings=parts,
            )
            started = time.perf_counter()
            written = write_objects(objects, folder)
            parts["write_s"] = parts.get("write_s", 0.0) + time.perf_counter() - started
            paths.extend(written)
            records.extend(
                OutputRecord.of(obj.dataset, path, self._store.data_dir)
                for obj, path in zip(objects, written, strict=True)
            )
            outputs.extend(
                {
                    "model": f"{result.name}@{result.version}",
                    "kind": obj.kind,
                    "SOPClassUID": obj.sop_class_uid,
                    "SOPInstanceUID": obj.sop_instance_uid,
                    "SeriesInstanceUID": obj.series_instance_uid,
                    "file": str(path.relative_to(self._outputs_dir)),
                }
                for obj, path in zip(objects, written, strict=True)
            )
        with self._store.write_sessions.begin() as session:  # the files are durable: QIDO-RS and WADO-RS serve them
            record_job_outputs(session, job_id, records)
        return outputs, paths

    def _sources(self, results: Sequence[ModelResult]) -> dict[str, Dataset]:
        """The source instances the results' volumes name, each read from the store once."""
        uids: set[str] = set()
        for result in results:
            uids.update(ref.sop_instance_uid for ref in result.volume.slices)
            uids.update(plane.ref.sop_instance_uid for plane in result.volume.source_planes)  # images between slices
            for refs in result.volume.slices_4d:
                uids.update(ref.sop_instance_uid for ref in refs)
        with self._store.sessions() as session:
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.path).where(Instance.sop_instance_uid.in_(uids))
            ).all()
        return {uid: dcmread(self._store.path_of(path), stop_before_pixels=True) for uid, path in rows}

    def _source(self, job_id: int) -> str:
        """Where the job's series came from (``dimse:<calling AE>`` or ``stow``): its first instance's source."""
        with self._store.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            source = session.scalar(
                select(Instance.source).where(Instance.series_instance_uid == job.series_instance_uid).limit(1)
            )
        return source or ""
