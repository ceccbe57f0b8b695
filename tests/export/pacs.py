"""Helpers of the export tests: a job to export, output files (CT stand-ins, and one valid object of each kind of
result), an in-process C-STORE SCP with chosen answers, and DCMTK ``storescp`` taking only chosen SOP classes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, evt
from sqlalchemy import select

from gateway.config import ExportSettings
from gateway.export.workers import ExportWorkers
from gateway.jobs.lifecycle import owner_identity
from gateway.jobs.states import JobState
from gateway.store.index import Delivery, Job, Series, SeriesRevision, Study
from gateway.store.store import StoreIndex
from gateway.synth.ct import write_synthetic_ct

from peers import StoreSCP, free_port

_jobs = iter(range(1, 1_000_000))

#: The claim owner of deliveries the tests claim by hand: this process in an earlier life (its host and pid,
#: another token), as a gateway that crashed and was started again finds them; a start takes them back.
EARLIER = owner_identity().rsplit("/", 1)[0] + "/earlier"


def fast_export(**values: Any) -> ExportSettings:
    """Export settings for tests: short backoff, poll and timeouts; one worker."""
    base: dict[str, Any] = {
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "poll_s": 0.05,
        "timeout_s": 5.0,
        "workers": 1,
    }
    base.update(values)
    return ExportSettings(**base)


def make_job(store: StoreIndex, state: JobState = JobState.INFERRED) -> int:
    """A job row (with the study, series and revision it needs) in ``state``; its id."""
    k = next(_jobs)
    study, series, now = generate_uid(), generate_uid(), time.time()
    with store.write_sessions.begin() as session:
        session.add(Study(study_instance_uid=study, created_at=now))
        session.flush()
        session.add(Series(series_instance_uid=series, study_instance_uid=study, created_at=now))
        session.flush()
        revision = SeriesRevision(
            series_instance_uid=series, revision=k, state="complete", first_received_at=now, last_received_at=now
        )
        session.add(revision)
        session.flush()
        job = Job(
            revision_id=revision.id,
            study_instance_uid=study,
            series_instance_uid=series,
            state=state,
            created_at=now,
            updated_at=now,
            detail={},
        )
        session.add(job)
        session.flush()
        return int(job.id)


def outputs(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    """``n`` small synthetic CT files standing for a job's results."""
    write_synthetic_ct(folder, n, rows=32, columns=32, seed=seed, fresh_uids=True, n_nodules=0)
    return sorted(folder.glob("*.dcm"))


_DEVICE = {
    "manufacturer": "Gateway tests",
    "manufacturer_model_name": "export",
    "software_versions": "0",
    "device_serial_number": "1",
}


def result_files(folder: Path, seed: int = 0) -> dict[str, Path]:
    """One valid object of each kind of result about a small synthetic CT: ``{kind: path}``.

    A Segmentation (``seg``), a TID 1500 Comprehensive 3D SR (``sr``), a Grayscale Softcopy Presentation State
    (``gsps``), a Key Object Selection Document (``ko``) and a Secondary Capture image (``sc``), built with
    highdicom and written as DICOM Part 10 files in explicit VR little endian.
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_synthetic_ct(folder / "ct", 2, rows=16, columns=16, seed=seed, fresh_uids=True, n_nodules=0)
    ct = [pydicom.dcmread(p) for p in sorted((folder / "ct").glob("*.dcm"))]
    objects = {"seg": _seg(ct), "sr": _sr(ct), "gsps": _gsps(ct), "ko": _ko(ct), "sc": _sc(ct[0])}
    paths: dict[str, Path] = {}
    for kind, ds in objects.items():
        paths[kind] = folder / f"{kind}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
    return paths


def _series(number: int) -> dict[str, Any]:
    return {
        "series_instance_uid": generate_uid(),
        "series_number": number,
        "sop_instance_uid": generate_uid(),
        "instance_number": 1,
    }


def _seg(ct: list[pydicom.Dataset]) -> hd.seg.Segmentation:
    mask = np.zeros((len(ct), ct[0].Rows, ct[0].Columns), dtype=bool)
    mask[:, 4:8, 4:8] = True
    segment = hd.seg.SegmentDescription(
        1, "lesion", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule, algorithm_type="MANUAL"
    )
    return hd.seg.Segmentation(
        source_images=ct,
        pixel_array=mask,
        segmentation_type="BINARY",
        segment_descriptions=[segment],
        **_series(9000),
        **_DEVICE,
    )


def _sr(ct: list[pydicom.Dataset]) -> hd.sr.Comprehensive3DSR:
    reader = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Test^Reader"),
    )
    volume = hd.sr.Measurement(name=codes.SCT.Volume, value=1.5, unit=hd.sr.CodedConcept("ml", "UCUM", "milliliter"))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="lesion 1"), measurements=[volume]
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=reader),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(evidence=ct, content=report, manufacturer="Gateway tests", **_series(9001))


def _gsps(ct: list[pydicom.Dataset]) -> hd.pr.GrayscaleSoftcopyPresentationState:
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=ct, content_label="OUTLINES", **_series(9002), **_DEVICE
    )


def _ko(ct: list[pydicom.Dataset]) -> hd.ko.KeyObjectSelectionDocument:
    selection = hd.ko.KeyObjectSelection(document_title=codes.DCM.OfInterest, referenced_objects=ct[:1])
    return hd.ko.KeyObjectSelectionDocument(
        evidence=ct, content=selection, manufacturer="Gateway tests", **_series(9003)
    )


def _sc(ct: pydicom.Dataset) -> hd.sc.SCImage:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ct,
        pixel_array=np.zeros((ct.Rows, ct.Columns, 3), dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        pixel_spacing=(1.0, 1.0),
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        manufacturer="Gateway tests",
        **_series(9004),
    )


def relabel(src: Path, dest: Path, sop_class_uid: str) -> Path:
    """A copy of ``src`` under another SOP class and a new SOP Instance UID."""
    ds = pydicom.dcmread(src)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dest, enforce_file_format=True)
    return dest


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def job_of(store: StoreIndex, job_id: int) -> Job:
    with store.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def drain(store: StoreIndex, settings: ExportSettings, job_id: int, timeout_s: float = 30.0) -> str:
    """Run the export workers' loop in this thread until the job leaves ``encoded``; its state."""
    workers = ExportWorkers(store, settings)
    deadline = time.monotonic() + timeout_s
    try:
        while job_of(store, job_id).state == JobState.ENCODED:
            assert time.monotonic() < deadline, f"job {job_id} still encoded after {timeout_s} s"
            if not workers.run_once():
                time.sleep(0.02)
    finally:
        workers.stop()
    return job_of(store, job_id).state


def deliveries(store: StoreIndex, job_id: int | None = None) -> list[Delivery]:
    query = select(Delivery).order_by(Delivery.id)
    if job_id is not None:
        query = query.where(Delivery.job_id == job_id)
    with store.sessions() as session:
        return list(session.scalars(query))


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met after {timeout_s} s"
        time.sleep(0.02)


def wait_for_job(store: StoreIndex, job_id: int, states: Iterable[str], timeout_s: float = 30.0) -> Job:
    wanted = set(states)
    wait_for(lambda: job_of(store, job_id).state in wanted, timeout_s, f"job {job_id} in {sorted(wanted)}")
    return job_of(store, job_id)


class StatusSCP:
    """A pynetdicom C-STORE SCP in this process, answering the statuses a test chooses.

    Parameters
    ----------
    statuses
        Answers to the successive C-STOREs (0x0000 once they run out).
    sop_classes
        The storage SOP classes it accepts (default: all, in every transfer syntax).
    port
        The port to listen on (default: a free one); known before :meth:`start`, so it can start late.
    """

    def __init__(
        self,
        *,
        aet: str = "PACS",
        statuses: Sequence[int] = (),
        sop_classes: Sequence[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.aet = aet
        self.port = port or free_port()
        self.statuses = list(statuses)
        classes = sop_classes or [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        self.contexts = [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in classes]
        self.received: Counter[str] = Counter()
        self.associations: list[set[tuple[str, str]]] = []  # the (SOP class, transfer syntax) pairs each proposed
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000 or status & 0xF000 == 0xB000:
                self.received[str(event.request.AffectedSOPInstanceUID)] += 1
        return status

    def _on_requested(self, event: Any) -> None:
        proposed = {
            (str(cx.abstract_syntax), str(ts))
            for cx in event.assoc.requestor.requested_contexts
            for ts in cx.transfer_syntax
        }
        with self._lock:
            self.associations.append(proposed)

    def start(self) -> None:
        ae = AE(ae_title=self.aet)
        ae.supported_contexts = self.contexts
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REQUESTED, self._on_requested)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_VERIFICATION = "1.2.840.10008.1.1"


class ProfileStoreSCP(StoreSCP):
    """DCMTK ``storescp`` that takes only ``sop_classes`` (and Verification), in ``transfer_syntaxes``.

    It negotiates by an association negotiation profile (``--config-file``): a context of any other SOP class is
    rejected with result 0x03 (abstract syntax not supported), one in another transfer syntax with 0x04.
    """

    def __init__(
        self,
        tmpdir: Path,
        sop_classes: Iterable[str],
        *,
        transfer_syntaxes: Sequence[str] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        aet: str = "PACS",
    ) -> None:
        super().__init__(tmpdir, aet=aet)
        self.config = self.tmpdir / "profile.cfg"
        self.config.write_text(_profile([_VERIFICATION, *sop_classes], transfer_syntaxes), encoding="ascii")

    def _command(self) -> Sequence[str]:
        command = [arg for arg in super()._command() if arg != "+xa"]  # --accept-all and a profile exclude each other
        return [*command[:-1], "--config-file", str(self.config), "Profile", command[-1]]

    def received(self) -> set[str]:
        """SOP Instance UIDs of the instances it has written."""
        return {sop_instance_uid(path) for path in self.outdir.iterdir() if path.is_file()}


def _profile(sop_classes: Sequence[str], transfer_syntaxes: Sequence[str]) -> str:
    """A DCMTK association negotiation profile named ``Profile`` (DCMTK's ``asconfig.txt``)."""
    lines = ["[[TransferSyntaxes]]", "[Syntaxes]"]
    lines += [f"TransferSyntax{k} = {uid}" for k, uid in enumerate(transfer_syntaxes, 1)]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [f"PresentationContext{k} = {uid}\\Syntaxes" for k, uid in enumerate(sop_classes, 1)]
    lines += ["[[Profiles]]", "[Profile]", "PresentationContexts = Contexts"]
    return "\n".join(lines) + "\n"
