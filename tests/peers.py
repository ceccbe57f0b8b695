"""Real DICOM peers on loopback as context managers: Orthanc, DCMTK ``storescp``, a minimal pynetdicom SCP, and
the gateway itself served by its console script.

Helpers for tests and benchmarks (``bench/ingest.py``), not tests. Each peer runs in its own process and
session (process group) on free ports of 127.0.0.1; leaving the ``with`` block stops it (SIGTERM to the
group, then SIGKILL), whatever happened inside. Each peer's output goes to a log file in its folder; when a
peer fails to start, the error carries the tail of that log.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: Largest PDU that every peer accepts (DCMTK's and Orthanc's ceiling); benchmarks use it for all targets.
MAX_PDU = 131_072

#: Environment for DCMTK-based programs (storescu, storescp, Orthanc). Debian's DCMTK 3.6.7 leaves Nagle's
#: algorithm on unless ``TCP_NODELAY=1``: every C-STORE then waits on delayed ACKs (~40 ms each way).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

#: The admin token of the gateways the tests run (configured as its SHA-256), and the header that sends it.
ADMIN_TOKEN = "test-admin-token-8c1f4e2a9b7d43c6a5e0"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ADMIN_ENTRY = {"name": "test-admin", "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(), "scopes": ["admin"]}

#: The ``gateway`` console script installed beside the running interpreter.
GATEWAY_SCRIPT = Path(sys.executable).with_name("gateway")

_STARTUP_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0
_DICOMWEB_PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
)


_EXITED = "the process exited"


class PeerError(RuntimeError):
    """A peer did not start (its log's tail is in the message) or is missing."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_tool(name: str) -> str | None:
    """Path of DCMTK's ``name`` on ``PATH``, skipping namesakes (pynetdicom installs a ``storescu`` too)."""
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = Path(folder or ".") / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=10)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return str(candidate)
    return None


def orthanc_binary() -> str | None:
    """Path of the ``Orthanc`` server binary, if installed (Debian puts it in ``/usr/sbin``)."""
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/local/sbin:/usr/sbin")


def dicomweb_plugin() -> Path | None:
    """Path of Orthanc's DICOMweb plugin (Debian package ``orthanc-dicomweb``), if installed."""
    for pattern in _DICOMWEB_PLUGIN_GLOBS:
        for found in sorted(glob.glob(pattern)):
            if Path(found).is_file():
                return Path(found)
    return None


def wait_until(
    ready: Callable[[], bool], *, timeout_s: float, what: str, alive: Callable[[], bool] = lambda: True
) -> None:
    """Poll ``ready`` until true; :class:`PeerError` at the deadline or as soon as ``alive`` turns false."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not ready():
        if not alive():
            raise PeerError(f"{what}: {_EXITED}")
        if time.monotonic() > deadline:
            raise PeerError(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def tcp_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def dicom_echo(port: int, called_aet: str, *, calling_aet: str = "ECHOSCU", timeout_s: float = 5.0) -> bool:
    """One C-ECHO with DCMTK ``echoscu`` to ``127.0.0.1:port``; whether it succeeded."""
    echoscu = dcmtk_tool("echoscu")
    if echoscu is None:
        raise PeerError("DCMTK echoscu not installed")
    timeout = str(max(1, round(timeout_s)))
    cmd = [
        echoscu,
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        "-to",
        timeout,
        "-ta",
        timeout,
        "-td",
        timeout,
        "127.0.0.1",
        str(port),
    ]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout_s + 5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (empty if there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class PeerProcess:
    """A child process in its own session with its output in a log file; stopped with its whole group.

    Subclasses build the command line in :meth:`_command` and say when the peer is ready in :meth:`_ready`.
    """

    name = "peer"

    def __init__(self, tmpdir: Path) -> None:
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.tmpdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _command(self) -> Sequence[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _env(self) -> Mapping[str, str] | None:
        return None

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """Start the process and wait until it is ready; stops it and raises :class:`PeerError` otherwise."""
        self._log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                list(self._command()),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                env=self._env(),
                start_new_session=True,
            )
            wait_until(self._ready, timeout_s=timeout_s, what=self.name, alive=lambda: self.alive)
        except BaseException as exc:
            self.stop()
            if isinstance(exc, PeerError):
                raise PeerError(f"{exc}; log {self.log_path}:\n{log_tail(self.log_path)}") from None
            raise

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it is still there after a grace period; close the log."""
        proc, self.process = self.process, None
        if proc is not None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=_STOP_TIMEOUT_S)
            _signal_group(proc, signal.SIGKILL)  # children forked per association (storescp --fork)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class Orthanc(PeerProcess):
    """An Orthanc server (``Orthanc`` binary, 1.10 or later) with a temporary configuration.

    Storage and index live in ``tmpdir``; the HTTP and DICOM ports are free ports. Orthanc 1.10 has no option
    to choose the listening address, so it listens on all interfaces; ``RemoteAccessAllowed: false`` makes its
    REST API answer loopback clients only, and the peers it sends to are the ``modalities`` given here. Its
    DICOM side is DCMTK's, run with Nagle's algorithm off (:data:`DCMTK_ENV`).

    Parameters
    ----------
    tmpdir
        Folder for the configuration, storage, index and log.
    dicom_aet
        Orthanc's AE title.
    modalities
        DICOM modalities Orthanc knows, ``{id: (AE title, host, port)}``; ``/modalities/{id}/store``
        sends there.
    dicomweb
        Load the DICOMweb plugin (root ``/dicom-web/``); :class:`PeerError` if it is not installed.
    max_pdu
        ``MaximumPduLength``: the largest PDU Orthanc accepts and sends.
    settings
        Further configuration entries, merged over the ones above.
    """

    name = "orthanc"

    def __init__(
        self,
        tmpdir: Path,
        *,
        dicom_aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        dicomweb: bool = True,
        max_pdu: int = MAX_PDU,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tmpdir)
        binary = orthanc_binary()
        if binary is None:
            raise PeerError("the Orthanc binary is not installed (Debian package orthanc)")
        self.binary = binary
        self.aet = dicom_aet
        self.modalities = dict(modalities or {})
        self.dicomweb = dicomweb
        self.max_pdu = max_pdu
        self.extra = dict(settings or {})
        self.http_port = 0
        self.dicom_port = 0
        self.config_path = self.tmpdir / "orthanc.json"
        self._client: httpx.Client | None = None

    @property
    def http_url(self) -> str:
        """Base URL of the REST API, without a trailing slash."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb plugin (``.../dicom-web``)."""
        return f"{self.http_url}/dicom-web"

    def config(self) -> dict[str, Any]:
        """The configuration written to ``orthanc.json``."""
        config: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.tmpdir / "storage"),
            "IndexDirectory": str(self.tmpdir / "index"),
            "TemporaryDirectory": str(self.tmpdir / "tmp"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "MaximumPduLength": self.max_pdu,
            "DicomModalities": {k: [aet, host, port] for k, (aet, host, port) in self.modalities.items()},
            "SaveJobs": False,
            "Plugins": [],
        }
        if self.dicomweb:
            plugin = dicomweb_plugin()
            if plugin is None:
                raise PeerError("Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
            config["Plugins"] = [str(plugin)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False}
        config.update(self.extra)
        return config

    def _command(self) -> Sequence[str]:
        return [self.binary, str(self.config_path)]

    def _env(self) -> Mapping[str, str]:
        return DCMTK_ENV

    def _ready(self) -> bool:
        try:
            return self.client.get("/system", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def client(self) -> httpx.Client:
        """An HTTP client for the REST API (closed when Orthanc stops)."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.http_url, timeout=120.0)
        return self._client

    def start(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """Write the configuration and start; if Orthanc exits at once (a port taken), retry on new ports."""
        for attempt in range(3):
            self.http_port, self.dicom_port = free_port(), free_port()
            (self.tmpdir / "tmp").mkdir(exist_ok=True)
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            try:
                super().start(timeout_s)
                return
            except PeerError as exc:
                if attempt == 2 or _EXITED not in str(exc):
                    raise

    def stop(self) -> None:
        """Stop the server and close the HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None
        super().stop()

    def rest(self, method: str, path: str, json: Any = None, *, content: bytes | None = None) -> Any:
        """Call the REST API; return the decoded JSON answer (bytes if it is not JSON).

        ``json`` is sent as JSON, or as it is when it is ``bytes`` (``POST /instances`` takes a file's bytes).

        Raises
        ------
        httpx.HTTPStatusError
            On an error status; the message includes Orthanc's explanation.
        """
        if isinstance(json, bytes | bytearray):
            json, content = None, bytes(json)
        response = self.client.request(method, path, json=json, content=content)
        if response.is_error:
            raise httpx.HTTPStatusError(
                f"{method} {path}: {response.status_code} {response.text[:2000]}",
                request=response.request,
                response=response,
            )
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content


class OrthancOn(Orthanc):
    """Orthanc on ports chosen before it starts, so that a destination can name it while it is down.

    ``kwargs`` are :class:`Orthanc`'s. Unlike :class:`Orthanc`, it does not move to other ports when one is taken.
    """

    def __init__(self, tmpdir: Path, http_port: int, dicom_port: int, **kwargs: Any) -> None:
        super().__init__(tmpdir, **kwargs)
        self.http_port, self.dicom_port = http_port, dicom_port

    def start(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """Write the configuration and start on the chosen ports."""
        (self.tmpdir / "tmp").mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        PeerProcess.start(self, timeout_s)


class GatewayServer(PeerProcess):
    """``gateway serve --config CFG`` on loopback ports over ``data_dir``, its output in ``gateway.log``.

    The configuration (``gateway.yaml`` in ``tmpdir``) has DICOM (AE title ``GATEWAY``) and HTTP listeners on free
    ports of 127.0.0.1, :data:`ADMIN_TOKEN` as its token (changes send :data:`ADMIN`), reading open from loopback,
    and the data folder; ``sections`` (``ingest``, ``jobs``, ``models``, ...) are merged over them. The process does
    not inherit the ``GATEWAY_*`` environment variables.
    """

    name = "gateway"

    def __init__(self, tmpdir: Path, data_dir: Path, sections: Mapping[str, Any]) -> None:
        super().__init__(tmpdir)
        self.data_dir = data_dir
        self.dicom_port, self.http_port = free_port(), free_port()
        self.config_path = self.tmpdir / "gateway.yaml"
        config: dict[str, Any] = {
            "dicom": {"host": "127.0.0.1", "port": self.dicom_port, "ae_title": "GATEWAY"},
            "http": {"host": "127.0.0.1", "port": self.http_port, "tokens": [ADMIN_ENTRY], "anonymous_read": True},
            "store": {"data_dir": str(data_dir), "min_free_bytes": 0},
            **sections,
        }
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML

    def _command(self) -> Sequence[str]:
        return [str(GATEWAY_SCRIPT), "serve", "--config", str(self.config_path)]

    def _env(self) -> Mapping[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}

    def _ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


class ServedGateway(GatewayServer):
    """The gateway served over ``data_dir`` without shipped models; ``sections`` are further settings sections
    (``ingest``, ``jobs``, ``export``, ...); ``args`` further ``gateway serve`` options (``--role worker``)."""

    def __init__(self, tmpdir: Path, data_dir: Path, sections: Mapping[str, Any], args: Sequence[str] = ()) -> None:
        super().__init__(tmpdir, data_dir, {"models": {"register_shipped": False}, **sections})
        self.args = list(args)

    def _command(self) -> Sequence[str]:
        return [*super()._command(), *self.args]

    @property
    def address(self) -> str:
        """``AET@HOST:PORT`` of the DICOM listener."""
        return f"GATEWAY@127.0.0.1:{self.dicom_port}"

    def cli(self, *args: str, timeout_s: float = 300) -> str:
        """Run ``gateway ARGS`` (another process) against this gateway's settings; its output (fails on error)."""
        done = subprocess.run(
            [str(GATEWAY_SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=dict(self._env()),
        )
        assert done.returncode == 0, f"gateway {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    def api(self, path: str) -> Any:
        """``GET /api/...`` as JSON."""
        answer = httpx.get(f"http://127.0.0.1:{self.http_port}/api{path}", timeout=10)
        answer.raise_for_status()
        return answer.json()

    def kill9(self) -> None:
        """SIGKILL the server and reap it: no shutdown code runs."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.stop()  # closes the log


class StoreSCP(PeerProcess):
    """DCMTK ``storescp`` writing every received instance into ``tmpdir/received``.

    It runs as DCMTK documents for a server: one child process per association (``--fork``), and it writes
    data sets bit-preserving as received (``+B``) in whatever transfer syntax was negotiated (``+xa``), with
    Nagle's algorithm off (:data:`DCMTK_ENV`).
    """

    name = "storescp"

    def __init__(self, tmpdir: Path, *, aet: str = "STORESCP", max_pdu: int = MAX_PDU) -> None:
        super().__init__(tmpdir)
        binary = dcmtk_tool("storescp")
        if binary is None:
            raise PeerError("DCMTK storescp is not installed (Debian package dcmtk)")
        self.binary = binary
        self.aet = aet
        self.max_pdu = max_pdu
        self.port = free_port()
        self.outdir = self.tmpdir / "received"
        self.outdir.mkdir(exist_ok=True)

    @property
    def dicom_port(self) -> int:
        """The listening port."""
        return self.port

    def _command(self) -> Sequence[str]:
        return [
            self.binary,
            "--fork",
            "+xa",
            "+B",
            "--aetitle",
            self.aet,
            "--max-pdu",
            str(self.max_pdu),
            "--output-directory",
            str(self.outdir),
            str(self.port),
        ]

    def _env(self) -> Mapping[str, str]:
        return DCMTK_ENV

    def _ready(self) -> bool:
        return dicom_echo(self.port, self.aet, timeout_s=2.0)


_MINIMAL_SCP = r"""
import os, sys, threading
from pathlib import Path
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, build_context, evt
from pynetdicom.sop_class import Verification

_config.LOG_HANDLER_LEVEL = "none"  # as the gateway sets it: no log text formatted per message
outdir, aet, max_pdu, ready = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
durable = sys.argv[5] == "fsync"

def on_store(event):
    with open(outdir / (event.request.AffectedSOPInstanceUID + ".dcm"), "wb") as f:
        f.write(event.encoded_dataset())
        if durable:
            f.flush()
            os.fdatasync(f.fileno())
    if durable:
        fd = os.open(outdir, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    return 0x0000

ae = AE(ae_title=aet)
ae.maximum_pdu_size = max_pdu
ae.maximum_associations = 16
ae.supported_contexts = [build_context(Verification)] + [
    build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts
]
server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
ready.with_suffix(".tmp").write_text(str(server.server_address[1]))
ready.with_suffix(".tmp").rename(ready)
threading.Event().wait()
"""


class MinimalSCP(PeerProcess):
    """The "minimal pynetdicom SCP": C-STORE handler that only writes ``event.encoded_dataset()`` to a file.

    No index, no validation, and no fsync unless ``durable`` (then each file and the folder are flushed before
    the answer, the least a receiver must do to acknowledge only what is on disk); every storage SOP class with
    every transfer syntax pynetdicom knows.
    It runs in its own Python process (``python -c``) so that it does not share a GIL with the sender, binds
    port 0 on 127.0.0.1 and reports the port it got through a file.
    """

    name = "minimal-scp"

    def __init__(self, tmpdir: Path, *, aet: str = "MINIMAL", max_pdu: int = MAX_PDU, durable: bool = False) -> None:
        super().__init__(tmpdir)
        self.aet = aet
        self.max_pdu = max_pdu
        self.durable = durable
        self.outdir = self.tmpdir / "received"
        self.outdir.mkdir(exist_ok=True)
        self._port_file = self.tmpdir / "minimal-scp.port"
        self._port_file.unlink(missing_ok=True)
        self.port = 0

    @property
    def dicom_port(self) -> int:
        """The listening port (known once started)."""
        return self.port

    def _command(self) -> Sequence[str]:
        return [
            sys.executable,
            "-c",
            _MINIMAL_SCP,
            str(self.outdir),
            self.aet,
            str(self.max_pdu),
            str(self._port_file),
            "fsync" if self.durable else "nofsync",
        ]

    def _ready(self) -> bool:
        if not self._port_file.is_file():
            return False
        self.port = int(self._port_file.read_text())
        return True


# ---------------------------------------------------------------------------------------------- TLS material


def _key_and_cert(name: str, issuer: tuple[Any, Any] | None, *, ca: bool = False) -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer_name = (key, subject) if issuer is None else issuer
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def _write_pem(folder: Path, stem: str, key: Any, cert: Any) -> tuple[Path, Path]:
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.pem"
    encoding, no_password = serialization.Encoding.PEM, serialization.NoEncryption()
    key_path.write_bytes(key.private_bytes(encoding, serialization.PrivateFormat.PKCS8, no_password))
    cert_path.write_bytes(cert.public_bytes(encoding))
    return key_path, cert_path


def pki(folder: Path, *, server: str = "pacs", client: str = "gateway") -> dict[str, Path]:
    """A test CA, a server certificate (localhost, 127.0.0.1) and a client certificate, as PEM files (keys
    ``ca``, ``server_key``, ``server_cert``, ``client_key``, ``client_cert``); ``server`` and ``client`` are the
    certificates' common names."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _key_and_cert("test-ca", None, ca=True)
    issuer = (ca_key, ca_cert.subject)
    paths: dict[str, Path] = {}
    _, paths["ca"] = _write_pem(folder, "ca", ca_key, ca_cert)
    paths["server_key"], paths["server_cert"] = _write_pem(folder, "server", *_key_and_cert(server, issuer))
    paths["client_key"], paths["client_cert"] = _write_pem(folder, "client", *_key_and_cert(client, issuer))
    return paths


# -- what a person sees: pages in headless Chromium ------------------------------------------------------------

#: Debian's Chromium, driven by Playwright (Playwright's own browser download is not used).
CHROMIUM = "/usr/bin/chromium"
_CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_or_skip() -> str:
    """The Chromium binary; skips when it or Playwright is missing (``make test`` installs both)."""
    import importlib.util

    import pytest

    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium not installed (make test installs it)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright not installed (make test installs it)")
    return CHROMIUM


def screenshot(page_file: Path, png: Path, *, width: int = 1000) -> str:
    """Open a local HTML file in headless Chromium, save a full-page screenshot; return the page's visible text."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_or_skip(), args=_CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(page_file.resolve().as_uri())
            page.screenshot(path=str(png), full_page=True)
            return str(page.inner_text("body"))
        finally:
            browser.close()
