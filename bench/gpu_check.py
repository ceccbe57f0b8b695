"""GPU check (``make gpu-check``): the GPU tests, the inference benchmark and the end-to-end benchmark on CUDA, and
one report of issue 12's GPU targets beside what was measured.

Steps, in order, each continuing after a failure of the one before:

1. ``pytest -m gpu`` (every test marked ``gpu``).
2. The inference benchmark (:mod:`inference`) on ``cuda``: 1, 4 and 16 concurrent studies, batching off and on; its
   section of ``docs/benchmarks.md`` is rewritten as ``bench/inference.py --device cuda`` does. During the batched
   run at 16 studies ``nvidia-smi`` (if present) samples the device's utilisation every 200 ms.
3. The end-to-end benchmark (``bench/e2e.py --device cuda``: a 300-slice CT from Orthanc through ``gateway serve``
   and back), which rewrites its own section.

The report, the section "GPU check (bench/gpu_check.py)" of ``docs/benchmarks.md``, lists the targets: cross-study
batching at 16 studies >= 3x one at a time, the GPU busy > 80 % during that batched run, and a 300-slice CT from
last instance to SR <= 2 s plus the quiet period. Without CUDA (no device, a CPU-only torch, or an ONNX Runtime
without its CUDA provider) the script says so on one line and exits with status 2: it checks a GPU server, not this
machine. ``--no-write`` leaves ``docs/benchmarks.md`` alone.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from ingest import machine, write_section  # noqa: E402  (bench/ is not a package)

DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## GPU check (bench/gpu_check.py)"
NO_CUDA_STATUS = 2
BATCHING_TARGET = 3.0
BUSY_TARGET_PCT = 80.0
E2E_TARGET_S = 2.0
CONCURRENCY = (1, 4, 16)


def cuda_missing() -> str | None:
    """Why this machine cannot run the check (``None``: it can)."""
    import onnxruntime
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build (make install-gpu on a GPU server)"
        return "torch sees no CUDA device (no GPU, or no NVIDIA driver)"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "ONNX Runtime has no CUDA execution provider (onnxruntime-gpu is not installed: make install-gpu)"
    return None


# ---------------------------------------------------------------------------------------------------- nvidia-smi


@dataclass
class Utilisation:
    """``nvidia-smi`` samples of one GPU's utilisation (percent), taken while the ``with`` block runs."""

    gpu: str = "0"
    samples: list[int] = field(default_factory=list)
    _process: subprocess.Popen[str] | None = None
    _reader: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        smi = shutil.which("nvidia-smi")
        if smi is not None:
            cmd = [smi, "-i", self.gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            self._process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line.strip()))

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def visible_gpu() -> str:
    """The ``nvidia-smi -i`` id of CUDA device 0 (the first of ``CUDA_VISIBLE_DEVICES`` when it is set)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"


# ---------------------------------------------------------------------------------------------------- steps


@dataclass
class Outcome:
    """What the check measured (``None``: not measured, the step failed or could not measure it)."""

    pytest_line: str = "not run"
    pytest_ok: bool = False
    ratio: float | None = None
    busy_pct: float | None = None
    busy_samples: int = 0
    e2e_s: list[float] = field(default_factory=list)
    e2e_ok: bool = False
    failures: list[str] = field(default_factory=list)


def run_gpu_tests(outcome: Outcome) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    outcome.pytest_line = lines[-1].strip("= ") if lines else f"exit status {done.returncode}"
    outcome.pytest_ok = done.returncode == 0
    if not outcome.pytest_ok:
        outcome.failures.append(f"pytest -m gpu: {outcome.pytest_line}")


def run_inference(outcome: Outcome, write: bool) -> None:
    """The inference benchmark's cells, as ``bench/inference.py --device cuda`` runs them, with ``nvidia-smi``
    sampling during the batched run at the highest concurrency."""
    import inference

    from gateway.config import get_settings
    from gateway.infer.backends import resolve_device
    from gateway.registry.registry import Registry, RegistryIndex, shipped_models_dir

    args = inference.parse_args(["--device", "cuda", "--concurrency", *map(str, CONCURRENCY)])
    device = resolve_device(args.device)
    top, cells = max(CONCURRENCY), []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-check-") as tmp:
        root = Path(tmp)
        settings = get_settings(None, store={"data_dir": root / "data"})
        index = RegistryIndex(settings.store)
        try:
            registry = Registry(index)
            registry.register_shipped(shipped_models_dir(settings.models))
            models = [registry.get(name) for name in inference.MODELS]
            folders = inference.write_studies(root / "studies", top, args.slices, args.size)
            for n in CONCURRENCY:
                for batching in (False, True):
                    if n == top and batching:
                        with Utilisation(visible_gpu()) as busy:
                            cell = inference.measure(folders, models, n, batching, device)
                        outcome.busy_pct, outcome.busy_samples = busy.mean, len(busy.samples)
                    else:
                        cell = inference.measure(folders, models, n, batching, device)
                    state = "on " if batching else "off"
                    print(f"{n:>3} studies, batching {state}: {cell.per_min:.1f}/min", flush=True)
                    if cell.failures:
                        outcome.failures.append(f"inference: {cell.failures[0]}")
                        return
                    cells.append(cell)
        finally:
            index.close()
    by = {(c.concurrency, c.batching): c for c in cells}
    outcome.ratio = by[(top, True)].per_min / by[(top, False)].per_min
    text = inference.section(cells, args, device)
    print(text, flush=True)
    if write:
        write_section(DOC, text, inference.HEADING)


_E2E_ROW = re.compile(r"^\| \*\*end to end\*\*[^|]*\|(.*)\|\s*$", re.MULTILINE)


def run_e2e(outcome: Outcome, write: bool) -> None:
    """``bench/e2e.py --device cuda`` in a process of its own; the end-to-end seconds read from its table."""
    cmd = [sys.executable, str(BENCH / "e2e.py"), "--device", "cuda", *([] if write else ["--no-write"])]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(done.stdout[-8000:], done.stderr[-4000:], sep="\n", flush=True)
    match = _E2E_ROW.search(done.stdout)
    if done.returncode != 0 or match is None:
        outcome.failures.append(f"bench/e2e.py --device cuda: exit status {done.returncode}")
        return
    outcome.e2e_s = [float(cell.strip(" *")) for cell in match.group(1).split("|")]
    outcome.e2e_ok = True


# ---------------------------------------------------------------------------------------------------- report


def verdict(value: float | None, good: Callable[[float], bool]) -> str:
    if value is None:
        return "not measured"
    return "met" if good(value) else "NOT met"


def target_rows(outcome: Outcome) -> list[str]:
    ratio = f"{outcome.ratio:.2f}x" if outcome.ratio is not None else "-"
    busy = (
        f"{outcome.busy_pct:.0f} % (mean of {outcome.busy_samples} nvidia-smi samples)"
        if outcome.busy_pct is not None
        else "- (no nvidia-smi samples)"
    )
    steady = outcome.e2e_s[-1] if outcome.e2e_s else None
    e2e = " / ".join(f"{s:.2f} s" for s in outcome.e2e_s) + " (first cold / then steady)" if outcome.e2e_s else "-"
    return [
        "| target (issue 12) | measured | verdict |",
        "|---|---|---|",
        f"| cross-study batching at {max(CONCURRENCY)} concurrent studies >= {BATCHING_TARGET:g}x one at a time "
        f"| {ratio} | {verdict(outcome.ratio, lambda r: r >= BATCHING_TARGET)} |",
        f"| GPU busy > {BUSY_TARGET_PCT:g} % during the batched run | {busy} "
        f"| {verdict(outcome.busy_pct, lambda b: b > BUSY_TARGET_PCT)} |",
        f"| 300-slice CT, last instance -> SR in the PACS, <= {E2E_TARGET_S:g} s plus the quiet period "
        f"(quiet period not counted) | {e2e} | {verdict(steady, lambda s: s <= E2E_TARGET_S)} |",
        f"| `pytest -m gpu` passes | {outcome.pytest_line} | {'met' if outcome.pytest_ok else 'NOT met'} |",
    ]


def device_lines() -> list[str]:
    import onnxruntime
    import torch

    name = torch.cuda.get_device_name(0)
    return [
        f"- GPU: {name} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)",
        f"- software: torch {torch.__version__} (CUDA {torch.version.cuda}), onnxruntime {onnxruntime.__version__} "
        f"({', '.join(onnxruntime.get_available_providers())})",
    ]


def report(outcome: Outcome) -> str:
    lines = [
        HEADING,
        "",
        "`make gpu-check` on a GPU server: `pytest -m gpu`, the inference benchmark on `cuda` (sections *Inference*: "
        "the studies/min, latencies and forward passes behind the ratio) and the end-to-end benchmark with the "
        "gateway's models on `cuda` (section *End to end*: the stages behind the seconds). GPU busy is "
        "`nvidia-smi --query-gpu=utilization.gpu` every 200 ms during the batched run at "
        f"{max(CONCURRENCY)} studies.",
        "",
        *target_rows(outcome),
        "",
        *([f"Failed steps: {'; '.join(outcome.failures)}.", ""] if outcome.failures else []),
        "Machine:",
        "",
        *machine(device_lines()),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(REPO)}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = cuda_missing()
    if missing is not None:
        print(f"gpu-check: cannot run here: {missing}", file=sys.stderr)
        return NO_CUDA_STATUS
    outcome = Outcome()
    steps: list[tuple[str, Callable[[], None]]] = [
        ("pytest -m gpu", lambda: run_gpu_tests(outcome)),
        ("inference benchmark", lambda: run_inference(outcome, not args.no_write)),
        ("end-to-end benchmark", lambda: run_e2e(outcome, not args.no_write)),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # one step's failure is reported; the next steps still run
            outcome.failures.append(f"{name}: {type(exc).__name__}: {exc}")
    text = report(outcome)
    print(text)
    if not args.no_write:
        write_section(DOC, text, HEADING)
        print(f"wrote {DOC.relative_to(REPO)}")
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
