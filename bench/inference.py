"""Inference benchmark: 1, 4 and 16 concurrent synthetic CT studies through ct-tissue and ct-nodule-unet, batching on
and off.

Each study is a synthetic thorax CT written once as DICOM (``--slices`` x ``--size``^2, 360 mm field of view, a
different seed per study). For every (concurrency, batching) cell, that many studies start at once, each in its own
thread, and go through the gateway's own stages as ``gateway serve`` runs them after series completion: assembly
(``assemble_series``), routing against the two shipped models, and inference through one shared
``InferenceRuntime`` (one loaded session per model; with batching on, a batcher per model merges sliding-window
patches of concurrent studies into one forward pass up to the model's batch limit). The runtime is warmed up on one
study first, so model loading is not timed.

Reported per cell: studies/min (studies / wall time of the cell), p50/p95 latency per stage (assemble; infer =
both models, queueing included; total), forward passes and mean items per pass, and the batchers' busy share of the
inference wall time (GPU busy when the device is a GPU). The ratio column compares batching on with off at the same
concurrency.

Run ``python bench/inference.py`` (``make bench``); ``--no-write`` leaves ``docs/benchmarks.md`` alone;
``--device cuda`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import machine, write_section  # noqa: E402  (bench/ is not a package)

from gateway.assemble.assemble import assemble_series  # noqa: E402
from gateway.infer.runtime import InferenceRuntime  # noqa: E402
from gateway.infer.series import run_models  # noqa: E402
from gateway.registry.registry import Registry, RegistryIndex  # noqa: E402
from gateway.route.route import series_facts  # noqa: E402
from gateway.synth.ct import write_synthetic_ct  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## Inference (bench/inference.py)"
MODELS = ("ct-tissue", "ct-nodule-unet")


@dataclass
class StudyTiming:
    """Seconds per stage for one study."""

    assemble: float = 0.0
    infer: float = 0.0
    total: float = 0.0


@dataclass
class Cell:
    """One (concurrency, batching) measurement."""

    concurrency: int
    batching: bool
    wall: float = 0.0
    studies: list[StudyTiming] = field(default_factory=list)
    passes: int = 0
    items: int = 0
    busy: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def per_min(self) -> float:
        return 60.0 * len(self.studies) / self.wall

    def pct(self, stage: str, q: float) -> float:
        values = sorted(getattr(s, stage) for s in self.studies)
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def write_studies(root: Path, count: int, slices: int, size: int) -> list[Path]:
    folders = []
    for k in range(count):
        folder = root / f"study{k:02d}"
        write_synthetic_ct(folder, slices, rows=size, columns=size, seed=100 + k, fresh_uids=True)
        folders.append(folder)
    return folders


def one_study(folder: Path, models: Sequence, runtime: InferenceRuntime, timing: StudyTiming, errors: list) -> None:
    started = time.perf_counter()
    paths = sorted(folder.glob("*.dcm"))
    assembly = assemble_series(paths)
    assembled = time.perf_counter()
    from pydicom import dcmread

    outcome = run_models(series_facts(dcmread(paths[0], stop_before_pixels=True)), assembly.volumes, models, runtime)
    done = time.perf_counter()
    timing.assemble, timing.infer, timing.total = assembled - started, done - assembled, done - started
    ran = {r.name for r in outcome.results}
    if ran != set(MODELS) or outcome.failures:
        errors.append(f"{folder.name}: ran {sorted(ran)}, failures {[f.reason for f in outcome.failures]}")


def measure(folders: Sequence[Path], models: Sequence, concurrency: int, batching: bool, device: str) -> Cell:
    cell = Cell(concurrency, batching)
    runtime = InferenceRuntime(device, batching=batching)
    try:
        one_study(folders[0], models, runtime, StudyTiming(), cell.failures)  # warm-up: load the sessions
        before = runtime.stats()
        timings = [StudyTiming() for _ in range(concurrency)]
        threads = [
            threading.Thread(target=one_study, args=(folders[k], models, runtime, timings[k], cell.failures))
            for k in range(concurrency)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cell.wall = time.perf_counter() - started
        cell.studies = timings
        after = runtime.stats()
        for key, stats in after.items():
            prior = before.get(key)
            cell.passes += stats.forward_passes - (prior.forward_passes if prior else 0)
            cell.items += stats.items - (prior.items if prior else 0)
            cell.busy += stats.busy_s - (prior.busy_s if prior else 0.0)
    finally:
        runtime.close()
    return cell


def table(cells: Sequence[Cell]) -> list[str]:
    off = {c.concurrency: c for c in cells if not c.batching}
    lines = [
        "| studies at once | batching | studies/min | on / off | assemble p50 / p95 s | infer p50 / p95 s "
        "| total p50 / p95 s | forward passes | items / pass | busy % of wall |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        ratio = f"{c.per_min / off[c.concurrency].per_min:.2f}" if c.batching and c.concurrency in off else "-"
        infer_wall = max((s.infer for s in c.studies), default=0.0) or 1.0
        lines.append(
            f"| {c.concurrency} | {'on' if c.batching else 'off'} | {c.per_min:.1f} | {ratio} "
            f"| {c.pct('assemble', 0.5):.2f} / {c.pct('assemble', 0.95):.2f} "
            f"| {c.pct('infer', 0.5):.2f} / {c.pct('infer', 0.95):.2f} "
            f"| {c.pct('total', 0.5):.2f} / {c.pct('total', 0.95):.2f} "
            f"| {c.passes} | {c.items / max(c.passes, 1):.1f} | {100 * min(c.busy / infer_wall, 1.0):.0f} |"
        )
    return lines


def verdicts(cells: Sequence[Cell], device: str) -> list[str]:
    by = {(c.concurrency, c.batching): c for c in cells}
    top = max(c.concurrency for c in cells)
    on, off = by.get((top, True)), by.get((top, False))
    if on is None or off is None:
        return []
    goal = 3.0 if device.startswith("cuda") else 1.3
    ratio = on.per_min / off.per_min
    p95_on, p95_off = on.pct("total", 0.95), off.pct("total", 0.95)
    return [
        f"- throughput at {top} studies, batching on / off = {ratio:.2f}x (target >= {goal}x): "
        f"{'met' if ratio >= goal else 'NOT met'}",
        f"- p95 total latency at {top} studies, on {p95_on:.1f} s vs off {p95_off:.1f} s (target: no worse): "
        f"{'met' if p95_on <= p95_off * 1.05 else 'NOT met'}",
    ] + (
        []
        if device.startswith("cuda")
        else [
            "- GPU targets (>= 3x, GPU busy > 80% of the inference stage): not measured here, no GPU "
            "(`python bench/inference.py --device cuda` on a GPU machine)"
        ]
    )


def section(cells: Sequence[Cell], args: argparse.Namespace, device: str) -> str:
    import torch

    lines = [
        HEADING,
        "",
        f"Synthetic thorax CT studies ({args.slices} slices of {args.size}x{args.size}, 360 mm field of view), "
        f"each through assembly, routing and both `{'` and `'.join(MODELS)}` on `{device}`, N studies started at "
        "once in N threads sharing one runtime (sessions loaded before timing). Batching on: one batcher per model "
        "merges the sliding-window patches of concurrent studies up to the model's batch limit; off: one at a "
        "time, every patch in a forward pass of its own. `infer` is both models, queueing included; `busy %` is "
        "the batchers' forward-pass time over the longest inference stage.",
        "",
        *table(cells),
        "",
        "Targets from the issue:",
        "",
        *verdicts(cells, device),
        "",
        "Machine:",
        "",
        *machine([f"- software: torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)"]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md alone")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from gateway.config import get_settings
    from gateway.infer.backends import resolve_device
    from gateway.registry.registry import shipped_models_dir

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        root = Path(tmp)
        settings = get_settings(None, store={"data_dir": root / "data"})
        index = RegistryIndex(settings.store)
        registry = Registry(index)
        registry.register_shipped(shipped_models_dir(settings.models))
        models = [registry.get(name) for name in MODELS]
        print(f"writing {max(args.concurrency)} studies ...", flush=True)
        folders = write_studies(root / "studies", max(args.concurrency), args.slices, args.size)
        cells = []
        for n in args.concurrency:
            for batching in (False, True):
                cell = measure(folders, models, n, batching, device)
                print(
                    f"{n:>3} studies, batching {'on ' if batching else 'off'}: {cell.per_min:.1f} studies/min",
                    flush=True,
                )
                if cell.failures:
                    print("  failures:", *cell.failures, sep="\n    ")
                    return 1
                cells.append(cell)
        index.close()
    text = section(cells, args, device)
    print(text)
    if not args.no_write:
        write_section(DOC, text, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
