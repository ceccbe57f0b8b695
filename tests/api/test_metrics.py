"""``GET /metrics``: Prometheus text scraped from a real gateway before and after real senders (DCMTK storescu,
dicomweb-client), and the scrape-time gauges against what the index holds."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.api.app import create_app
from gateway.config import JobsSettings, StoreSettings, TokenSettings, hash_token
from gateway.jobs.states import JobState
from gateway.metrics import WORKER_LABEL, GatewayMetrics
from gateway.runtime import Gateway
from gateway.store.store import InstanceStore
from gateway.synth.ct import write_synthetic_ct

from conftest import ADMIN, LiveServer, api_client, http_settings, make_settings, require_tool
from job_rows import add_delivery, add_job
from model_packages import manifest_dict, write_package
from peers import GatewayServer

Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]
READER_TOKEN = "test-metrics-reader-5d2a"


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, labels), the ``worker`` label left out: every sample of
    one exposition carries the same (the serving process's name), or none."""
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert len({s.labels.get(WORKER_LABEL) for s in samples}) <= 1, "one process per exposition"
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != WORKER_LABEL)): s.value for s in samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the exposition does not have it (a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def storescu(port: int, folder: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [require_tool("storescu"), "+sd", *options, "-aec", "GATEWAY", "127.0.0.1", str(port), str(folder)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def scp_port(gateway: Gateway) -> int:
    assert gateway.scp is not None
    return gateway.scp.port


# -- a real `gateway serve` and storescu -------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[GatewayServer]:
    sections = {"ingest": {"quiet_period_s": 0.5, "completion_poll_s": 0.1}, "jobs": {"workers": 0}}
    server = GatewayServer(tmp_path / "gw", tmp_path / "data", sections)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_storescu_series_moves_the_counters_by_exactly_its_instances(served: GatewayServer, tmp_path: Path) -> None:
    def scrape() -> Samples:
        answer = httpx.get(f"http://127.0.0.1:{served.http_port}/metrics", headers=ADMIN, timeout=10)
        assert answer.status_code == 200, answer.text
        return parse(answer.text)

    stored = {"transport": "dimse", "outcome": "stored"}
    duplicate = {"transport": "dimse", "outcome": "duplicate"}
    write_synthetic_ct(tmp_path / "ct", 12, rows=64, columns=64)
    sent = len(list((tmp_path / "ct").glob("*.dcm")))
    assert sent == 12
    before = scrape()
    result = storescu(served.dicom_port, tmp_path / "ct")
    assert result.returncode == 0, result.stderr
    after = scrape()
    assert (
        value(after, "gateway_instances_received_total", **stored)
        - value(before, "gateway_instances_received_total", **stored)
        == sent
    )
    assert value(after, "gateway_store_seconds_count") - value(before, "gateway_store_seconds_count") == sent
    assert value(after, "gateway_instances_received_total", **duplicate) == value(
        before, "gateway_instances_received_total", **duplicate
    )
    assert value(after, "gateway_accepting") == 1 and value(after, "gateway_disk_free_bytes") > 0
    assert not [name for name, _ in after if name.endswith("_created")], "no *_created samples (gateway.process)"

    wait_for(lambda: value(scrape(), "gateway_jobs", state="received") == 1, "the series' job")
    waiting = scrape()
    assert value(waiting, "gateway_queue_oldest_seconds") >= 0
    assert sum(value(waiting, "gateway_jobs", state=s.value) for s in JobState) == 1

    result = storescu(served.dicom_port, tmp_path / "ct")  # the same instances again
    assert result.returncode == 0, result.stderr
    again = scrape()
    assert (
        value(again, "gateway_instances_received_total", **duplicate)
        - value(after, "gateway_instances_received_total", **duplicate)
        == sent
    )
    assert value(again, "gateway_instances_received_total", **stored) == value(
        after, "gateway_instances_received_total", **stored
    )


# -- in-process gateways ------------------------------------------------------------------------------------------


def test_metrics_need_a_read_token_when_anonymous_read_is_off(tmp_path: Path) -> None:
    reader = TokenSettings(name="prometheus", sha256=hash_token(READER_TOKEN), scopes=["read"])
    admin = http_settings().tokens[0]
    settings = make_settings(tmp_path / "data", http=http_settings(tokens=[admin, reader], anonymous_read=False))
    app = create_app(settings, start_dimse=False)
    with api_client(app, headers={}) as client:
        assert client.get("/metrics").status_code == 401
        answer = client.get("/metrics", headers={"Authorization": f"Bearer {READER_TOKEN}"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {family.name for family in text_string_to_metric_families(answer.text)}
    assert {
        "gateway_instances_received",
        "gateway_store_seconds",
        "gateway_jobs",
        "gateway_job_stage_seconds",
        "gateway_queue_oldest_seconds",
        "gateway_inference_batch_size",
        "gateway_inference_seconds",
        "gateway_deliveries",
        "gateway_export_attempts",
        "gateway_jobs_undelivered",
        "gateway_disk_free_bytes",
        "gateway_accepting",
    } <= families


def test_the_jobs_and_deliveries_gauges_count_what_the_index_holds(gateway: Gateway) -> None:
    waiting_since = time.time() - 120
    states = {"received": 3, "exported": 5, "failed": 2}
    ids = [
        add_job(gateway.store, state=state, created_at=waiting_since, last_received_at=waiting_since - 10)
        for state, n in states.items()
        for _ in range(n)
    ]
    queue = {("pacs", "delivered"): 4, ("pacs", "dead"): 1, ("archive", "pending"): 2}
    for (destination, state), n in queue.items():
        for _ in range(n):
            add_delivery(gateway.store, ids[-1], state=state, destination=destination)
    samples = parse(gateway.metrics.render().decode())
    expected = {state.value: 0 for state in JobState} | {"received": 3, "exported": 5, "failed": 2}
    assert {s: value(samples, "gateway_jobs", state=s) for s in expected} == expected
    assert {k: value(samples, "gateway_deliveries", destination=k[0], state=k[1]) for k in queue} == queue
    assert value(samples, "gateway_queue_oldest_seconds") >= 120


def test_refused_instances_count_as_refused_and_ingest_as_not_accepting(tmp_path: Path) -> None:
    full = StoreSettings(data_dir=tmp_path / "data", min_free_bytes=1 << 60)  # more than any disk has
    gateway = Gateway(make_settings(tmp_path / "data", store=full))
    gateway.start()
    try:
        write_synthetic_ct(tmp_path / "ct", 3, rows=32, columns=32, n_nodules=0)
        storescu(scp_port(gateway), tmp_path / "ct", "--no-halt")  # each refused, whatever the exit status
        samples = parse(gateway.metrics.render().decode())
        recent = gateway.metrics.recent_ingest()
    finally:
        gateway.stop()
    assert value(samples, "gateway_instances_received_total", transport="dimse", outcome="refused") == 3
    assert value(samples, "gateway_instances_received_total", transport="dimse", outcome="stored") == 0
    assert value(samples, "gateway_store_seconds_count") == 0
    assert value(samples, "gateway_accepting") == 0
    assert (recent.received_hour, recent.refused_hour, recent.received_day, recent.refused_day) == (0, 3, 0, 3)


def test_stow_counts_each_part_stored_or_duplicate(tmp_path: Path) -> None:
    write_synthetic_ct(tmp_path / "ct", 4, rows=32, columns=32, n_nodules=0)
    datasets = [pydicom.dcmread(p) for p in sorted((tmp_path / "ct").glob("*.dcm"))]
    with LiveServer(make_settings(tmp_path / "data")) as server:
        client = DICOMwebClient(f"{server.url}/dicomweb", headers=ADMIN)
        client.store_instances(datasets)
        client.store_instances(datasets[:2])
        recent = server.app.state.gateway.metrics.recent_ingest()
        samples = parse(httpx.get(f"{server.url}/metrics", headers=ADMIN, timeout=10).text)
    assert value(samples, "gateway_instances_received_total", transport="stow", outcome="stored") == 4
    assert value(samples, "gateway_instances_received_total", transport="stow", outcome="duplicate") == 2
    assert (recent.received_hour, recent.refused_hour) == (6, 0)


def test_a_job_is_timed_per_stage_and_its_model_per_batch(tmp_path: Path) -> None:
    gateway = Gateway(make_settings(tmp_path / "data", jobs=JobsSettings(workers=1, poll_s=0.1)))
    model = gateway.registry.register(write_package(tmp_path / "tiny", manifest_dict("tiny-seg")))
    ref = f"{model.name}@{model.version}"
    gateway.start()
    try:
        write_synthetic_ct(tmp_path / "ct", 8, rows=32, columns=32)
        assert storescu(scp_port(gateway), tmp_path / "ct").returncode == 0

        def stage_count(stage: str, model: str = "") -> float:
            samples = parse(gateway.metrics.render().decode())
            return value(samples, "gateway_job_stage_seconds_count", stage=stage, model=model)

        wait_for(lambda: stage_count("encode") == 1, "the job's encode stage")
        samples = parse(gateway.metrics.render().decode())
    finally:
        gateway.stop()
    for stage, model_label in (("assemble", ""), ("infer", ""), ("infer", ref), ("encode", "")):
        assert value(samples, "gateway_job_stage_seconds_count", stage=stage, model=model_label) == 1, stage
    passes = value(samples, "gateway_inference_batch_size_count", model=ref)
    assert passes >= 1
    assert value(samples, "gateway_inference_seconds_count", model=ref) == passes
    assert value(samples, "gateway_inference_batch_size_sum", model=ref) >= passes
    assert value(samples, "gateway_jobs_undelivered_total") == 1  # no destination is configured


def test_recent_ingest_keeps_the_last_hour_and_day_to_the_minute() -> None:
    metrics = GatewayMetrics()
    for outcome in ("stored", "stored", "duplicate", "refused", "invalid"):
        metrics.instance_received("dimse", outcome)
    now = time.time()
    assert metrics.recent_ingest(now) == metrics.recent_ingest(now)
    fresh = metrics.recent_ingest(now)
    assert (fresh.received_hour, fresh.refused_hour, fresh.received_day, fresh.refused_day) == (3, 2, 3, 2)
    later = metrics.recent_ingest(now + 2 * 3600)
    assert (later.received_hour, later.refused_hour, later.received_day, later.refused_day) == (0, 0, 3, 2)
    gone = metrics.recent_ingest(now + 25 * 3600)
    assert (gone.received_day, gone.refused_day) == (0, 0)
    assert fresh.started_at <= now


def test_each_gateway_has_its_own_registry() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.instance_received("stow", "stored")
    first.export_attempt("pacs", "delivered")
    first.job_undelivered()
    assert (
        value(parse(first.render().decode()), "gateway_instances_received_total", transport="stow", outcome="stored")
        == 1
    )
    theirs = parse(second.render().decode())
    assert value(theirs, "gateway_instances_received_total", transport="stow", outcome="stored") == 0
    assert (
        value(parse(first.render().decode()), "gateway_export_attempts_total", destination="pacs", outcome="delivered")
        == 1
    )
    assert value(parse(first.render().decode()), "gateway_jobs_undelivered_total") == 1


def test_every_sample_carries_the_worker_label_so_processes_do_not_collide(tmp_path: Path) -> None:
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0))
    try:
        add_job(store, state="received")
        names = ("gpu-1/41/aa11bb22", "web-1/7/cc33dd44")
        processes = [GatewayMetrics(sessions=store.sessions, job_states=["received"], worker=name) for name in names]
        for metrics in processes:
            metrics.instance_received("stow", "stored", 0.01)
            metrics.job_stage("infer", "tiny@1", 2.0)
        texts = [metrics.render().decode() for metrics in processes]
    finally:
        store.close()
    for name, text in zip(names, texts, strict=True):
        families = list(text_string_to_metric_families(text))
        samples = [s for family in families for s in family.samples]
        assert {f.name for f in families} >= {"gateway_instances_received", "gateway_job_stage_seconds", "gateway_jobs"}
        assert samples and all(s.labels.get(WORKER_LABEL) == name for s in samples), name
        labelled = [(s.name, s.labels) for s in samples]
        assert (
            "gateway_job_stage_seconds_bucket",
            {"stage": "infer", "model": "tiny@1", "le": "2.5", WORKER_LABEL: name},
        ) in labelled
        assert ("gateway_jobs", {"state": "received", WORKER_LABEL: name}) in labelled
    keys = [
        {(s.name, frozenset(s.labels.items())) for f in text_string_to_metric_families(t) for s in f.samples}
        for t in texts
    ]
    assert not keys[0] & keys[1], "the two processes' series are told apart by the label"
    assert (
        processes[0].registry.get_sample_value(
            "gateway_instances_received_total", {"transport": "stow", "outcome": "stored"}
        )
        == 1
    ), "the registry itself keeps its samples without it"
    with pytest.raises(ValueError, match="worker"):
        GatewayMetrics(worker="")


def test_without_a_worker_name_the_samples_have_no_worker_label() -> None:
    metrics = GatewayMetrics()
    metrics.job_undelivered()
    samples = [s for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples]
    assert samples and all(WORKER_LABEL not in s.labels for s in samples)
