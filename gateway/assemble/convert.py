"""``gateway volume``: files and folders in, one NIfTI + JSON sidecar per volume out (like dcm2niix).

The command line only parses arguments; this module finds the series, assembles them and writes the files.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError

from gateway.assemble.assemble import Refusal, assemble_sources
from gateway.assemble.model import Volume
from gateway.assemble.native import read_header_and_pixels
from gateway.assemble.nifti import write_nifti
from gateway.assemble.sources import SourceFile, source_from_header
from gateway.errors import AssemblyError
from gateway.paths import walk_files

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Written:
    """One volume written: where, and what it is."""

    series_label: str
    volume: Volume
    image: Path
    sidecar: Path


@dataclass
class ConversionReport:
    """Everything :func:`convert` did and refused."""

    written: list[Written] = field(default_factory=list)
    refused: list[tuple[str, Refusal]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


@dataclass
class SeriesFiles:
    """The files of one series, read once: the images' sources and the files refused on reading."""

    label: str
    sources: list[SourceFile] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


_NOT_DICOM = (InvalidDicomError, AttributeError, OSError, ValueError, EOFError)


def read_series(inputs: Iterable[Path]) -> tuple[dict[str, SeriesFiles], list[Path]]:
    """Read the header of each file under ``inputs`` once and group the files by SeriesInstanceUID.

    Parameters
    ----------
    inputs
        Files and folders (searched recursively).

    Returns
    -------
    tuple of (dict, list of pathlib.Path)
        Each series' label and files (images described, others refused with the reason), and the files that
        are not DICOM (or have no SeriesInstanceUID).
    """
    series: dict[str, SeriesFiles] = {}
    skipped: list[Path] = []
    for path in walk_files(inputs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds, pixels = read_header_and_pixels(path)
            uid = str(ds.SeriesInstanceUID)
        except _NOT_DICOM:
            skipped.append(path)
            continue
        files = series.get(uid)
        if files is None:
            files = series[uid] = SeriesFiles(
                _label(ds.get("SeriesNumber"), ds.get("SeriesDescription") or ds.get("Modality"))
            )
        try:
            files.sources.append(source_from_header(path, ds, pixels))
        except AssemblyError as exc:
            files.refused.append(Refusal(exc.reason, (), (path,)))
    return series, skipped


def convert(inputs: Iterable[Path], outdir: Path) -> ConversionReport:
    """Assemble every series found under ``inputs`` and write each volume to ``outdir``."""
    report = ConversionReport()
    series, report.skipped = read_series(inputs)
    outdir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for files in sorted(series.values(), key=lambda files: files.label):
        result = assemble_sources(files.sources, files.refused)
        report.refused.extend((files.label, refusal) for refusal in result.refused)
        for volume in result.volumes:
            stem = _unique(files.label, used)
            image, sidecar = write_nifti(volume, outdir / f"{stem}.nii")
            report.written.append(Written(files.label, volume, image, sidecar))
    return report


def _label(number: object, description: object) -> str:
    text = _UNSAFE.sub("_", str(description or "series")).strip("_") or "series"
    return f"{number}_{text}" if number not in (None, "") else text


def _unique(stem: str, used: set[str]) -> str:
    candidate, k = stem, 1
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}"
    used.add(candidate)
    return candidate
