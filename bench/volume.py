"""Volume assembly benchmark: ``gateway volume`` beside dcm2niix and MONAI's loader, and decoding beside GDCM.

One synthetic CT series (default 300 slices of 512x512) is generated once, uncompressed (Explicit VR Little
Endian), and copied once as JPEG 2000 lossless (pydicom 3 ``Dataset.compress`` with pylibjpeg-openjpeg, one file
per process of a pool). On each copy it times whole processes, from start to exit:

- ``gateway volume DIR -o OUT`` (NIfTI, int16 when every voxel is an integer in range as here, else float32,
  + JSON sidecar);
- ``dcm2niix -z n -o OUT DIR`` (uncompressed NIfTI, int16 stored values + scaling, + JSON sidecar);
- MONAI's ``LoadImage(reader="PydicomReader")`` on the folder, in a fresh ``python -c`` (loads, writes nothing).

Peak memory, two ways, the larger counting against the volume's size: the kernel's peak RSS of the largest single
process (GNU ``time``'s ``%M``), and the peak of the process tree's summed PSS (the gateway decodes JPEG 2000 in
worker processes), sampled every 20 ms from ``/proc/PID/smaps_rollup``. Once more on the uncompressed copy, the
two NIfTI files are compared: same voxel values (as nibabel reads them, scaling applied) and affine.

The issue's own target is measured on its own, on uncompressed series of 140 slices (the size the issue names)
and of ``--slices``: ``gateway volume`` beside ``dcm2niix`` as whole processes (best of at least 5, interleaved),
and ``gateway.assemble.assemble.assemble_series`` on the same files inside this process, as a running gateway
assembles a series (its imports done; timed after one warm-up call), beside dcm2niix's whole run.

Decoding is timed in this process: every frame of each copy through ``gateway.assemble.decode.decode_frames``
(one worker, and all CPUs) and through GDCM (python-gdcm, pydicom's ``gdcm`` decoding plugin; in turn, and in a
process pool of the same size), with the decoded arrays compared.

Run ``python bench/volume.py``; ``--slices``/``--size`` shrink it, ``--no-write`` leaves ``docs/benchmarks.md``
alone, ``--target-only`` measures (and prints) only the target table. MONAI (with torch) and python-gdcm must be
installed in the environment for their rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from ingest import machine, write_section  # noqa: E402  (bench/ is not a package)

from gateway.assemble.assemble import assemble_series  # noqa: E402
from gateway.assemble.decode import decode_frames  # noqa: E402
from gateway.synth.ct import write_synthetic_ct  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## Volume assembly (bench/volume.py)"
RUN_TIMEOUT_S = 900.0
TARGET_SLICES = 140  # the series size issue 12 names for "gateway volume <= 2x dcm2niix"
TARGET_REPEAT = 5  # at least: these runs are short, and the machine is shared
SAMPLE_S = 0.02
TIME = "/usr/bin/time"
BIN = Path(sys.executable).parent
MONAI_SNIPPET = (
    "import sys; from monai.transforms import LoadImage; "
    "img = LoadImage(reader='PydicomReader', image_only=True)(sys.argv[1]); "
    "print(tuple(img.shape), img.dtype)"
)


class BenchError(RuntimeError):
    """A run failed or wrote nothing."""


# ---------------------------------------------------------------------------------------------------- series


def _compress(paths: tuple[Path, Path]) -> None:
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    src, dst = paths
    ds = pydicom.dcmread(src)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(dst, enforce_file_format=True)


def make_series(root: Path, slices: int, size: int) -> dict[str, Path]:
    """Write the uncompressed series and its JPEG 2000 lossless copy under ``root``."""
    raw, j2k = root / "uncompressed", root / "j2k"
    write_synthetic_ct(raw, slices, rows=size, columns=size, seed=0)
    j2k.mkdir()
    jobs = [(p, j2k / p.name) for p in sorted(raw.glob("*.dcm"))]
    with ProcessPoolExecutor(len(os.sched_getaffinity(0)), mp_context=get_context("forkserver")) as pool:
        list(pool.map(_compress, jobs, chunksize=8))
    return {"uncompressed": raw, "JPEG 2000 lossless": j2k}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 1e6


# ---------------------------------------------------------------------------------------------------- processes


def _tree_pss(pid: int) -> int:
    """Proportional set size of ``pid`` and all its descendants, now, in bytes (0 once it has gone).

    PSS, not RSS: pages shared between the processes (the interpreter and libraries of pool workers) are split
    among them instead of being counted once per process.
    """
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            total += next((int(line.split()[1]) * 1024 for line in rollup.splitlines() if line[:4] == "Pss:"), 0)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Run:
    seconds: float
    max_rss: int  # bytes: the kernel's peak RSS of the largest single process of the tree (GNU time %M)
    peak_pss: int  # bytes: the sampled peak of the tree's summed PSS
    output: str

    @property
    def peak(self) -> int:
        return max(self.max_rss, self.peak_pss)


def run_process(cmd: Sequence[str], log: Path) -> Run:
    """Run ``cmd`` under GNU ``time`` to completion: wall time, peak memory and output. Raises on failure.

    GNU ``time`` reports the child's own ``ru_maxrss``; taken from this process it would include the RSS this
    (large) interpreter had when it forked the child, which the kernel keeps across ``exec``.
    """
    peak = 0
    done = threading.Event()
    rss_file = log.with_suffix(".rss")
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([TIME, "-f", "%M", "-o", str(rss_file), *cmd], stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:
            nonlocal peak
            while not done.wait(SAMPLE_S):
                peak = max(peak, _tree_pss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait(timeout=RUN_TIMEOUT_S)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    text = log.read_text(errors="replace")
    if code != 0:
        raise BenchError(f"{Path(cmd[0]).name} exited {code}: {text[-2000:]}")
    max_rss = int(rss_file.read_text().split()[-1]) * 1024
    return Run(seconds, max_rss, peak, text)


@dataclass(frozen=True)
class Tool:
    """A whole-process peer: its command for an input folder and an output folder, and a check of its result."""

    name: str
    command: Callable[[Path, Path], list[str]]
    check: Callable[[Path, Run], None]


def _wrote_nifti(out: Path, run: Run) -> None:
    images = list(out.glob("*.nii"))
    if len(images) != 1:
        raise BenchError(f"expected one .nii in {out}, found {[p.name for p in out.iterdir()]}: {run.output[-1500:]}")


def _monai_loaded(out: Path, run: Run) -> None:
    if "(" not in run.output:
        raise BenchError(f"MONAI printed no shape: {run.output[-1500:]}")


GATEWAY = Tool(
    "gateway volume", lambda src, out: [str(BIN / "gateway"), "volume", str(src), "-o", str(out)], _wrote_nifti
)
DCM2NIIX = Tool("dcm2niix", lambda src, out: [str(BIN / "dcm2niix"), "-z", "n", "-o", str(out), str(src)], _wrote_nifti)
MONAI = Tool(
    "MONAI LoadImage (PydicomReader)", lambda src, out: [sys.executable, "-c", MONAI_SNIPPET, str(src)], _monai_loaded
)
TOOLS = (GATEWAY, DCM2NIIX, MONAI)


@dataclass
class Result:
    tool: str
    input: str
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)

    @property
    def max_rss(self) -> int:
        return max(r.max_rss for r in self.runs)

    @property
    def peak_pss(self) -> int:
        return max(r.peak_pss for r in self.runs)

    @property
    def peak(self) -> int:
        return max(self.max_rss, self.peak_pss)


def measure_tools(series: dict[str, Path], work: Path, repeat: int) -> list[Result]:
    """Each tool on each input ``repeat`` times, interleaved; a tool that fails is recorded, not retried."""
    results = {(t.name, label): Result(t.name, label) for label in series for t in TOOLS}
    for r in range(repeat):
        for label, src in series.items():
            for tool in TOOLS:
                res = results[tool.name, label]
                if res.error is not None:
                    continue
                out = work / f"{len(res.runs)}-{tool.name.split()[0]}-{label.split()[0]}"
                out.mkdir(parents=True)
                try:
                    run = run_process(tool.command(src, out), work / "log.txt")
                    tool.check(out, run)
                except BenchError as exc:
                    res.error = " ".join(str(exc).split())[:300]
                    print(f"  {tool.name} on {label}: FAILED: {res.error}", flush=True)
                    continue
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                res.runs.append(run)
                print(
                    f"  run {r + 1}/{repeat}: {tool.name:<32} {label:<20} {run.seconds:6.2f} s "
                    f"max RSS {run.max_rss / 1e6:5.0f} MB, tree PSS {run.peak_pss / 1e6:5.0f} MB",
                    flush=True,
                )
    return list(results.values())


def compare_outputs(src: Path, work: Path) -> str:
    """Run the gateway and dcm2niix once more on ``src`` and compare their NIfTI files; a line for the report."""
    import nibabel as nib

    images = {}
    for tool in (GATEWAY, DCM2NIIX):
        out = work / f"compare-{tool.name.split()[0]}"
        out.mkdir(parents=True)
        run_process(tool.command(src, out), work / "log.txt")
        (path,) = out.glob("*.nii")
        image = nib.Nifti1Image.from_filename(path)
        images[tool.name] = (image, image.get_data_dtype(), image.get_fdata(dtype=np.float32))
    (ours, our_type, our_values), (theirs, their_type, their_values) = images.values()
    same = np.array_equal(our_values, their_values) and np.allclose(ours.affine, theirs.affine, atol=1e-3)
    verdict = "identical" if same else "DIFFERENT"
    return (
        f"- output: the gateway's NIfTI ({our_type}) and dcm2niix's ({their_type}, scaled) hold {verdict} voxel "
        "values and affines (nibabel, affine to 1e-3 mm)"
    )


# ---------------------------------------------------------------------------------------------------- target


@dataclass
class Target:
    """``gateway volume`` and dcm2niix on one uncompressed series, and ``assemble_series`` in this process."""

    slices: int
    gateway: float
    dcm2niix: float
    in_process: float


def _best_in_process(folder: Path, repeat: int) -> float:
    """Best time of ``assemble_series`` on the folder's files, after one untimed call (imports, page cache)."""
    paths = sorted(folder.glob("*.dcm"))
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        result = assemble_series(paths)
        times.append(time.perf_counter() - start)
        if len(result.volumes) != 1:
            raise BenchError(f"assemble_series made {len(result.volumes)} volumes of {folder}")
        del result
    return min(times[1:])


def measure_target(folders: dict[int, Path], work: Path, repeat: int) -> list[Target]:
    """The issue's target on each series: whole processes interleaved (best of ``repeat``), then in-process."""
    out = []
    for slices, folder in sorted(folders.items()):
        best = {GATEWAY.name: float("inf"), DCM2NIIX.name: float("inf")}
        for r in range(repeat):
            for tool in (GATEWAY, DCM2NIIX):
                target = work / f"target-{slices}-{r}-{tool.name.split()[0]}"
                target.mkdir(parents=True)
                try:
                    run = run_process(tool.command(folder, target), work / "log.txt")
                    tool.check(target, run)
                finally:
                    shutil.rmtree(target, ignore_errors=True)
                best[tool.name] = min(best[tool.name], run.seconds)
        row = Target(slices, best[GATEWAY.name], best[DCM2NIIX.name], _best_in_process(folder, repeat))
        print(
            f"  target {slices} slices: gateway {row.gateway:.2f} s, dcm2niix {row.dcm2niix:.2f} s "
            f"({row.gateway / row.dcm2niix:.2f}x), assemble_series in-process {row.in_process:.2f} s",
            flush=True,
        )
        out.append(row)
    return out


def target_table(targets: Sequence[Target]) -> list[str]:
    def ok(good: bool) -> str:
        return "met" if good else "NOT met"

    lines = [
        "| slices | `gateway volume` s | dcm2niix s | gateway ÷ dcm2niix (target ≤ 2) "
        "| `assemble_series` in-process s | in-process ÷ dcm2niix (target ≤ 1) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for t in targets:
        whole, inside = t.gateway / t.dcm2niix, t.in_process / t.dcm2niix
        lines.append(
            f"| {t.slices} | {t.gateway:.2f} | {t.dcm2niix:.2f} | {whole:.2f} ({ok(whole <= 2)}) "
            f"| {t.in_process:.2f} | {inside:.2f} ({ok(inside <= 1)}) |"
        )
    return lines


def target_folders(root: Path, args: argparse.Namespace, uncompressed: Path | None) -> dict[int, Path]:
    """Uncompressed series of ``TARGET_SLICES`` and of ``--slices`` (reusing ``uncompressed`` when given)."""
    folders = {}
    for slices in sorted({TARGET_SLICES, args.slices}):
        if slices == args.slices and uncompressed is not None:
            folders[slices] = uncompressed
        else:
            folders[slices] = root / f"target-{slices}"
            write_synthetic_ct(folders[slices], slices, rows=args.size, columns=args.size, seed=0)
    return folders


# ---------------------------------------------------------------------------------------------------- decoding


def _gdcm_decode(path: Path) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return pixel_array(path, decoding_plugin="gdcm")


def gdcm_decode(files: Sequence[Path], workers: int) -> list[np.ndarray]:
    if workers == 1:
        return [_gdcm_decode(p) for p in files]
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver")) as pool:
        return list(pool.map(_gdcm_decode, files, chunksize=max(1, len(files) // (4 * workers))))


@dataclass
class Decode:
    decoder: str
    input: str
    workers: int
    seconds: list[float]
    frames: int
    nbytes: int

    @property
    def best(self) -> float:
        return min(self.seconds)


def measure_decoding(series: dict[str, Path], repeat: int) -> list[Decode]:
    """Every frame of each copy through the gateway's decoder and through GDCM, in turn and in parallel."""
    cpus = len(os.sched_getaffinity(0))
    counts = sorted({1, cpus})
    decoders: list[tuple[str, Callable[[list[Path], int], list[np.ndarray]]]] = [
        ("gateway decode_frames", lambda files, n: decode_frames([(p, 1) for p in files], workers=n)),
        ("GDCM (python-gdcm)", gdcm_decode),
    ]
    out = []
    for label, folder in series.items():
        files = sorted(folder.glob("*.dcm"))
        reference = None
        for name, decode in decoders:
            for n in counts:
                times = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    arrays = decode(files, n)
                    times.append(time.perf_counter() - start)
                if reference is None:
                    reference = arrays
                elif not all(np.array_equal(a, b) for a, b in zip(reference, arrays, strict=True)):
                    raise BenchError(f"{name} x{n} decoded {label} differently from the gateway")
                out.append(Decode(name, label, n, times, len(arrays), sum(a.nbytes for a in arrays)))
                print(f"  decode {name:<22} {label:<20} x{n}: {min(times):6.2f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- report


def tool_table(results: Sequence[Result], volume_bytes: int) -> list[str]:
    gateway = {r.input: r for r in results if r.tool == GATEWAY.name}
    lines = [
        "| tool | input | best s | median s | max RSS MB | peak tree PSS MB | peak ÷ float32 volume "
        "| gateway ÷ peer (time) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.tool} | {r.input} | failed: {r.error[:120]} | | | | | |")
            continue
        g = gateway[r.input]
        ratio = "—" if r.tool == GATEWAY.name or g.error else f"{g.best.seconds / r.best.seconds:.2f}"
        median = sorted(x.seconds for x in r.runs)[len(r.runs) // 2]
        lines.append(
            f"| {r.tool} | {r.input} | {r.best.seconds:.2f} | {median:.2f} | {r.max_rss / 1e6:.0f} | "
            f"{r.peak_pss / 1e6:.0f} | {r.peak / volume_bytes:.2f} | {ratio} |"
        )
    return lines


def decode_table(decodes: Sequence[Decode]) -> list[str]:
    gateway = {(d.input, d.workers): d.best for d in decodes if d.decoder.startswith("gateway")}
    lines = [
        "| decoder | input | processes | best s | frames/s | MB/s | gateway ÷ GDCM (throughput) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for d in decodes:
        ratio = "—" if d.decoder.startswith("gateway") else f"{d.best / gateway[d.input, d.workers]:.2f}"
        lines.append(
            f"| {d.decoder} | {d.input} | {d.workers} | {d.best:.2f} | {d.frames / d.best:.0f} | "
            f"{d.nbytes / d.best / 1e6:.0f} | {ratio} |"
        )
    return lines


def target_section(targets: Sequence[Target], args: argparse.Namespace) -> list[str]:
    repeat = max(args.repeat, TARGET_REPEAT)
    return [
        f"The issue's target, on uncompressed {args.size}x{args.size} series: `gateway volume` and dcm2niix as "
        f"whole processes, interleaved, best of {repeat}; `assemble_series` (headers, pixels, geometry: the "
        "float32 volume a model gets, no file written) on the same files inside this process, as a running "
        "gateway calls it, best of as many after one warm-up call.",
        "",
        *target_table(targets),
        "",
    ]


def verdicts(results: Sequence[Result], volume_bytes: int) -> list[str]:
    """The issue's targets: <= 1.5x dcm2niix's time uncompressed, >= 5x faster than MONAI, RSS < 2.5x volume."""
    by = {(r.tool, r.input): r for r in results}
    out = []

    def ok(good: bool) -> str:
        return "met" if good else "NOT met"

    g = by.get((GATEWAY.name, "uncompressed"))
    d = by.get((DCM2NIIX.name, "uncompressed"))
    if g and d and not (g.error or d.error):
        x = g.best.seconds / d.best.seconds
        out.append(f"- uncompressed: gateway takes {x:.2f}x dcm2niix's time (target <= 1.5x): {ok(x <= 1.5)}")
    for label in ("uncompressed", "JPEG 2000 lossless"):
        g, m = by.get((GATEWAY.name, label)), by.get((MONAI.name, label))
        if g and m and not (g.error or m.error):
            x = m.best.seconds / g.best.seconds
            out.append(f"- {label}: gateway is {x:.2f}x faster than MONAI's loader (target >= 5x): {ok(x >= 5)}")
        g = by.get((GATEWAY.name, label))
        if g and not g.error:
            x = g.peak / volume_bytes
            out.append(f"- {label}: gateway peak memory = {x:.2f}x the float32 volume (target < 2.5x): {ok(x < 2.5)}")
    return out


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def software() -> list[str]:
    dcm2niix = subprocess.run([str(BIN / "dcm2niix"), "--version"], capture_output=True, text=True, timeout=10)
    dcm2niix_line = (dcm2niix.stdout + dcm2niix.stderr).strip().splitlines()[0].strip()
    import platform

    return [
        f"- software: Python {platform.python_version()}, {dcm2niix_line}, pydicom {_version('pydicom')}, "
        f"pylibjpeg-openjpeg {_version('pylibjpeg-openjpeg')}, python-gdcm {_version('python-gdcm')}, "
        f"MONAI {_version('monai')}, torch {_version('torch')}, nibabel {_version('nibabel')}"
    ]


def section(
    results: Sequence[Result],
    decodes: Sequence[Decode],
    sizes: dict[str, float],
    volume_bytes: int,
    args: argparse.Namespace,
    comparison: str,
    targets: Sequence[Target],
) -> str:
    stored = ", ".join(f"{label} {mb:.1f} MB" for label, mb in sizes.items())
    lines = [
        HEADING,
        "",
        f"One synthetic CT series ({args.slices} slices of {args.size}x{args.size}, 12 bits stored in 16; {stored}) "
        f"as Explicit VR Little Endian files and as a JPEG 2000 lossless copy (pydicom `Dataset.compress`, "
        f"pylibjpeg-openjpeg). Whole processes, start to exit, best of {args.repeat} runs (median shown too), "
        "each into an empty output folder on the same disk: `gateway volume DIR -o OUT` (NIfTI + JSON: int16 "
        "when every voxel is an integer in range, as here, else float32; no scaling), "
        "`dcm2niix -z n -o OUT DIR` (uncompressed NIfTI, int16 + scaling, + JSON; this build links OpenJPEG), "
        "and MONAI's `LoadImage(reader='PydicomReader')` on the folder in a fresh `python -c` (it loads the "
        "volume into memory, float32, and writes nothing). `gateway ÷ peer` is the gateway's time over the "
        "peer's (< 1: the gateway is faster). Memory: `max RSS` is the kernel's peak resident set of the "
        "largest single process (GNU `time` `%M`); `peak tree PSS` the largest sum of proportional set sizes "
        f"over the process and its children (pool workers), sampled every {SAMPLE_S * 1000:.0f} ms; the larger "
        f"of the two is set against the float32 volume ({volume_bytes / 1e6:.1f} MB). Each tool's peak includes "
        "its interpreter and libraries (a bare `python -c 'import numpy, pydicom'` is ~75 MB RSS here).",
        "",
        *tool_table(results, volume_bytes),
        "",
        comparison,
        "",
        *target_section(targets, args),
        "Decoding alone, every frame of each copy, in the benchmark's process (pools started per call and "
        "counted): the gateway's `decode_frames` (pydicom 3 with pylibjpeg) against GDCM through pydicom's "
        "`gdcm` decoding plugin (python-gdcm), in turn and in a process pool of the same size. The decoded "
        "arrays are compared and equal. MB/s counts decoded bytes (16-bit stored values).",
        "",
        *decode_table(decodes),
        "",
        "Targets from the issue:",
        "",
        *verdicts(results, volume_bytes),
        "",
        "Machine:",
        "",
        *machine(software()),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=300, help="slices in the series (default 300)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts (default 3)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(REPO)}")
    parser.add_argument(
        "--target-only",
        action="store_true",
        help=f"only the target table ({TARGET_SLICES} and --slices slices, uncompressed); writes nothing",
    )
    args = parser.parse_args(argv)
    if args.slices < 2 or args.size < 32 or args.repeat < 1:
        parser.error("--slices must be >= 2, --size >= 32, --repeat >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    volume_bytes = args.slices * args.size * args.size * 4
    if args.target_only:
        return main_target(args)
    with tempfile.TemporaryDirectory(prefix="bench-volume-") as tmp:
        series = make_series(Path(tmp), args.slices, args.size)
        sizes = {label: folder_mb(folder) for label, folder in series.items()}
        print(f"series: {args.slices} files each, {sizes} MB, made in {time.monotonic() - started:.0f} s", flush=True)
        try:
            results = measure_tools(series, Path(tmp) / "runs", args.repeat)
            comparison = compare_outputs(series["uncompressed"], Path(tmp) / "runs")
            print(comparison, flush=True)
            folders = target_folders(Path(tmp), args, series["uncompressed"])
            targets = measure_target(folders, Path(tmp) / "runs", max(args.repeat, TARGET_REPEAT))
            decodes = measure_decoding(series, args.repeat)
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    text = section(results, decodes, sizes, volume_bytes, args, comparison, targets)
    print()
    print(text)
    print(f"total time {time.monotonic() - started:.0f} s")
    if not args.no_write:
        write_section(DOC, text, HEADING)
        print(f"wrote {DOC.relative_to(REPO)}")
    return 0


def main_target(args: argparse.Namespace) -> int:
    """``--target-only``: the target table alone, printed."""
    with tempfile.TemporaryDirectory(prefix="bench-volume-") as tmp:
        folders = target_folders(Path(tmp), args, None)
        try:
            targets = measure_target(folders, Path(tmp) / "runs", max(args.repeat, TARGET_REPEAT))
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    print()
    print("\n".join([*target_section(targets, args), *machine(software())]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
