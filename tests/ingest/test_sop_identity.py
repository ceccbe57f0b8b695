"""A data set must be what its sender declares it to be: the presentation context's SOP Class, the C-STORE request's
Affected SOP Class and Instance, the file meta's Media Storage SOP Class and Instance. Anything else is refused with
0xA900 and nothing is stored (it used to be stored with file meta that contradicted it)."""

from __future__ import annotations

import time
import uuid
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from inflate_cases import CT_IMAGE, MR_IMAGE, encoded, header, part10
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from requests.exceptions import HTTPError
from sqlalchemy import select

from gateway.errors import DataSetMismatch
from gateway.ingest.instance import read_received
from gateway.runtime import Gateway
from gateway.store.index import Instance, RefusedInstance
from gateway.store.store import InstanceStore

from conftest import ADMIN, LiveServer, make_settings

MISMATCH = 0xA900


def stored(store: InstanceStore) -> list[Instance]:
    with store.sessions() as session:
        return list(session.scalars(select(Instance)))


def nothing_left(store: InstanceStore) -> bool:
    files = [p for p in (store.data_dir / "instances").rglob("*") if p.is_file()]
    with store.sessions() as session:
        refused = list(session.scalars(select(RefusedInstance)))
    return stored(store) == [] and files == [] and list(store.tmp_dir.iterdir()) == [] and refused == []


def associate(gw: Gateway, *contexts: str) -> Association:
    assert gw.scp is not None
    ae = AE(ae_title="LIARSCU")
    for sop_class in contexts:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", gw.scp.port, ae_title="GATEWAY")
    assert assoc.is_established
    return assoc


def send_as(assoc: Association, context_class: str, affected_class: str, affected_instance: str, ds: Dataset) -> int:
    """A C-STORE built by hand, as a misbehaving SCU sends it: ``ds`` on the accepted context of
    ``context_class``, with whatever the request declares (pynetdicom's own ``send_c_store`` would not lie)."""
    (cx,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == context_class]
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = affected_class
    req.AffectedSOPInstanceUID = affected_instance
    req.DataSet = BytesIO(encoded(ds))
    assoc._reactor_checkpoint.clear()  # as Association.send_c_store does: the reactor must not take our reply
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, int(cx.context_id))  # type: ignore[arg-type]
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert rsp is not None
    return int(rsp.Status)


def test_a_ct_data_set_on_an_mr_context_is_refused(gateway: Gateway) -> None:
    ct = header()
    assoc = associate(gateway, MR_IMAGE, CT_IMAGE)
    try:
        # the request says MR, as the context does; the data set is a CT
        assert send_as(assoc, MR_IMAGE, MR_IMAGE, ct.SOPInstanceUID, ct) == MISMATCH
        # the request says CT, the data set is a CT, but the context is MR's
        assert send_as(assoc, MR_IMAGE, CT_IMAGE, ct.SOPInstanceUID, ct) == MISMATCH
        assert nothing_left(gateway.store)
        assert send_as(assoc, CT_IMAGE, CT_IMAGE, ct.SOPInstanceUID, ct) == 0x0000, "the same, sent right"
    finally:
        assoc.release()
    (row,) = stored(gateway.store)
    assert row.sop_class_uid == CT_IMAGE
    meta = pydicom.filereader.read_file_meta_info(gateway.store.path_of(row.path))
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) == (CT_IMAGE, ct.SOPInstanceUID)


def test_an_affected_sop_instance_that_is_not_the_data_sets_is_refused(gateway: Gateway) -> None:
    ct = header()
    assoc = associate(gateway, CT_IMAGE)
    try:
        assert send_as(assoc, CT_IMAGE, CT_IMAGE, generate_uid(), ct) == MISMATCH
    finally:
        assoc.release()
    assert nothing_left(gateway.store)


def test_file_meta_that_contradicts_the_data_set_is_refused(tmp_path: Path) -> None:
    ct = header()
    for name, meta in {
        "class": {"meta_sop_class": MR_IMAGE},
        "instance": {"meta_sop_instance": generate_uid()},
    }.items():
        path = part10(ct, tmp_path / f"{name}.dcm", **meta)  # type: ignore[arg-type]
        with pytest.raises(DataSetMismatch) as refused:
            read_received(path)
        assert refused.value.status == MISMATCH and name in refused.value.reason.lower()


# -- STOW-RS -------------------------------------------------------------------------------------------------------


def test_stow_fails_a_part_whose_file_meta_contradicts_its_data_set(tmp_path: Path) -> None:
    ct, other = header(), header()
    liar = part10(ct, tmp_path / "liar.dcm", meta_sop_class=MR_IMAGE)
    honest = part10(other, tmp_path / "honest.dcm")
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = b"".join(head + p.read_bytes() + b"\r\n" for p in (liar, honest)) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', **ADMIN}
    with LiveServer(make_settings(tmp_path / "data")) as server:
        response = httpx.post(f"{server.url}/dicomweb/studies", content=body, headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        result = Dataset.from_json(response.json())
        (failed,) = result.FailedSOPSequence
        assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (ct.SOPInstanceUID, MISMATCH)
        assert [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence] == [other.SOPInstanceUID]
        store: InstanceStore = server.app.state.store
        assert [row.sop_instance_uid for row in stored(store)] == [other.SOPInstanceUID]


def test_dicomweb_client_hears_the_refusal(tmp_path: Path) -> None:
    ct = header()
    ds = pydicom.dcmread(part10(ct, tmp_path / "liar.dcm", meta_sop_instance=generate_uid()))
    with LiveServer(make_settings(tmp_path / "data")) as server:
        client = DICOMwebClient(url=f"{server.url}/dicomweb", headers=ADMIN)
        with pytest.raises(HTTPError) as refused:
            client.store_instances([ds])
        assert refused.value.response.status_code == 409, "every part failed"
        (failed,) = Dataset.from_json(refused.value.response.json()).FailedSOPSequence
        assert failed.FailureReason == MISMATCH
        assert stored(server.app.state.store) == []
