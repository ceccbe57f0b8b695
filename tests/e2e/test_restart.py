"""End to end: a gateway killed (``kill -9``) between encode and export sends every result once after a restart.

A real ``gateway serve`` process (ct-tissue registered and enabled with ``gateway models register`` and ``gateway
models enable`` before it starts) receives a small synthetic CT by ``gateway send``, assembles it, runs the model
and encodes a SEG, its TID 1500 SR, the outlines (GSPS) and key objects (KOS), whose deliveries go to an Orthanc
that is not running yet: they fail and are retried. Once at least one attempt has
failed, the gateway is killed with SIGKILL, Orthanc starts on the destination's ports, and the gateway restarts on
the same data folder. Then Orthanc must hold exactly the job's outputs, one series each, every delivery must have
succeeded exactly once, and the job must be ``exported`` without being run again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.synth.ct import write_synthetic_ct

from conftest import require_tool
from peers import Orthanc, OrthancOn, PeerProcess, ServedGateway, free_port, orthanc_binary, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "ct-tissue"
DESTINATION = "pacs"
MODALITIES = {"SEG": "SEG", "SR": "SR", "GSPS": "PR", "KO": "KO"}  # output kind -> Modality in Orthanc


@pytest.fixture
def need_orthanc() -> None:
    if orthanc_binary() is None:
        require_tool("Orthanc")


@pytest.fixture
def cleanup() -> Iterator[list[PeerProcess]]:
    """Peers to stop at the end, whatever happened."""
    peers: list[PeerProcess] = []
    try:
        yield peers
    finally:
        for peer in reversed(peers):
            peer.stop()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float, gateway: ServedGateway) -> None:
    """Poll ``condition``; fail with the gateway's log tail at the deadline or if it exits."""
    try:
        wait_until(condition, timeout_s=timeout_s, what=what, alive=lambda: gateway.alive)
    except Exception as exc:
        pytest.fail(f"{exc}\n--- gateway log ---\n{gateway.log_path.read_text(errors='replace')[-4000:]}")


def only_job(gateway: ServedGateway) -> dict[str, Any]:
    """The gateway's one job, with its deliveries."""
    jobs = gateway.api("/jobs")
    assert len(jobs) == 1, [(j["id"], j["state"]) for j in jobs]
    job: dict[str, Any] = gateway.api(f"/jobs/{jobs[0]['id']}")
    return job


def encoded_and_failed(gateway: ServedGateway) -> bool:
    """Whether the job is ``encoded`` and every delivery has failed at least once."""
    jobs = gateway.api("/jobs")
    if not jobs:
        return False
    job = gateway.api(f"/jobs/{jobs[0]['id']}")
    assert job["state"] in ("received", "assembling", "assembled", "inferring", "inferred", "encoding", "encoded"), (
        job["state"],
        job["detail"].get("failure"),
    )
    deliveries = job["deliveries"]
    failed = [d for d in deliveries if any(h["outcome"] == "retry" for h in d["history"])]
    return job["state"] == "encoded" and bool(deliveries) and len(failed) == len(deliveries)


def orthanc_series(orthanc: Orthanc) -> dict[str, list[str]]:
    """{Modality: [SeriesInstanceUID, ...]} of every series Orthanc holds."""
    held: dict[str, list[str]] = {}
    for series in orthanc.rest("GET", "/series?expand"):
        tags = series["MainDicomTags"]
        held.setdefault(tags.get("Modality", ""), []).append(tags["SeriesInstanceUID"])
    return held


def orthanc_instances(orthanc: Orthanc) -> list[str]:
    """The SOP Instance UID of every instance Orthanc holds (duplicates kept)."""
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.rest("GET", "/instances?expand")]


def test_killed_between_encode_and_export(need_orthanc: None, tmp_path: Path, cleanup: list[PeerProcess]) -> None:
    pacs_http, pacs_dicom = free_port(), free_port()
    sections = {
        "ingest": {"quiet_period_s": 1.0, "completion_poll_s": 0.2},
        "jobs": {"workers": 1, "poll_s": 0.2},
        "export": {
            "destinations": {DESTINATION: {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_dicom}},
            "default": [DESTINATION],
            "backoff_initial_s": 0.2,
            "backoff_max_s": 0.5,
            "max_attempts": 1000,  # never dead while the PACS is down
            "poll_s": 0.1,
            "timeout_s": 10.0,
            "workers": 1,
        },
    }
    data = tmp_path / "data"
    first = ServedGateway(tmp_path / "run1", data, sections)
    cleanup.append(first)
    registered = first.cli("models", "register", str(MODEL), "--config", str(first.config_path))
    assert registered.startswith("ct-tissue@"), registered
    enabled = first.cli("models", "enable", "ct-tissue", "--config", str(first.config_path))  # on purpose
    assert enabled.startswith("ct-tissue@") and "enabled" in enabled, enabled
    write_synthetic_ct(tmp_path / "ct", 16, rows=96, columns=96, seed=3)

    first.start()
    sent = first.cli("send", str(tmp_path / "ct"), "--to", first.address, "--associations", "1")
    assert "16 sent, 0 failed" in sent, sent
    wait_for(lambda: encoded_and_failed(first), "job encoded, every delivery failed once", 240, first)
    before = only_job(first)
    first.kill9()

    orthanc = OrthancOn(tmp_path / "orthanc", pacs_http, pacs_dicom, dicomweb=False)
    cleanup.append(orthanc)
    orthanc.start()
    assert orthanc_instances(orthanc) == []
    second = ServedGateway(tmp_path / "run2", data, sections)
    cleanup.append(second)
    second.start()
    wait_for(lambda: set(MODALITIES.values()) <= orthanc_series(orthanc).keys(), "all results in Orthanc", 120, second)
    wait_for(lambda: only_job(second)["state"] != "encoded", "job settled", 60, second)

    after = only_job(second)
    assert after["state"] == "exported", after["detail"]
    outputs = after["detail"]["outputs"]
    assert outputs == before["detail"]["outputs"], "the job was encoded again after the restart"
    assert sorted(o["kind"] for o in outputs) == sorted(MODALITIES)
    assert after["detail"]["export"]["delivered"] == len(outputs) == len(after["deliveries"])
    for delivery in after["deliveries"]:
        outcomes = [h["outcome"] for h in delivery["history"]]
        assert delivery["state"] == "delivered" and outcomes.count("delivered") == 1, delivery
        assert outcomes[-1] == "delivered" and "retry" in outcomes, outcomes  # failed while down, then delivered
    held = orthanc_instances(orthanc)
    assert sorted(held) == sorted(o["SOPInstanceUID"] for o in outputs), "Orthanc holds exactly the job's outputs"
    series = orthanc_series(orthanc)
    assert sorted(series) == sorted(MODALITIES.values()), series
    expected = {MODALITIES[o["kind"]]: [o["SeriesInstanceUID"]] for o in outputs}
    assert series == expected, "one series per output, the job's own"
    second.stop()
