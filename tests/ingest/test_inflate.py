"""Deflated data sets are inflated as a stream, within a limit: a deflate bomb is refused (0xA700) over C-STORE and
STOW-RS before it costs more than the limit, and an honest deflated instance is stored as received."""

from __future__ import annotations

import shutil
import threading
import tracemalloc
import uuid
from pathlib import Path

import httpx
import pytest
from inflate_cases import CT_IMAGE, bomb, deflated
from pydicom import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from gateway.config import IngestSettings, StoreSettings
from gateway.errors import InvalidInstance, OutOfResources
from gateway.ingest.instance import InflateLimit, peek_uids, read_received
from gateway.runtime import Gateway
from gateway.store.index import Instance, RefusedInstance
from gateway.store.store import InstanceStore

from conftest import ADMIN, LiveServer, make_settings
from dicom_files import dataset_bytes

MiB = 1 << 20
OUT_OF_RESOURCES = 0xA700


@pytest.fixture(scope="module")
def bomb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB of Pixel Data in about 256 KiB: the limit for it is max(16 MiB, 100 x 256 KiB) = 25 MiB."""
    return bomb(tmp_path_factory.mktemp("bomb") / "bomb.dcm")


def copy_of(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, folder / f"{uuid.uuid4().hex}.dcm"))


def refusals(store: InstanceStore) -> list[RefusedInstance]:
    with store.sessions() as session:
        return list(session.scalars(select(RefusedInstance)))


def stored(store: InstanceStore) -> list[Instance]:
    with store.sessions() as session:
        return list(session.scalars(select(Instance)))


def test_the_limit_is_a_multiple_of_the_wire_size_between_a_floor_and_a_maximum() -> None:
    limit = InflateLimit.of(IngestSettings())
    assert limit == InflateLimit(100.0, 16 * MiB, 512 * MiB)
    assert limit.allowed(1024) == 16 * MiB, "a small instance may inflate to the floor"
    assert limit.allowed(510 * 1024) == 51000 * 1024, "the issue's 510 KiB bomb: 51 MB, not 1 GiB"
    assert limit.allowed(100 * MiB) == 512 * MiB, "never beyond the maximum"
    with pytest.raises(ValueError, match="max_ratio"):
        InflateLimit(0.5, MiB, MiB)


def test_a_bomb_costs_the_store_less_than_its_limit(tmp_path: Path, bomb_file: Path) -> None:
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0))
    try:
        tracemalloc.start()
        try:
            with pytest.raises(OutOfResources) as refused:
                store.put(copy_of(bomb_file, tmp_path / "in"), source="test")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert refused.value.status == OUT_OF_RESOURCES
        assert "inflates past the limit of 26" in refused.value.reason  # 100 x its ~261 KB on the wire
        assert peak < 8 * MiB, f"inflating the bomb held {peak / MiB:.0f} MiB (its limit is 25 MiB, it holds 256)"
        assert stored(store) == []
        assert list(store.tmp_dir.iterdir()) == [], "the inflated bytes went to an unnamed file, now gone"
        (refusal,) = refusals(store)  # its UIDs are read from its first inflated megabyte
        assert refusal.sop_instance_uid == peek_uids(bomb_file).sop_instance_uid  # type: ignore[union-attr]
    finally:
        store.close()


def test_peeking_at_a_bomb_inflates_a_megabyte_at_most(bomb_file: Path) -> None:
    tracemalloc.start()
    try:
        uids = peek_uids(bomb_file)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert uids is not None and uids.sop_class_uid == CT_IMAGE and uids.series_instance_uid is not None
    assert peak < 4 * MiB


def test_a_smaller_limit_refuses_what_the_default_accepts(tmp_path: Path) -> None:
    path = bomb(tmp_path / "4mib.dcm", inflated=4 * MiB)
    assert read_received(path).transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    strict = InflateLimit(max_ratio=2, floor_bytes=MiB, max_bytes=64 * MiB)
    with pytest.raises(OutOfResources):
        read_received(path, inflate=strict)
    store = InstanceStore(
        StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0),
        ingest=IngestSettings(inflate_max_ratio=2, inflate_floor_bytes=MiB, inflate_max_bytes=64 * MiB),
    )
    try:
        with pytest.raises(OutOfResources):
            store.put(copy_of(path, tmp_path / "in"), source="test")
    finally:
        store.close()


def test_corrupt_and_truncated_deflated_data_sets_are_refused(tmp_path: Path) -> None:
    good = deflated(tmp_path / "good.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[:-20])
    (tmp_path / "junk.dcm").write_bytes(good[: len(good) - len(dataset_bytes(tmp_path / "good.dcm"))] + b"\xff" * 64)
    with pytest.raises(InvalidInstance) as cut:
        read_received(tmp_path / "cut.dcm")
    assert cut.value.status == InvalidInstance.TRUNCATED
    with pytest.raises(InvalidInstance) as junk:
        read_received(tmp_path / "junk.dcm")
    assert junk.value.status == InvalidInstance.UNPARSEABLE


# -- over the wire -----------------------------------------------------------------------------------------------


def c_store(port: int, path: Path) -> int:
    """Send the file as it is (pynetdicom reads no more than its file meta) on a Deflated CT context."""
    ae = AE(ae_title="BOMBSCU")
    ae.add_requested_context(CT_IMAGE, [DeflatedExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_bombs_over_c_store_are_refused_with_0xa700_at_a_bounded_cost(gateway: Gateway, tmp_path: Path) -> None:
    gw = gateway
    assert gw.scp is not None
    bombs = [bomb(tmp_path / f"bomb{k}.dcm") for k in range(4)]  # four at once, as in the issue
    statuses: list[int] = []
    tracemalloc.start()
    try:
        threads = [threading.Thread(target=lambda p=p: statuses.append(c_store(gw.scp.port, p))) for p in bombs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert statuses == [OUT_OF_RESOURCES] * 4
    assert peak < 64 * MiB, f"four bombs (1 GiB inflated) held {peak / MiB:.0f} MiB"
    assert stored(gw.store) == []
    sent = {peek_uids(p).sop_instance_uid for p in bombs}  # type: ignore[union-attr]
    assert {r.sop_instance_uid for r in refusals(gw.store)} == sent
    honest = deflated(tmp_path / "honest.dcm")
    assert c_store(gw.scp.port, honest) == 0x0000, "the listener carries on"
    (row,) = stored(gw.store)
    assert dataset_bytes(gw.store.path_of(row.path)) == dataset_bytes(honest), "stored as received, still deflated"


def test_a_bomb_over_stow_fails_its_part_with_0xa700(tmp_path: Path, bomb_file: Path) -> None:
    honest = deflated(tmp_path / "honest.dcm")
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = b"".join(head + p.read_bytes() + b"\r\n" for p in (bomb_file, honest)) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', **ADMIN}
    with LiveServer(make_settings(tmp_path / "data")) as server:
        response = httpx.post(f"{server.url}/dicomweb/studies", content=body, headers=headers, timeout=60)
        store: InstanceStore = server.app.state.store
        assert response.status_code == 202, response.text
        result = Dataset.from_json(response.json())
        (failed,) = result.FailedSOPSequence
        assert failed.FailureReason == OUT_OF_RESOURCES
        assert failed.ReferencedSOPInstanceUID == peek_uids(bomb_file).sop_instance_uid  # type: ignore[union-attr]
        (ok,) = result.ReferencedSOPSequence
        assert ok.ReferencedSOPInstanceUID == peek_uids(honest).sop_instance_uid  # type: ignore[union-attr]
        assert [r.sop_instance_uid for r in refusals(store)] == [failed.ReferencedSOPInstanceUID]
        (row,) = stored(store)
        assert store.path_of(row.path).read_bytes() == honest.read_bytes()
