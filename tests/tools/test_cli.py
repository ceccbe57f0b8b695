"""The ``gateway`` console script, run as a real process: synth, echo, send, token and serve."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import select
from starlette.exceptions import StarletteDeprecationWarning

from gateway.config import get_settings, hash_token
from gateway.export.scu import DicomFile, Peer, SendReport, send
from gateway.ingest.instance import read_received
from gateway.runtime import Gateway
from gateway.store.index import Instance
from gateway.synth.ct import write_synthetic_ct

from conftest import api_client, free_port
from peers import DCMTK_ENV, PeerProcess, dcmtk_tool

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from gateway.api.app import create_app

GATEWAY_SCRIPT = Path(sys.executable).with_name("gateway")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any ``GATEWAY_*`` setting, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}, **extra}


def gateway_cli(*args: object, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GATEWAY_SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
    )


def assert_readable_failure(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """Exit ``code``, one ``error:`` line on stderr holding every fragment, and no traceback anywhere."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output and "─" not in output, output  # neither plain nor rich tracebacks
    assert result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def stored_uids(gw: Gateway) -> set[str]:
    with gw.store.sessions() as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def port_of(gw: Gateway) -> int:
    assert gw.scp is not None
    return gw.scp.port


def test_script_is_installed() -> None:
    assert GATEWAY_SCRIPT.is_file(), f"console script not found next to {sys.executable}"


def test_synth_ct(tmp_path: Path) -> None:
    result = gateway_cli("synth", "ct", tmp_path / "out", "--slices", 5, "--size", 64, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 5 slices" in result.stdout
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [f"CT{k:06d}.dcm" for k in range(1, 6)]
    datasets = [pydicom.dcmread(f) for f in files]
    assert [int(ds.InstanceNumber) for ds in datasets] == [1, 2, 3, 4, 5]
    assert {(ds.Rows, ds.Columns, ds.Modality) for ds in datasets} == {(64, 64, "CT")}
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 5
    assert all(ds.pixel_array.shape == (64, 64) for ds in datasets)
    for f in files:
        read_received(f)  # what the gateway would accept


def test_synth_ct_refuses_a_bad_size(tmp_path: Path) -> None:
    result = gateway_cli("synth", "ct", tmp_path / "out", "--size", 8, cwd=tmp_path)
    assert result.returncode == 2
    assert "--size" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_echo(gateway: Gateway, tmp_path: Path) -> None:
    result = gateway_cli("echo", f"GATEWAY@127.0.0.1:{port_of(gateway)}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"C-ECHO to GATEWAY@127.0.0.1:{port_of(gateway)}: success" in result.stdout


def test_echo_to_a_closed_port(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = gateway_cli("echo", f"GATEWAY@127.0.0.1:{port}", cwd=tmp_path)
    assert_readable_failure(result, 1, f"127.0.0.1:{port}", "could not be reached")


def test_send_folder(gateway: Gateway, tmp_path: Path) -> None:
    ct = write_synthetic_ct(tmp_path / "ct", 6, rows=32, columns=32, n_nodules=0)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")
    peer = f"GATEWAY@127.0.0.1:{port_of(gateway)}"
    result = gateway_cli("send", tmp_path / "ct", "--to", peer, "--associations", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "6 sent, 0 failed, 1 skipped (not DICOM)"
    assert stored_uids(gateway) == set(ct.sop_instance_uids)


def test_send_to_a_closed_port_fails_each_file(tmp_path: Path) -> None:
    write_synthetic_ct(tmp_path / "ct", 3, rows=32, columns=32, n_nodules=0)
    result = gateway_cli("send", tmp_path / "ct", "--to", f"GATEWAY@127.0.0.1:{free_port()}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[-1] == "0 sent, 3 failed, 0 skipped (not DICOM)"
    assert result.stderr.count("failed: ") == 3 and "association not accepted" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("address", ["nonsense", "GATEWAY@127.0.0.1", "GATEWAY@127.0.0.1:70000", "@host:104"])
def test_send_to_a_bad_address(tmp_path: Path, address: str) -> None:
    result = gateway_cli("send", tmp_path, "--to", address, cwd=tmp_path)
    assert_readable_failure(result, 2, "expected AET@HOST:PORT", repr(address))


def test_send_a_missing_path(tmp_path: Path) -> None:
    result = gateway_cli("send", tmp_path / "nowhere", "--to", "GATEWAY@127.0.0.1:104", cwd=tmp_path)
    assert_readable_failure(result, 2, "no such file or folder", "nowhere")


def test_send_accounts_for_every_file(gateway: Gateway, tmp_path: Path) -> None:
    """A file that vanished after the scan is reported failed; the others are still sent (``gateway send``'s core)."""
    ct = write_synthetic_ct(tmp_path / "ct", 3, rows=32, columns=32, n_nodules=0)
    meta = pydicom.dcmread(tmp_path / "ct" / "CT000001.dcm", stop_before_pixels=True).file_meta
    files = [
        DicomFile(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        for path in (tmp_path / "ct" / "CT000001.dcm", tmp_path / "gone.dcm", tmp_path / "ct" / "CT000002.dcm")
    ]
    report = send(files, Peer("GATEWAY", "127.0.0.1", port_of(gateway)), associations=1, report=SendReport())
    assert report.sent == 2
    assert [path for path, _ in report.failed] == [tmp_path / "gone.dcm"]
    assert stored_uids(gateway) == set(ct.sop_instance_uids[:2])


def test_token(tmp_path: Path) -> None:
    result = gateway_cli("token", "--name", "x", "--scope", "write", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = re.search(r"^token \(.*\): (\S+)$", result.stdout, re.MULTILINE)
    assert token is not None, result.stdout
    entry = result.stdout.split("config entry (http.tokens):\n", 1)[1]
    digest = re.search(r"sha256: ([0-9a-f]{64})$", entry, re.MULTILINE)
    assert digest is not None and digest[1] == hash_token(token[1])
    assert token[1] not in entry, "the config entry holds the hash, never the token"

    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"store:\n  data_dir: {tmp_path / 'data'}\n  min_free_bytes: 0\nhttp:\n  tokens:\n{entry}", encoding="utf-8"
    )
    settings = get_settings(config)  # the printed entry, pasted under http.tokens, is valid configuration
    ((name, scopes),) = [(t.name, t.scopes) for t in settings.http.tokens]
    assert (name, scopes) == ("x", ["write"])
    with api_client(create_app(settings, start_dimse=False), headers={}) as client:
        assert client.get("/api/jobs").status_code == 401
        assert client.get("/api/jobs", headers={"Authorization": "Bearer not-the-token"}).status_code == 401
        assert client.get("/api/jobs", headers={"Authorization": f"Bearer {token[1]}"}).status_code == 200


def test_token_refuses_an_unknown_scope(tmp_path: Path) -> None:
    assert_readable_failure(gateway_cli("token", "--scope", "root", cwd=tmp_path), 2, "unknown scope", "root")


def test_serve_with_a_missing_config(tmp_path: Path) -> None:
    result = gateway_cli("serve", "--config", "missing.yaml", cwd=tmp_path)
    assert_readable_failure(result, 2, "config file not found", "missing.yaml")


@pytest.mark.parametrize(
    ("content", "env", "fragments"),
    [
        ("dicom:\n  port: 70000\n", {}, ("dicom.port", "65535")),
        ("dicom:\n  prot: 104\n", {}, ("dicom.prot", "not permitted")),
        ("", {"GATEWAY_INGEST__QUIET_PERIOD_S": "-1"}, ("ingest.quiet_period_s",)),
        ("http:\n  host: 0.0.0.0\n", {}, ("http", "tokens")),
        ("dicom: [port: 1\n", {}, ("not valid YAML", "line 2")),
        ("- dicom\n- http\n", {}, ("must hold a mapping",)),
    ],
    ids=["out-of-range", "misspelt", "env", "open-without-tokens", "bad-yaml", "not-a-mapping"],
)
def test_serve_with_an_invalid_config(
    tmp_path: Path, content: str, env: dict[str, str], fragments: tuple[str, ...]
) -> None:
    (tmp_path / "gateway.yaml").write_text(content, encoding="utf-8")
    result = gateway_cli("serve", "--config", "gateway.yaml", cwd=tmp_path, env=clean_env(**env))
    assert_readable_failure(result, 2, *fragments)
    assert not (tmp_path / "gateway-data").exists(), "nothing is created before the settings are valid"


def test_serve_with_an_invalid_flag_value(tmp_path: Path) -> None:
    result = gateway_cli("serve", "--dicom-port", 70000, cwd=tmp_path)
    assert_readable_failure(result, 2, "dicom.port")


class ServedByFlags(PeerProcess):
    """``gateway serve --data-dir D --dicom-port P --http-port H --ae-title AIGW``, listening on loopback only."""

    name = "gateway"

    def __init__(self, tmpdir: Path) -> None:
        super().__init__(tmpdir)
        self.data_dir = self.tmpdir / "data"
        self.dicom_port, self.http_port = free_port(), free_port()

    def _command(self) -> Sequence[str]:
        return [
            str(GATEWAY_SCRIPT),
            *("serve", "--data-dir", str(self.data_dir), "--dicom-port", str(self.dicom_port)),
            *("--http-port", str(self.http_port), "--ae-title", "AIGW"),
        ]

    def _env(self) -> Mapping[str, str]:
        return clean_env(
            GATEWAY_DICOM__HOST="127.0.0.1",  # loopback only; the flags do not cover the host
            GATEWAY_DICOM__REQUIRE_CALLED_AE_TITLE="true",  # so that only the --ae-title is answered
            GATEWAY_INGEST__QUIET_PERIOD_S="0.5",
            GATEWAY_INGEST__COMPLETION_POLL_S="0.1",
        )

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=10)

    def _ready(self) -> bool:
        try:
            return self.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedByFlags]:
    server = ServedByFlags(tmp_path / "run")
    server.start()
    try:
        yield server
    finally:
        server.stop()  # SIGTERM, then SIGKILL if need be: never left running


def test_serve_with_flags(served: ServedByFlags, tmp_path: Path) -> None:
    health = served.get("/healthz").json()
    assert health["status"] == "ok" and health["accepting"] is True
    assert (served.data_dir / "index.sqlite3").is_file(), "--data-dir is where the index lives"

    echo = gateway_cli("echo", f"AIGW@127.0.0.1:{served.dicom_port}", cwd=tmp_path)
    assert echo.returncode == 0, echo.stderr
    wrong = gateway_cli("echo", f"GATEWAY@127.0.0.1:{served.dicom_port}", cwd=tmp_path)
    assert_readable_failure(wrong, 1, "rejected the association")

    storescu = dcmtk_tool("storescu")
    if storescu is None:
        pytest.skip("DCMTK storescu not installed (make test installs it)")
    ct = write_synthetic_ct(tmp_path / "ct", 4, rows=32, columns=32, n_nodules=0)
    result = subprocess.run(
        [storescu, "+sd", "-aec", "AIGW", "127.0.0.1", str(served.dicom_port), str(tmp_path / "ct")],
        capture_output=True,
        text=True,
        timeout=60,
        env=DCMTK_ENV,
    )
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 20
    while not (jobs := served.get("/api/jobs").json()):
        assert time.monotonic() < deadline, "no job for the series sent by storescu"
        time.sleep(0.1)
    (job,) = jobs  # the job may already have moved on (no model is enabled: skipped), so its detail has grown
    assert job["series_instance_uid"] == ct.series_instance_uid
    detail = served.get(f"/api/jobs/{job['id']}").json()["detail"]
    assert (detail["revision"], detail["instances"]) == (1, 4)
    wado = served.get(f"/dicomweb/studies/{ct.study_instance_uid}/series/{ct.series_instance_uid}/metadata")
    assert wado.status_code == 200
    assert sorted(item["00080018"]["Value"][0] for item in wado.json()) == sorted(ct.sop_instance_uids)


ANNOUNCEMENT = "This data folder's admin token"


def test_serve_prints_the_data_folder_admin_token_once(served: ServedByFlags, tmp_path: Path) -> None:
    log = served.log_path.read_text()
    assert log.count(ANNOUNCEMENT) == 1, log
    found = re.search(r"^    (\S+)$", log.split(ANNOUNCEMENT, 1)[1], re.MULTILINE)
    assert found is not None, log
    token = found[1]
    path = served.data_dir / "admin-token.json"
    assert path.stat().st_mode & 0o777 == 0o600
    entry = json.loads(path.read_text())
    assert entry == {"name": "admin (data folder)", "sha256": hash_token(token), "scopes": ["admin"]}

    def retry(token: str | None) -> int:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        url = f"http://127.0.0.1:{served.http_port}/api/jobs/999999/retry"
        return httpx.post(url, headers=headers, timeout=10).status_code

    assert served.get("/api/jobs").status_code == 200, "reading from loopback is open while http.tokens is empty"
    assert retry(None) == 401, "changes need a token, also from loopback"
    assert retry(token) == 404, "the printed token is an admin token"

    reset = gateway_cli("token", "--reset-admin", "--data-dir", served.data_dir, cwd=tmp_path)
    assert reset.returncode == 0, reset.stderr
    new = re.search(r"^admin token \(.*\): (\S+)$", reset.stdout, re.MULTILINE)
    assert new is not None and new[1] != token, reset.stdout
    assert path.stat().st_mode & 0o777 == 0o600 and new[1] not in path.read_text()
    assert retry(token) == 401, "the running gateway no longer takes the old token"
    assert retry(new[1]) == 404, "and takes the new one without a restart"

    served.stop()
    served.start()
    assert served.log_path.read_text().count(ANNOUNCEMENT) == 1, "printed on the first start only"
    assert retry(new[1]) == 404


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_cleanly(served: ServedByFlags, sig: signal.Signals) -> None:
    proc = served.process
    assert proc is not None
    proc.send_signal(sig)
    status = proc.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the status may say so (SIGTERM).
    assert status in (0, -sig)
    served.stop()
    log = served.log_path.read_text()
    assert "Application shutdown complete" in log and "Finished server process" in log
    assert "Traceback" not in log, log


def test_serve_on_a_taken_port(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = gateway_cli(
            "serve",
            "--data-dir",
            tmp_path / "data",
            "--dicom-port",
            port,
            "--http-port",
            free_port(),
            cwd=tmp_path,
            env=clean_env(GATEWAY_DICOM__HOST="127.0.0.1"),
        )
    assert_readable_failure(result, 2, "cannot listen for DICOM", str(port))


def test_the_settings_file_may_come_from_gateway_config(tmp_path: Path) -> None:
    """In a container, ``GATEWAY_CONFIG`` names the settings file every command reads when ``--config`` is absent."""
    data = tmp_path / "from-config"
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store:\n  data_dir: {data}\n  min_free_bytes: 0\nmodels:\n  register_shipped: false\n")
    listed = gateway_cli("models", "list", cwd=tmp_path, env=clean_env(GATEWAY_CONFIG=str(config)))
    assert listed.returncode == 0, listed.stderr
    assert str(data) in listed.stderr, "the data folder the file names is the one opened"
    missing = gateway_cli("models", "list", cwd=tmp_path, env=clean_env(GATEWAY_CONFIG=str(tmp_path / "none.yaml")))
    assert_readable_failure(missing, 2, "none.yaml")
