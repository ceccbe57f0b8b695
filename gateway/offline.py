"""``gateway run``: the whole pipeline on files, no network: find series, assemble, route, infer, write the results.

The command line only parses arguments; this module does the work with the same stages ``gateway serve`` uses (the
same assembly, routing and runtime), so a data scientist sees offline exactly what the gateway would do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import Dataset, dcmread

import gateway
from gateway.assemble.assemble import Refusal, assemble_sources
from gateway.assemble.convert import SeriesFiles, read_series
from gateway.assemble.nifti import write_nifti
from gateway.encode import encode_result, write_objects
from gateway.infer.outputs import write_model_outputs
from gateway.infer.series import SeriesOutcome, run_models
from gateway.jobs.encoding import SERIES_NUMBER_BASE
from gateway.route.route import series_facts

if TYPE_CHECKING:
    from gateway.infer.results import ModelResult
    from gateway.infer.runtime import InferenceRuntime
    from gateway.registry.registry import RegisteredModel

__all__ = ["RunReport", "SeriesRun", "run_files"]


@dataclass(frozen=True)
class SeriesRun:
    """One series: its label, what was refused at assembly, and the routing/inference outcome."""

    label: str
    series_instance_uid: str
    volumes: int
    refused: tuple[Refusal, ...]
    outcome: SeriesOutcome | None
    files: tuple[Path, ...] = ()


@dataclass
class RunReport:
    """Everything :func:`run_files` did."""

    series: list[SeriesRun] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether any model failed or any stack was refused."""
        return any(s.refused or (s.outcome is not None and s.outcome.failures) for s in self.series)

    @property
    def results(self) -> int:
        """How many model results were written."""
        return sum(len(s.outcome.results) for s in self.series if s.outcome is not None)


def run_files(
    inputs: Iterable[Path],
    outdir: Path,
    models: Sequence[RegisteredModel],
    runtime: InferenceRuntime,
    *,
    write_volumes: bool = False,
    write_dicom: bool = True,
) -> RunReport:
    """Run ``models`` on every series found under ``inputs`` and write the results into ``outdir``.

    Parameters
    ----------
    inputs
        DICOM files and folders (searched recursively).
    outdir
        Output folder: per series and model, NIfTI label maps / masks / maps and a JSON summary, and the DICOM
        outputs; ``run.json`` holds every routing decision with its reason.
    models
        The models to consider (routing decides which apply to each series).
    runtime
        The inference runtime.
    write_volumes
        Also write each source volume as NIfTI (the outputs overlay it voxel for voxel).
    write_dicom
        Also write the DICOM outputs ``gateway serve`` would send (under ``dicom/<series>_<model>/``).

    Returns
    -------
    RunReport
        Per series: refusals, decisions, results, failures, files.
    """
    report = RunReport()
    series, report.skipped = read_series(inputs)
    outdir.mkdir(parents=True, exist_ok=True)
    for uid, files in sorted(series.items(), key=lambda item: item[1].label):
        report.series.append(_run_series(uid, files, outdir, models, runtime, write_volumes, write_dicom))
    (outdir / "run.json").write_text(json.dumps(_report_json(report), indent=2, default=str) + "\n", encoding="utf-8")
    return report


def _run_series(
    uid: str,
    series: SeriesFiles,
    outdir: Path,
    models: Sequence[RegisteredModel],
    runtime: InferenceRuntime,
    write_volumes: bool,
    write_dicom: bool,
) -> SeriesRun:
    label = series.label
    assembly = assemble_sources(series.sources, series.refused)
    if not assembly.volumes:
        return SeriesRun(label, uid, 0, assembly.refused, None)
    paths = sorted(source.path for source in series.sources)
    facts = series_facts(dcmread(paths[0], stop_before_pixels=True))
    outcome = run_models(facts, assembly.volumes, models, runtime)
    files: list[Path] = []
    sources = _sources(paths) if outcome.results and write_dicom else {}
    for k, volume in enumerate(assembly.volumes):
        stem = label if len(assembly.volumes) == 1 else f"{label}_{k + 1}"
        if write_volumes:
            files.extend(write_nifti(volume, outdir / f"{stem}.nii"))
        for n, result in enumerate(outcome.results):
            if result.volume is volume:
                files.extend(write_model_outputs(result, outdir, stem))
                if write_dicom:
                    files.extend(_write_dicom(result, sources, outdir / "dicom" / f"{stem}_{result.name}", n))
    return SeriesRun(label, uid, len(assembly.volumes), assembly.refused, outcome, tuple(files))


def _sources(paths: Sequence[Path]) -> dict[str, Dataset]:
    """The series' instances by SOP Instance UID (what the encoders reference: headers, no pixels)."""
    datasets = (dcmread(path, stop_before_pixels=True) for path in paths)
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def _write_dicom(result: ModelResult, sources: Mapping[str, Dataset], folder: Path, index: int) -> list[Path]:
    """The result as DICOM, as ``gateway serve`` sends them: a SEG, its TID 1500 SR, the outlines (GSPS), key
    objects (KO) and burned-in key images (SC, which only the destinations that ask for them get); or Parametric
    Maps."""
    objects = encode_result(
        result,
        sources,
        series_number=SERIES_NUMBER_BASE + 10 * index,
        gateway_version=gateway.__version__,
        key_images=True,
    )
    return write_objects(objects, folder)


def _report_json(report: RunReport) -> dict[str, Any]:
    return {
        "series": [
            {
                "label": s.label,
                "SeriesInstanceUID": s.series_instance_uid,
                "volumes": s.volumes,
                "refused": [r.reason for r in s.refused],
                **(s.outcome.summary() if s.outcome is not None else {}),
                "files": [p.name for p in s.files],
            }
            for s in report.series
        ],
        "skipped_files": len(report.skipped),
    }
