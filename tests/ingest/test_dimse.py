"""The Storage SCP against real senders: DCMTK storescu/echoscu and pynetdicom, on loopback."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from gateway.config import AllowedCaller, DicomSettings, StoreSettings
from gateway.export.scu import DicomFile, Peer, SendReport, echo, scan, send
from gateway.runtime import Gateway
from gateway.store.index import Instance

from conftest import make_settings, require_tool
from dicom_files import (
    RELABELLED,
    SAMPLES,
    dataset_bytes,
    garbage_body,
    minimal_ct,
    overlong_element,
    prepared,
    sample,
    truncated,
)

ALL_SYNTAXES = sorted({*SAMPLES, *RELABELLED})


def peer_of(gw: Gateway, ae_title: str = "GATEWAY") -> Peer:
    assert gw.scp is not None
    return Peer(ae_title, "127.0.0.1", gw.scp.port)


def as_sent(path: Path) -> DicomFile:
    """What the SCU sends, from the file meta alone: the data set itself may be deliberately broken."""
    meta = read_file_meta_info(path)
    return DicomFile(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))


def store_files(gw: Gateway, *paths: Path, calling_ae: str = "TESTSCU") -> SendReport:
    return send([as_sent(p) for p in paths], peer_of(gw), associations=1, calling_ae=calling_ae)


def stored_rows(gw: Gateway) -> list[Instance]:
    with gw.store.sessions() as session:
        return list(session.scalars(select(Instance)))


def leftover_files(gw: Gateway) -> list[Path]:
    data = gw.store.data_dir
    return [p for p in (data / "tmp").iterdir()] + [p for p in (data / "instances").rglob("*") if p.is_file()]


@pytest.fixture
def custom_gateway(tmp_path: Path):
    started: list[Gateway] = []

    def start(**sections: object) -> Gateway:
        gw = Gateway(make_settings(tmp_path / f"data{len(started)}", **sections))
        gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def test_echoscu(gateway: Gateway) -> None:
    echoscu = require_tool("echoscu")
    result = subprocess.run(
        [echoscu, "-aec", "GATEWAY", "127.0.0.1", str(peer_of(gateway).port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_pynetdicom_echo(gateway: Gateway) -> None:
    assert echo(peer_of(gateway)) == 0


@pytest.mark.parametrize("ts", ALL_SYNTAXES)
def test_every_transfer_syntax_is_stored_as_received(gateway: Gateway, tmp_path: Path, ts: str) -> None:
    src = prepared(ts, tmp_path / "in.dcm")
    report = store_files(gateway, src)
    assert report.sent == 1, report.failed
    (row,) = stored_rows(gateway)
    assert row.transfer_syntax_uid == ts
    stored = gateway.store.path_of(row.path)
    assert dataset_bytes(stored) == dataset_bytes(src)
    assert str(pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts


# storescu proposes compressed syntaxes only when asked, one option per syntax.
STORESCU_OPTIONS = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


@pytest.mark.parametrize("ts", sorted(STORESCU_OPTIONS))
def test_storescu_sends_each_syntax(gateway: Gateway, tmp_path: Path, ts: str) -> None:
    storescu = require_tool("storescu")
    src = prepared(ts, tmp_path / "in.dcm")
    result = subprocess.run(
        [
            storescu,
            STORESCU_OPTIONS[ts],
            "-aec",
            "GATEWAY",
            "127.0.0.1",
            str(peer_of(gateway).port),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (row,) = stored_rows(gateway)
    assert row.transfer_syntax_uid == ts, "the gateway must accept the syntax proposed, not force a transcode"
    original = pydicom.dcmread(src)
    stored = pydicom.dcmread(gateway.store.path_of(row.path))
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert stored.PixelData == original.PixelData


def test_storescu_folder_of_real_series(gateway: Gateway, shared_data: Path) -> None:
    storescu = require_tool("storescu")
    folder = next((shared_data / "dcm_qa_decubitus" / "In" / "HFS").glob("*t1_fl2d_sag"))
    expected = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in folder.iterdir()}
    result = subprocess.run(
        [storescu, "+sd", "-aec", "GATEWAY", "127.0.0.1", str(peer_of(gateway).port), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert {r.sop_instance_uid for r in stored_rows(gateway)} == expected


def test_concurrent_associations(gateway: Gateway, tmp_path: Path) -> None:
    paths = [
        minimal_ct(tmp_path / f"{i}.dcm", StudyInstanceUID="1.2.3.4", SeriesInstanceUID="1.2.3.4.5") for i in range(24)
    ]
    report = SendReport()
    send(scan(paths, report), peer_of(gateway), associations=6, report=report)
    assert report.sent == 24 and not report.failed
    assert len(stored_rows(gateway)) == 24


def test_duplicate_is_acknowledged_without_second_copy(gateway: Gateway) -> None:
    src = sample("1.2.840.10008.1.2.1")
    assert store_files(gateway, src).sent == 1
    assert store_files(gateway, src).sent == 1, "a duplicate is acknowledged with success"
    assert len(stored_rows(gateway)) == 1
    assert len(list((gateway.store.data_dir / "instances").rglob("*.dcm"))) == 1


def test_low_disk_gives_out_of_resources_and_leaves_nothing(custom_gateway, tmp_path: Path) -> None:
    gw = custom_gateway(store=StoreSettings(data_dir=tmp_path / "full", min_free_bytes=1 << 62))
    report = store_files(gw, sample("1.2.840.10008.1.2.1"))
    assert report.sent == 0
    assert "0xA700" in report.failed[0][1]
    assert stored_rows(gw) == []
    assert leftover_files(gw) == []


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (lambda src, d: garbage_body(src, d), 0xC002),
        (lambda src, d: truncated(src, d), 0xC002),
        (lambda src, d: overlong_element(src, d), 0xC002),
        (lambda src, d: minimal_ct(d, drop=("StudyInstanceUID",)), 0xC001),
        (lambda src, d: minimal_ct(d, drop=("SeriesInstanceUID",)), 0xC001),
        (lambda src, d: minimal_ct(d, SeriesInstanceUID="1.2.abc"), 0xC003),
    ],
    ids=["garbage", "truncated", "overlong-element", "no-study-uid", "no-series-uid", "bad-uid"],
)
def test_bad_instances_are_refused(gateway: Gateway, tmp_path: Path, make, status: int) -> None:
    bad = make(sample("1.2.840.10008.1.2.1"), tmp_path / "bad.dcm")
    report = store_files(gateway, bad)
    assert report.sent == 0
    assert f"0x{status:04X}" in report.failed[0][1]
    assert stored_rows(gateway) == []
    assert leftover_files(gateway) == []
    assert store_files(gateway, sample("1.2.840.10008.1.2.1")).sent == 1, "the server keeps serving"


def test_no_patient_data_in_logs(gateway: Gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    good = minimal_ct(tmp_path / "good.dcm", patient_name="SECRET^PATIENT")
    bad = minimal_ct(tmp_path / "bad.dcm", patient_name="SECRET^PATIENT", drop=("StudyInstanceUID",))
    store_files(gateway, good, bad)
    assert caplog.records, "ingest logs something at INFO"
    assert "SECRET" not in caplog.text and "PID-12345" not in caplog.text


def test_calling_ae_allow_list_with_host(custom_gateway) -> None:
    gw = custom_gateway(
        dicom=DicomSettings(
            host="127.0.0.1",
            port=0,
            allowed_callers=[
                AllowedCaller(ae_title="PACS", host="127.0.0.1"),
                AllowedCaller(ae_title="FAR", host="192.0.2.7"),
            ],
        )
    )
    src = sample("1.2.840.10008.1.2.1")
    assert store_files(gw, src, calling_ae="INTRUDER").failed[0][1] == "association not accepted"
    assert store_files(gw, src, calling_ae="FAR").failed[0][1] == "association not accepted", "bound to another host"
    assert store_files(gw, src, calling_ae="PACS").sent == 1


def test_called_ae_title_check(custom_gateway) -> None:
    gw = custom_gateway(dicom=DicomSettings(host="127.0.0.1", port=0, require_called_ae_title=True))
    with pytest.raises(ConnectionError):
        echo(Peer("SOMEONE", "127.0.0.1", gw.scp.port))
    assert echo(Peer("GATEWAY", "127.0.0.1", gw.scp.port)) == 0


def test_association_limit(custom_gateway) -> None:
    gw = custom_gateway(dicom=DicomSettings(host="127.0.0.1", port=0, max_associations=2))
    held = []
    try:
        for _ in range(2):
            ae = AE(ae_title="HOLDER")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", gw.scp.port, ae_title="GATEWAY")
            assert assoc.is_established
            held.append(assoc)
        with pytest.raises(ConnectionError):
            echo(peer_of(gw))
    finally:
        for assoc in held:
            assoc.release()
    deadline = time.monotonic() + 10  # the acceptor threads of the released associations wind down first
    while True:
        try:
            assert echo(peer_of(gw)) == 0, "a freed slot is usable again"
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_odd_values_are_stored_and_not_logged(
    gateway: Gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    odd = minimal_ct(tmp_path / "odd.dcm", PatientID="SECRET-ID-" + "9" * 80, PatientBirthDate="1970-01-01")
    caplog.clear()  # writing the file above may warn; receiving it must not
    assert store_files(gateway, odd).sent == 1, "odd but readable values are stored as received"
    assert "SECRET" not in caplog.text and "1970" not in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("pydicom")], "pydicom does not log received values"
