"""What people see, looked at the way they see it: the report in DCMTK's dsr2html opened in headless Chromium, the
outlines as DCMTK renders the presentation state, and a burned-in key image.

The shipped ct-nodule-unet runs on a chest phantom with three nodules of known size. Set ``GATEWAY_PICTURES`` to a
folder (``make pictures`` sets ``docs/images``) to keep the pictures: the README shows them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from encode_cases import GATEWAY_VERSION, Case, run_model, three_nodule_ct
from PIL import Image
from presentation import off_boundary, overlay, render

from gateway.encode import encode_result, write_objects
from gateway.infer.results import ModelResult

from conftest import require_tool
from peers import screenshot

pytestmark = pytest.mark.slow


def keep(picture: Path, name: str) -> None:
    """Copy a picture into ``$GATEWAY_PICTURES`` when it is set."""
    folder = os.environ.get("GATEWAY_PICTURES")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(picture, Path(folder) / name)


def dsr2html(report: Path, page: Path) -> Path:
    """DCMTK's HTML rendering of a structured report."""
    tool = require_tool("dsr2html")
    run = subprocess.run([tool, str(report), str(page)], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    return page


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return three_nodule_ct(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def result(case: Case) -> ModelResult:
    return run_model("ct-nodule-unet", case.volume)


@pytest.fixture(scope="module")
def written(result: ModelResult, case: Case, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    objects = encode_result(result, case.sources, series_number=40, gateway_version=GATEWAY_VERSION, key_images=True)
    out: dict[str, list[Path]] = {}
    for obj, path in zip(objects, write_objects(objects, tmp_path_factory.mktemp("out")), strict=True):
        out.setdefault(obj.kind, []).append(path)
    return out


def test_the_report_reads_one_finding_per_nodule_with_rounded_numbers(
    written: dict[str, list[Path]], tmp_path: Path
) -> None:
    page = dsr2html(written["SR"][0], tmp_path / "report.html")
    text = screenshot(page, tmp_path / "report.png")
    for n in (1, 2, 3):
        assert f"nodule {n}" in text
    volumes = re.findall(r"Volume:\s*(\S+) ml", text)
    assert len(volumes) == 3 and all(re.fullmatch(r"\d+(\.\d{1,2})?", v) for v in volumes), volumes
    assert len(re.findall(r"Long axis:\s*\d+(\.\d)? mm", text)) == 3
    assert len(re.findall(r"Probability:\s*\d+ %", text)) == 3
    assert not re.search(r"\d\.\d{3,} (ml|mm|%|\[hnsf'U\])", text), "no measurement with a float's every digit"
    assert "not reviewed by a physician" in text and "Intended use: Demonstration" in text
    assert "largest cross-section on image" in text
    pixels = np.asarray(Image.open(tmp_path / "report.png").convert("L"))
    assert pixels.shape[1] == 1000 and (pixels < 128).mean() > 0.01, "a page with text on it"
    keep(tmp_path / "report.png", "report.png")


def test_dcmtk_shows_each_nodule_outlined_on_its_key_image(
    written: dict[str, list[Path]], result: ModelResult, case: Case, tmp_path: Path
) -> None:
    """dcmp2pgm renders the largest image of nodule 1 under the presentation state; the outlines DCMTK read for it
    lie on the nodule's boundary, and carry its label."""
    lesion = result.lesions[1].lesions[0]
    key = result.volume.slices[lesion.key_slice].sop_instance_uid
    path = next(p for p in case.paths if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == key)
    rendering = render(written["GSPS"][0], path, tmp_path / "key.pgm")
    layer = rendering.layers["NODULE"]
    assert any(text.startswith("nodule 1: ") for text in layer.texts)
    mask = lesion.mask_on(lesion.key_slice, result.volume.array.shape[1:])
    closed = [points for points in layer.polylines() if len(points) > 2 and np.array_equal(points[0], points[-1])]
    assert any(off_boundary(points, mask) <= 1.0 for points in closed)
    assert len(layer.polylines()) == len(closed) + 2, "the outline, and the long and short axis"
    picture = tmp_path / "outlines.png"
    overlay(rendering, {"NODULE": (255, 64, 64)}, scale=3).save(picture)
    keep(picture, "outlines.png")


def test_a_burned_in_key_image_per_nodule(written: dict[str, list[Path]], tmp_path: Path) -> None:
    assert len(written["SC"]) == 3
    ds = pydicom.dcmread(written["SC"][0])
    assert ds.BurnedInAnnotation == "YES" and "nodule 1" in ds.ImageComments
    picture = tmp_path / "key-image.png"
    Image.fromarray(ds.pixel_array).save(picture)
    keep(picture, "key-image.png")
