"""Ingest benchmark: C-STORE and STOW-RS of one synthetic CT series into the gateway and into its peers.

One series (default 200 slices of 512x512, ~105 MB) is generated once, then sent by DCMTK ``storescu`` as
the files are (``--required``: only their own transfer syntax is proposed, nothing is transcoded) over 1 and
over 4 concurrent associations (4 ``storescu`` processes, each with a quarter of the files) to:

- the gateway as a real process (``gateway serve``), durability as configured by default: each instance is
  fsynced, its directory fsynced and its index row committed (SQLite ``synchronous=FULL``) before the
  response;
- the minimal pynetdicom SCP of ``tests/peers.py`` (writes ``event.encoded_dataset()``, no fsync, no index);
- Orthanc with its defaults: each file is fdatasynced (``SyncStorageArea: true``), index commits are not;
- DCMTK ``storescp`` (one process per association, bit-preserving writes, no fsync).

It also POSTs the series as one streamed multipart STOW-RS request to the gateway and to Orthanc's DICOMweb
plugin. Every receiver advertises the same maximum PDU (131072, the largest DCMTK and Orthanc allow). Each
measurement starts a fresh receiver on empty storage; the best of ``--repeat`` runs is reported (the median is
shown too) and every run is checked: all instances must be held by the receiver afterwards.

Run ``python bench/ingest.py`` (``make bench``); ``--no-write`` leaves ``docs/benchmarks.md`` alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from gateway.synth.ct import write_synthetic_ct  # noqa: E402

from peers import (  # noqa: E402  (tests/ is not a package; its helpers are shared with the benchmarks)
    ADMIN,
    ADMIN_ENTRY,
    DCMTK_ENV,
    MAX_PDU,
    MinimalSCP,
    Orthanc,
    PeerError,
    PeerProcess,
    StoreSCP,
    dcmtk_tool,
    dicom_echo,
    free_port,
    log_tail,
    orthanc_binary,
)

DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## Ingest (bench/ingest.py)"
SEND_TIMEOUT_S = 600.0
CALLING_AE = "BENCHSCU"


class BenchError(RuntimeError):
    """A run failed or left the receiver without every instance."""


class GatewayProcess(PeerProcess):
    """The gateway as a real process: ``gateway serve --config`` with its data in ``tmpdir``."""

    name = "gateway"

    def __init__(self, tmpdir: Path, *, aet: str = "GATEWAY", max_pdu: int = MAX_PDU) -> None:
        super().__init__(tmpdir)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.data_dir = self.tmpdir / "data"
        self.config_path = self.tmpdir / "gateway.yaml"
        config = {  # JSON is YAML
            "dicom": {
                "host": "127.0.0.1",
                "port": self.dicom_port,
                "ae_title": aet,
                "maximum_pdu_size": max_pdu,
            },
            "http": {"host": "127.0.0.1", "port": self.http_port, "tokens": [ADMIN_ENTRY]},  # STOW-RS needs one
            "store": {"data_dir": str(self.data_dir), "min_free_bytes": 0},
            "log_level": "WARNING",
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP server."""
        return f"http://127.0.0.1:{self.http_port}"

    def _command(self) -> Sequence[str]:
        return [str(gateway_executable()), "serve", "--config", str(self.config_path)]

    def _ready(self) -> bool:
        if not dicom_echo(self.dicom_port, self.aet, calling_aet=CALLING_AE, timeout_s=2.0):
            return False
        try:
            return httpx.get(f"{self.http_url}/healthz", headers=ADMIN, timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def stored(self) -> int:
        """Instances in the index."""
        uri = f"file:{self.data_dir / 'index.sqlite3'}?mode=ro"
        with sqlite3.connect(uri, uri=True) as db:
            return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])


def gateway_executable() -> Path:
    """The ``gateway`` console script of the interpreter running this benchmark."""
    path = Path(sys.executable).parent / "gateway"
    if not path.is_file():
        raise BenchError(f"{path} not found: install the project (make venv)")
    return path


# ---------------------------------------------------------------------------------------------------- targets


class Receiver(Protocol):
    """What the benchmark needs of a receiver: a DICOM address and a lifetime."""

    @property
    def aet(self) -> str: ...

    @property
    def dicom_port(self) -> int: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@dataclass(frozen=True)
class Target:
    """A receiver: how to start one on empty storage, and how many instances it holds."""

    name: str
    start: Callable[[Path], Receiver]
    stored: Callable[[Receiver], int]
    stow_path: str | None = None  # STOW-RS endpoint under the HTTP base URL, when it has one


def _files_in(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def _orthanc_stored(peer: Receiver) -> int:
    assert isinstance(peer, Orthanc)
    return int(peer.rest("GET", "/statistics")["CountInstances"])


def _gateway_stored(peer: Receiver) -> int:
    assert isinstance(peer, GatewayProcess)
    return peer.stored()


def _dir_stored(peer: Receiver) -> int:
    assert isinstance(peer, MinimalSCP | StoreSCP)
    return _files_in(peer.outdir)


GATEWAY = Target("gateway", GatewayProcess, _gateway_stored, "/dicomweb/studies")
MINIMAL = Target("minimal pynetdicom SCP", MinimalSCP, _dir_stored)
MINIMAL_DURABLE = Target("minimal pynetdicom SCP + fsync", lambda d: MinimalSCP(d, durable=True), _dir_stored)
ORTHANC = Target("Orthanc", lambda d: Orthanc(d, dicomweb=True), _orthanc_stored, "/dicom-web/studies")
STORESCP = Target("DCMTK storescp", StoreSCP, _dir_stored)
DIMSE_TARGETS = (GATEWAY, MINIMAL, MINIMAL_DURABLE, ORTHANC, STORESCP)
STOW_TARGETS = (GATEWAY, ORTHANC)


# ---------------------------------------------------------------------------------------------------- senders


def chunks(files: Sequence[Path], n: int) -> list[list[Path]]:
    """Split ``files`` into ``n`` contiguous parts of nearly equal length."""
    size, extra = divmod(len(files), n)
    parts, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        parts.append(list(files[start:end]))
        start = end
    return [p for p in parts if p]


def send_storescu(files: Sequence[Path], port: int, aet: str, associations: int, logdir: Path) -> float:
    """C-STORE ``files`` with ``associations`` concurrent ``storescu`` processes; return the wall time."""
    storescu = dcmtk_tool("storescu")
    assert storescu is not None
    base = [
        storescu,
        "--required",
        "--max-pdu",
        str(MAX_PDU),
        "-aet",
        CALLING_AE,
        "-aec",
        aet,
        "127.0.0.1",
        str(port),
    ]
    logs = [logdir / f"storescu-{i}.log" for i in range(associations)]
    procs: list[subprocess.Popen[bytes]] = []
    start = time.perf_counter()
    try:
        for part, log in zip(chunks(files, associations), logs, strict=False):
            with log.open("wb") as out:
                cmd = [*base, *map(str, part)]
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV))
        codes = [p.wait(timeout=SEND_TIMEOUT_S) for p in procs]
        elapsed = time.perf_counter() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        tails = "\n".join(log_tail(log, 10) for log in logs)
        raise BenchError(f"storescu exit codes {codes}:\n{tails}")
    return elapsed


def multipart_body(files: Sequence[Path], boundary: str) -> tuple[int, Iterator[bytes]]:
    """A ``multipart/related; type="application/dicom"`` body streamed from the files, and its length."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(head) + f.stat().st_size + 2 for f in files) + len(tail)

    def parts() -> Iterator[bytes]:
        for f in files:
            yield head
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield tail

    return length, parts()


def send_stow(files: Sequence[Path], url: str) -> float:
    """POST ``files`` as one streamed STOW-RS request; return the wall time until the response arrived."""
    boundary = uuid.uuid4().hex
    length, body = multipart_body(files, boundary)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(length),
        "Accept": "application/dicom+json",
        **ADMIN,  # the gateway's STOW-RS needs a token (Orthanc ignores it)
    }
    with httpx.Client(timeout=SEND_TIMEOUT_S) as client:
        start = time.perf_counter()
        response = client.post(url, content=body, headers=headers)
        elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise BenchError(f"STOW-RS to {url}: HTTP {response.status_code}: {response.text[:500]}")
    referenced = response.json().get("00081199", {}).get("Value", [])
    if len(referenced) != len(files):
        raise BenchError(f"STOW-RS to {url}: {len(referenced)} of {len(files)} instances referenced")
    return elapsed


# ---------------------------------------------------------------------------------------------------- runs


@dataclass
class Measurement:
    """All runs of one target, protocol and concurrency."""

    target: str
    protocol: str
    concurrency: int
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def run_once(target: Target, protocol: str, concurrency: int, files: Sequence[Path], workdir: Path) -> float:
    """One measurement on a fresh receiver in ``workdir``; checks that every instance arrived."""
    workdir.mkdir(parents=True)
    try:
        with target.start(workdir) as peer:
            if protocol == "C-STORE":
                seconds = send_storescu(files, peer.dicom_port, peer.aet, concurrency, workdir)
            else:
                assert isinstance(peer, GatewayProcess | Orthanc) and target.stow_path is not None
                seconds = send_stow(files, peer.http_url + target.stow_path)
            held = target.stored(peer)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if held != len(files):
        raise BenchError(f"{target.name} holds {held} of {len(files)} instances after {protocol}")
    return seconds


def plan(associations: Sequence[int]) -> list[tuple[Target, str, int]]:
    """Every (target, protocol, concurrency) to measure, gateway first."""
    cases = [(t, "C-STORE", n) for n in associations for t in DIMSE_TARGETS]
    return cases + [(t, "STOW-RS", 1) for t in STOW_TARGETS]


def measure(files: Sequence[Path], workdir: Path, repeat: int, associations: Sequence[int]) -> list[Measurement]:
    """Run the plan ``repeat`` times, interleaving targets so that machine noise spreads over all of them."""
    cases = plan(associations)
    results = {(t.name, p, n): Measurement(t.name, p, n, []) for t, p, n in cases}
    for r in range(repeat):
        for i, (target, protocol, n) in enumerate(cases):
            seconds = run_once(target, protocol, n, files, workdir / f"run-{r}-{i}")
            results[target.name, protocol, n].seconds.append(seconds)
            print(f"  run {r + 1}/{repeat}: {target.name:<24} {protocol:<8} x{n}: {seconds:6.2f} s", flush=True)
    return list(results.values())


# ---------------------------------------------------------------------------------------------------- report


def table(results: Sequence[Measurement], count: int, total_bytes: int) -> list[str]:
    """The results as markdown table lines; the last column is the gateway's throughput over the peer's."""
    gateway = {(m.protocol, m.concurrency): m.best for m in results if m.target == GATEWAY.name}
    lines = [
        "| target | protocol | concurrency | best s | median s | instances/s | MB/s | gateway ÷ peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        ratio = "—" if m.target == GATEWAY.name else f"{m.best / gateway[m.protocol, m.concurrency]:.2f}"
        unit = "assoc." if m.protocol == "C-STORE" else "request"
        lines.append(
            f"| {m.target} | {m.protocol} | {m.concurrency} {unit} | {m.best:.2f} | {m.median:.2f} | "
            f"{count / m.best:.1f} | {total_bytes / m.best / 1e6:.1f} | {ratio} |"
        )
    return lines


def verdicts(results: Sequence[Measurement]) -> list[str]:
    """The issue's targets (gateway >= 0.9x the minimal SCP, >= 2x Orthanc over C-STORE), met or not."""
    best = {(m.target, m.protocol, m.concurrency): m.best for m in results}
    out = []
    for peer, goal in ((MINIMAL.name, 0.9), (ORTHANC.name, 2.0)):
        for (target, protocol, n), seconds in best.items():
            if target != peer or protocol != "C-STORE":
                continue
            ratio = seconds / best[GATEWAY.name, protocol, n]
            verdict = "met" if ratio >= goal else "NOT met"
            out.append(f"- C-STORE x{n}: gateway = {ratio:.2f}x {peer} (target >= {goal}x): {verdict}")
    return out


def machine(extra: Sequence[str] = ()) -> list[str]:
    """Where a benchmark ran, as list items: CPUs, CPU model, memory, disk of the temporary folder, then ``extra``
    (the benchmark's own lines: the versions of what it measures, ...), then the date."""
    model = _first_match(Path("/proc/cpuinfo"), "model name") or platform.processor() or "unknown"
    mem_kib = int((_first_match(Path("/proc/meminfo"), "MemTotal") or "0 kB").split()[0])
    return [
        f"- CPUs: {len(os.sched_getaffinity(0))} (nproc), {model}",
        f"- memory: {mem_kib / 2**20:.1f} GiB",
        f"- disk: {disk_description(Path(tempfile.gettempdir()))}",
        *extra,
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def software() -> list[str]:
    """The versions of what this benchmark measures."""
    return [
        f"- software: Python {platform.python_version()}, {_version_line(dcmtk_tool('storescu'))}, "
        f"{_version_line(orthanc_binary())}, pynetdicom {_package_version('pynetdicom')}"
    ]


def _first_match(path: Path, key: str) -> str | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def disk_description(folder: Path) -> str:
    """Device, file system and rotational flag of the file system holding ``folder``."""
    best = ("?", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        source, mount, fstype = line.split()[:3]
        if str(folder.resolve()).startswith(mount) and len(mount) > len(best[2]):
            best = (source, fstype, mount)
    source, fstype, _ = best
    name = Path(source).name
    sysdir = Path("/sys/class/block") / name
    if (sysdir / "partition").exists():
        sysdir = sysdir.resolve().parent
    try:
        rotational = (sysdir / "queue" / "rotational").read_text().strip()
    except OSError:
        return f"{source} ({fstype})"
    kind = (
        "virtio disk of a VM, physical medium unknown"
        if name.startswith("vd")
        else ("rotational" if rotational == "1" else "non-rotational (SSD/NVMe)")
    )
    return f"{source} ({fstype}; {kind}; rotational flag {rotational})"


def _version_line(binary: str | None) -> str:
    if binary is None:
        return "?"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    lines = [line.strip(" $") for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return lines[0] if lines else Path(binary).name


def _package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def section(results: Sequence[Measurement], count: int, total_bytes: int, args: argparse.Namespace) -> str:
    """The markdown section for ``docs/benchmarks.md``."""
    lines = [
        HEADING,
        "",
        f"One synthetic CT series ({count} slices of {args.size}x{args.size}, {total_bytes / 1e6:.1f} MB, "
        "Explicit VR Little Endian) sent by DCMTK `storescu --required` over "
        f"{' and '.join(map(str, args.associations))} concurrent association(s), and as one streamed "
        f"STOW-RS request. Best of {args.repeat} runs (median shown too), each on a fresh receiver with "
        f"empty storage; every receiver advertises a {MAX_PDU}-byte maximum PDU. `gateway ÷ peer` is the "
        "gateway's throughput over the peer's for the same protocol and concurrency (> 1: the gateway is "
        "faster).",
        "",
        "The gateway acknowledges an instance only once its file and directory are fsynced and its index "
        "row is committed (SQLite, `synchronous=FULL`); the minimal pynetdicom SCP and `storescp` write "
        'without fsync or index, and "minimal pynetdicom SCP + fsync" is the same minimal SCP flushing each '
        "file and its folder before it answers (durability without an index); Orthanc runs with its "
        "defaults: it `fdatasync`s each stored file "
        "(`SyncStorageArea: true`), not its SQLite index commits (strace: one `fdatasync` per instance). "
        "DCMTK programs (`storescu`, `storescp`, Orthanc's DICOM side) run with `TCP_NODELAY=1`: Debian's "
        "DCMTK 3.6.7 otherwise keeps Nagle's algorithm on, and each C-STORE then waits on delayed ACKs "
        "(~40 ms), which would measure TCP timers instead of the receivers.",
        "",
        *table(results, count, total_bytes),
        "",
        "Targets from the issue (C-STORE):",
        "",
        *verdicts(results),
        "",
        "Machine:",
        "",
        *machine(software()),
        "",
    ]
    return "\n".join(lines)


def write_section(doc: Path, text: str, heading: str = HEADING) -> None:
    """Replace the ingest section of ``doc`` (or append it), leaving the other sections as they are."""
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    lines = old.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before, after = "\n".join(lines[:start]), "\n".join(lines[end:])
        new = (before.rstrip("\n") + "\n\n" if before.strip() else "") + text + ("\n" + after if after else "")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new.rstrip("\n") + "\n")


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=200, help="slices in the series (default 200)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts (default 3)")
    parser.add_argument(
        "--associations", type=int, nargs="+", default=[1, 4], help="concurrent associations (default 1 4)"
    )
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.slices < 1 or args.size < 32 or args.repeat < 1 or min(args.associations) < 1:
        parser.error("--slices, --repeat and --associations must be >= 1, --size >= 32")
    return args


def check_tools() -> None:
    missing = [t for t in ("storescu", "storescp", "echoscu") if dcmtk_tool(t) is None]
    if missing or orthanc_binary() is None:
        raise SystemExit(f"missing peers: {missing + ['Orthanc'] * (orthanc_binary() is None)} (make system-deps)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        series = Path(tmp) / "series"
        write_synthetic_ct(series, args.slices, rows=args.size, columns=args.size, seed=0)
        files = sorted(series.glob("*.dcm"))
        total = sum(f.stat().st_size for f in files)
        print(f"series: {len(files)} files, {total / 1e6:.1f} MB in {series}", flush=True)
        try:
            results = measure(files, Path(tmp) / "runs", args.repeat, args.associations)
        except (BenchError, PeerError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    text = section(results, len(files), total, args)
    print()
    print(text)
    print(f"total time {time.monotonic() - started:.0f} s")
    if not args.no_write:
        write_section(DOC, text)
        print(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
