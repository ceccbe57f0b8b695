"""Whether a destination answers: a C-ECHO to real DICOM nodes (DCMTK ``storescp``, pynetdicom SCPs, the gateway's
own listener over mutual TLS), a QIDO-RS search or an OPTIONS request to real HTTP servers (the gateway's DICOMweb,
Orthanc); a destination that is down is ``ok=False`` with the reason, never an exception."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pacs import StatusSCP, fast_export
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.config import DicomSettings, HttpSettings, TLSSettings, TokenSettings, hash_token
from gateway.errors import NotFound
from gateway.export.checks import DestinationCheck, check_destination
from gateway.runtime import Gateway

from conftest import LiveServer, make_settings, require_tool
from peers import Orthanc, StoreSCP, dicomweb_plugin, free_port, orthanc_binary, pki

WRITER = "check-writer-token-4b9e1c7d2a"


def dimse(port: int, ae_title: str = "PACS", **values: Any) -> dict[str, Any]:
    return {"ae_title": ae_title, "host": "127.0.0.1", "port": port, **values}


def check(name: str = "pacs", **destinations: dict[str, Any]) -> DestinationCheck:
    return check_destination(fast_export(destinations=destinations), name)


def test_c_echo_to_dcmtk_storescp_then_to_nothing(tmp_path: Path) -> None:
    require_tool("storescp")
    scp = StoreSCP(tmp_path / "storescp", aet="PACS")
    before = time.time()
    down = check(pacs=dimse(scp.dicom_port))
    assert not down.ok and down.name == "pacs" and down.at >= before
    assert down.detail.startswith("unreachable: ") and "refused" in down.detail, down.detail
    with scp:
        up = check(pacs=dimse(scp.dicom_port))
    assert up.ok and up.detail == "C-ECHO answered, status 0x0000" and up.seconds >= 0


@pytest.fixture
def verification_scp() -> Iterator[int]:
    """A pynetdicom Verification SCP that accepts only associations addressed to ``PACS``."""
    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield port
    finally:
        server.shutdown()


def test_a_rejected_association_does_not_answer(verification_scp: int) -> None:
    assert check(pacs=dimse(verification_scp)).ok
    wrong = check(pacs=dimse(verification_scp, ae_title="NOT-PACS"))
    assert not wrong.ok and wrong.detail.startswith("association rejected (Rejected Permanent"), wrong.detail
    assert "Called AE title not recognised" in wrong.detail


def test_a_node_without_verification_still_answers() -> None:
    with StatusSCP() as scp:  # storage SOP classes only
        found = check(pacs=dimse(scp.port))
    assert found.ok and found.detail == "association accepted (Verification not supported, so no C-ECHO)"


def test_c_echo_over_mutual_tls_uses_the_destination_s_tls_settings(tmp_path: Path) -> None:
    paths = pki(tmp_path / "pki")
    server_tls = TLSSettings(certificate=paths["server_cert"], private_key=paths["server_key"], ca_bundle=paths["ca"])
    node = Gateway(make_settings(tmp_path / "node", dicom=DicomSettings(host="127.0.0.1", port=0, tls=server_tls)))
    node.start()
    try:
        assert node.scp is not None
        pacs = dimse(node.scp.port, ae_title="GATEWAY")
        client = {"ca_bundle": paths["ca"], "certificate": paths["client_cert"], "private_key": paths["client_key"]}
        found = {
            name: check(name, **{name: destination})
            for name, destination in {
                "mtls": {**pacs, "tls": client},
                "no-cert": {**pacs, "tls": {"ca_bundle": paths["ca"]}},
                "plain": pacs,
                "bad-ca": {**pacs, "tls": {"ca_bundle": tmp_path / "missing.pem"}},
            }.items()
        }
    finally:
        node.stop()
    assert found["mtls"].ok and found["mtls"].detail == "C-ECHO answered, status 0x0000"
    assert not found["no-cert"].ok and not found["plain"].ok
    assert not found["bad-ca"].ok and found["bad-ca"].detail.startswith("check failed: FileNotFoundError")
    assert all("\n" not in c.detail for c in found.values())


def test_stow_destination_of_a_gateway(tmp_path: Path) -> None:
    writer = TokenSettings(name="writer", sha256=hash_token(WRITER), scopes=["write"])
    http = HttpSettings(host="127.0.0.1", port=0, tokens=[writer], anonymous_read=False)
    with LiveServer(make_settings(tmp_path / "data", http=http)) as server:
        url = f"{server.url}/dicomweb/studies"
        good = check("web", web={"stow_url": url, "token": WRITER})
        bad = check("web", web={"stow_url": url, "token": "not-the-token"})
        post_only = check("web", web={"stow_url": f"{server.url}/dicomweb/studies/1.2.3", "token": WRITER})
        nowhere = check("web", web={"stow_url": f"{server.url}/no/such/place", "token": WRITER})
    assert good.ok and good.detail == "HTTP 200 to a QIDO-RS search", good.detail
    assert not bad.ok and bad.detail == "HTTP 401 to a QIDO-RS search: the token is refused", bad.detail
    assert post_only.ok and post_only.detail == "HTTP 405 to OPTIONS", post_only.detail
    assert not nowhere.ok and nowhere.detail == "HTTP 404 to OPTIONS", nowhere.detail
    down = check("web", web={"stow_url": url})
    assert not down.ok and down.detail.startswith("unreachable: ConnectError"), down.detail


@pytest.mark.slow
def test_stow_destination_of_orthanc(tmp_path: Path) -> None:
    if orthanc_binary() is None:
        require_tool("Orthanc")
    if dicomweb_plugin() is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (make test installs orthanc-dicomweb)")
    with Orthanc(tmp_path / "orthanc") as orthanc:
        web = check("web", web={"stow_url": f"{orthanc.dicomweb_url}/studies"})
        dicom = check("orthanc", orthanc=dimse(orthanc.dicom_port, ae_title=orthanc.aet))
    assert web.ok and web.detail == "HTTP 200 to a QIDO-RS search", web.detail
    assert dicom.ok and dicom.detail == "C-ECHO answered, status 0x0000", dicom.detail


def test_an_unknown_destination_is_not_found() -> None:
    with pytest.raises(NotFound, match="no export destination 'elsewhere'"):
        check_destination(fast_export(), "elsewhere")
