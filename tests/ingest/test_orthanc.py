"""Orthanc as a real sending peer: a study pushed by its C-STORE SCU arrives whole, once and unaltered."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import select

from gateway.jobs.states import JobState
from gateway.runtime import Gateway
from gateway.store.index import Instance, Job, SeriesRevision
from gateway.synth.ct import write_synthetic_ct

from conftest import require_tool
from peers import Orthanc, orthanc_binary

pytestmark = pytest.mark.slow

SLICES = 20
SIZE = 128
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: every byte after the File Meta Information (group 0002).

    Walks the meta elements (always Explicit VR Little Endian, PS3.10 7.1) instead of trusting the optional
    group length, so that a file whose meta was rewritten by another implementation is cut at the right place.
    """
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part 10 file"
    pos = 132
    while pos + 8 <= len(raw) and struct.unpack_from("<H", raw, pos)[0] == 0x0002:
        vr = raw[pos + 4 : pos + 6]
        if vr in _LONG_LENGTH_VRS:
            pos += 12 + struct.unpack_from("<I", raw, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", raw, pos + 6)[0]
    return raw[pos:]


def wait_for_completion(gw: Gateway, series_uid: str, timeout_s: float = 15.0) -> list[Job]:
    """Poll the index until the series has a job and no open revision; return its jobs."""
    deadline = time.monotonic() + timeout_s
    while True:
        with gw.store.sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.series_instance_uid == series_uid)))
            open_revisions = session.scalars(
                select(SeriesRevision).where(
                    SeriesRevision.series_instance_uid == series_uid, SeriesRevision.state == "open"
                )
            ).all()
        if jobs and not open_revisions:
            return jobs
        assert time.monotonic() < deadline, f"series not complete after {timeout_s} s: {len(jobs)} job(s)"
        time.sleep(0.05)


def test_study_sent_by_orthanc_is_stored_byte_for_byte_and_completes_once(gateway: Gateway, tmp_path: Path) -> None:
    if orthanc_binary() is None:
        require_tool("Orthanc")
    assert gateway.scp is not None
    ct = write_synthetic_ct(tmp_path / "series", SLICES, rows=SIZE, columns=SIZE, seed=7)
    originals = {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f
        for f in sorted((tmp_path / "series").glob("*.dcm"))
    }
    assert set(originals) == set(ct.sop_instance_uids)

    modalities = {"gateway": ("GATEWAY", "127.0.0.1", gateway.scp.port)}
    with Orthanc(tmp_path / "orthanc", modalities=modalities, dicomweb=False) as orthanc:
        uploads = [orthanc.rest("POST", "/instances", content=f.read_bytes()) for f in originals.values()]
        assert {u["Status"] for u in uploads} == {"Success"}, uploads
        studies = {u["ParentStudy"] for u in uploads}
        assert len(studies) == 1
        job = orthanc.rest("POST", "/modalities/gateway/store", {"Resources": [*studies], "Synchronous": True})

    # Orthanc's synchronous store job counts every C-STORE whose response status was not success as failed.
    assert job["InstancesCount"] == SLICES, job
    assert job["FailedInstancesCount"] == 0, job
    assert job["RemoteAet"] == "GATEWAY", job

    with gateway.store.sessions() as session:
        rows = list(session.scalars(select(Instance).where(Instance.series_instance_uid == ct.series_instance_uid)))
    assert {r.sop_instance_uid for r in rows} == set(ct.sop_instance_uids)
    for row in rows:
        assert row.source == f"dimse:{orthanc.aet}"
        assert (row.sop_class_uid, row.transfer_syntax_uid) == (CTImageStorage, ExplicitVRLittleEndian)
        stored = gateway.store.path_of(row.path)
        # The data set Orthanc sent is kept byte for byte; only the file meta is the gateway's own.
        assert dataset_bytes(stored) == dataset_bytes(originals[row.sop_instance_uid]), row.sop_instance_uid
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == row.sop_instance_uid
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian

    jobs = wait_for_completion(gateway, ct.series_instance_uid)
    with gateway.store.sessions() as session:
        revisions = list(
            session.scalars(select(SeriesRevision).where(SeriesRevision.series_instance_uid == ct.series_instance_uid))
        )
    assert [(r.revision, r.state, r.instance_count) for r in revisions] == [(1, "complete", SLICES)]
    assert [(j.revision_id, j.state, j.study_instance_uid) for j in jobs] == [
        (revisions[0].id, JobState.RECEIVED, ct.study_instance_uid)
    ]
    assert jobs[0].detail == {"revision": 1, "instances": SLICES}
