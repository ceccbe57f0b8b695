"""The results of a job for a radiologist (gateway.ui.results, report, overlay), on a job run through the gateway's
real stages (tests/finished_job.py): the SR read as a report and checked against DCMTK's dsr2html, the page in
Chromium with rounded measurements and units, the overlay PNGs' outline on the phantom's nodule, stepping through
slices, the viewer link, and bad parameters refused with 400."""

from __future__ import annotations

import html
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway.config import RetentionSettings, UiSettings
from gateway.store.retention import DAY_S, Retention
from gateway.store.store import InstanceStore
from gateway.ui.overlay import MAX_SIDE, MIN_SIDE, display_size, read_layout
from gateway.ui.report import Report, for_reading, read_report, readable_unit
from gateway.ui.results import Preview, results_view

from browser import new_page, open_browser
from conftest import ADMIN, LiveServer, require_tool
from finished_job import SIZE, FinishedJob, pixel_of, run_job

HU = "[hnsf'U]"
VIEWER = "http://viewer.test/viewer?StudyInstanceUIDs={study}"
NODULE_COLOUR = (255, 64, 64)  # ct-nodule-unet's nodule: RGB [255, 64, 64] in its manifest, through CIELab and back


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> FinishedJob:
    return run_job(tmp_path_factory.mktemp("results"), maps=True)


@pytest.fixture(scope="module")
def server(job: FinishedJob) -> Iterator[LiveServer]:
    with LiveServer(job.settings(ui=UiSettings(viewer_url=VIEWER))) as live:
        yield live


def get(server: LiveServer, path: str, **params: Any) -> httpx.Response:
    return httpx.get(server.url + path, params=params, headers=ADMIN, timeout=30)


def sr_report(job: FinishedJob) -> tuple[Path, Report]:
    ((_, sr),) = job.outputs("SR")
    path = job.data_dir / "outputs" / sr["file"]
    return path, read_report(path)


def previews(server: LiveServer, job: FinishedJob) -> dict[str, Preview]:
    view = results_view(server.app.state.store, job.job_id, viewer_url=None, dicomweb_root="")
    return {p.title: p for model in view.models for p in model.previews}


def png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(BytesIO(response.content)).convert("RGB"))


def coloured(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """(row, column) of the pixels of exactly ``colour``."""
    return np.argwhere(np.all(image == np.asarray(colour, dtype=np.uint8), axis=2))


# -------------------------------------------------------------------------------------------------- the report


@pytest.mark.parametrize(
    ("value", "ucum", "shown"),
    [
        ("2.68", "ml", "2.7"),
        ("2.65", "ml", "2.7"),  # halves away from zero, as on paper
        ("0.268", "ml", "0.27"),
        ("0.0312", "ml", "0.031"),
        ("1234.5", "ml", "1230"),
        ("18.553", "mm", "18.6"),
        ("123.44", "mm", "123"),
        ("27.96", "[hnsf'U]", "28"),
        ("136.4", "[hnsf'U]", "136"),
        ("-0.4", "[hnsf'U]", "0"),
        ("-612.5", "[hnsf'U]", "-613"),
        ("99.6", "%", "100"),
        ("0.93", "1", "0.93"),
        ("0.00123456", "mm2/s", "0.00123"),
        ("1523.7", "um2/s", "1520"),
        ("12", "mm", "12"),
        ("not a number", "mm", "not a number"),
    ],
)
def test_values_are_rounded_as_a_radiologist_writes_them(value: str, ucum: str, shown: str) -> None:
    assert for_reading(value, ucum) == shown


@pytest.mark.parametrize(
    ("ucum", "shown"),
    [("[hnsf'U]", "HU"), ("ml", "ml"), ("mm", "mm"), ("mm2", "mm²"), ("mm3", "mm³"), ("um2/s", "µm²/s"), ("1", "")],
)
def test_units_read_as_people_write_them(ucum: str, shown: str) -> None:
    assert readable_unit(ucum) == shown


def test_the_sr_reads_as_a_report(job: FinishedJob) -> None:
    _, report = sr_report(job)
    assert report.title == "Imaging Measurement Report"
    assert report.device.name == "ct-nodule-unet 1.1.0" and report.device.manufacturer == "DICOM AI Gateway"
    assert report.statement is not None and "not reviewed by a physician" in report.statement
    assert report.intended_use is not None and report.intended_use.startswith("Demonstration")
    assert report.procedure == "Computed tomography"
    (result,) = [r for r in job.detail["inference"]["results"] if r["model"].startswith("ct-nodule-unet")]
    (lesions,) = result["lesions"]
    assert [f.tracking_id for f in report.findings] == [f"nodule {n['number']}" for n in lesions["lesions"]]
    for finding, lesion in zip(report.findings, lesions["lesions"], strict=True):
        assert finding.finding_type == "Nodule"
        assert finding.evaluations == ("Pulmonary nodule: Present",)
        assert finding.images and finding.centre is not None
        assert np.allclose(finding.centre, lesion["centre"], atol=1e-3)
        shown = {m.label: m.text for m in finding.measurements}
        for key, label, unit in (("volume", "Volume", "ml"), ("long_axis", "Long axis", "mm")):
            assert shown[label] == f"{for_reading(lesion['values'][key], unit)} {unit}"
        mean = shown["Attenuation coefficient (mean)"]
        assert re.fullmatch(r"-?\d+ HU", mean) and mean == for_reading(lesion["values"]["mean"], HU) + " HU"
        assert any(c.startswith("largest cross-section on image") for c in finding.comments)


def test_the_report_says_what_dcmtks_dsr2html_says(job: FinishedJob) -> None:
    dsr2html = require_tool("dsr2html")
    path, report = sr_report(job)
    page = subprocess.run([dsr2html, str(path)], capture_output=True, text=True, check=True).stdout
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    assert f'Device Observer Name = "{report.device.name}"' in text
    assert report.intended_use is not None and report.intended_use[:60] in text
    for finding in report.findings:
        assert f'Tracking Identifier = "{finding.tracking_id}"' in text
        assert f"Finding: {finding.finding_type}" in text
        for m in finding.measurements:
            assert f"{m.name}: {m.written} {m.ucum}" in text  # the value as the SR holds it ...
            assert m.value == for_reading(m.written, m.ucum)  # ... and as it is shown
        for comment in finding.comments:
            assert f"Comment: {comment}" in text


# ---------------------------------------------------------------------------------------------------- the page


def test_the_page_shows_rounded_measurements_with_units_in_a_browser(
    server: LiveServer, job: FinishedJob, tmp_path: Path
) -> None:
    _, report = sr_report(job)
    with open_browser() as browser, new_page(browser, server.url) as page:
        page.set_extra_http_headers(ADMIN)
        page.goto(f"/ui/jobs/{job.job_id}/results")
        page.wait_for_load_state("networkidle")
        text = page.locator("main").inner_text()
        for finding in report.findings:
            assert finding.title in text
            for m in finding.measurements:
                assert f"{m.label}: {m.text}" in text, m
        assert re.search(r"Volume: \d+\.\d ml", text) and re.search(r"Attenuation coefficient \(mean\): -?\d+ HU", text)
        assert "SYNTH, PHANTOM" in text and "SYNTH0001" in text, "whose study it is"
        assert "not reviewed by a physician" in text and "Intended use:" in text
        images = page.locator("figure.preview img")
        assert images.count() == 3  # nodule 1, nodule 2, the parametric map
        assert all(img.evaluate("i => i.complete && i.naturalWidth > 0") for img in images.all()), "every PNG shows"
        page.screenshot(path=str(tmp_path / "results.png"), full_page=True)
        assert page.problems == []  # type: ignore[attr-defined]


def test_next_and_previous_step_through_the_lesions_slices_in_place(server: LiveServer, job: FinishedJob) -> None:
    nodule = previews(server, job)["nodule 1"]
    assert nodule.slice == nodule.key and nodule.next is not None
    with open_browser() as browser, new_page(browser, server.url) as page:
        page.set_extra_http_headers(ADMIN)
        page.goto(f"/ui/jobs/{job.job_id}/results")
        figure = page.locator(f"#{nodule.anchor}")
        assert "key slice" in figure.inner_text()
        figure.locator("a", has_text="next").click()
        page.wait_for_selector(f"#{nodule.anchor} img[src$='slice={nodule.next}']")
        assert f"slice {nodule.position + 1} of {len(nodule.slices)}" in page.locator(f"#{nodule.anchor}").inner_text()
        page.locator(f"#{nodule.anchor} a", has_text="back to the key slice").click()
        page.wait_for_selector(f"#{nodule.anchor} img[src$='slice={nodule.key}']")
        assert page.problems == []  # type: ignore[attr-defined]


def test_the_viewer_link_and_the_dicomweb_root(server: LiveServer, job: FinishedJob, tmp_path: Path) -> None:
    page = get(server, f"/ui/jobs/{job.job_id}/results").text
    study = job.ct.study_instance_uid
    assert f'href="http://viewer.test/viewer?StudyInstanceUIDs={study}"' in page
    assert f'value="{server.url}/dicomweb"' in page
    with LiveServer(job.settings()) as plain:
        page = get(plain, f"/ui/jobs/{job.job_id}/results").text
    assert "Open the study in the viewer" not in page and "ui.viewer_url" in page


def test_patient_data_never_reaches_the_log(
    server: LiveServer, job: FinishedJob, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    nodule = previews(server, job)["nodule 1"]
    assert get(server, f"/ui/jobs/{job.job_id}/results").status_code == 200
    assert get(server, f"/ui/jobs/{job.job_id}/overlay", output=0, segment=1, slice=nodule.key).status_code == 200
    assert get(server, f"/ui/jobs/{job.job_id}/overlay", output=0, segment=1, slice=999).status_code == 400
    logged = caplog.text.upper()
    assert "PHANTOM" not in logged and "SYNTH0001" not in logged


# -------------------------------------------------------------------------------------------------- overlays


def test_the_outline_lies_on_the_nodule_in_its_colour(server: LiveServer, job: FinishedJob) -> None:
    nodule = previews(server, job)["nodule 1"]
    truth = max(job.nodules, key=lambda n: n.radius_mm)  # nodule 1 is the largest
    image = png(get(server, f"/ui/jobs/{job.job_id}/overlay", output=0, segment=1, slice=nodule.key))
    assert image.shape == (MIN_SIDE, MIN_SIDE, 3), "160 px scaled up to 512"
    scale = MIN_SIDE / SIZE
    column, row = pixel_of(truth)
    centre = np.array([(row + 0.5) * scale, (column + 0.5) * scale])
    outline = coloured(image, NODULE_COLOUR)
    assert len(outline) > 100, "an outline in the segment's colour"
    distance = np.linalg.norm(outline - centre, axis=1)
    radius_px = truth.radius_mm / (360 / SIZE) * scale
    assert distance.max() < radius_px + 3 * scale, "every outline pixel on the nodule's edge"
    assert distance.min() > 0.5 * radius_px, "an outline, not a filled disc"
    assert np.all(image[int(centre[0]), int(centre[1])] == image[int(centre[0]), int(centre[1])][0]), "grey inside"


def test_a_slice_of_the_other_nodule_has_no_outline_here(server: LiveServer, job: FinishedJob) -> None:
    shown = previews(server, job)
    other = shown["nodule 2"]
    truth = max(job.nodules, key=lambda n: n.radius_mm)
    image = png(get(server, f"/ui/jobs/{job.job_id}/overlay", output=0, segment=1, slice=other.key))
    column, row = pixel_of(truth)
    scale = MIN_SIDE / SIZE
    outline = coloured(image, NODULE_COLOUR)
    assert len(outline) > 0, "nodule 2's own outline"
    assert np.linalg.norm(outline - [(row + 0.5) * scale, (column + 0.5) * scale], axis=1).min() > 20 * scale


def test_the_parametric_map_is_a_colour_map_with_a_scale(server: LiveServer, job: FinishedJob) -> None:
    ((index, pm),) = job.outputs("PM")
    preview = next(p for p in previews(server, job).values() if p.kind == "PM")
    layout = read_layout(job.data_dir / "outputs" / pm["file"])
    assert len(preview.slices) == len(layout.planes) == 48
    image = png(get(server, f"/ui/jobs/{job.job_id}/overlay", output=index, slice=preview.key))
    assert image.shape[0] == MIN_SIDE and image.shape[1] > MIN_SIDE, "the picture and the scale at its right"
    body = image[MIN_SIDE // 2 - 50 : MIN_SIDE // 2 + 50, MIN_SIDE // 2 - 50 : MIN_SIDE // 2 + 50].astype(int)
    assert (np.ptp(body, axis=2) > 20).mean() > 0.5, "colours, not grey, over the body"


@pytest.mark.parametrize(
    ("rows", "columns", "spacing", "size"),
    [
        (160, 160, (2.25, 2.25), (MIN_SIDE, MIN_SIDE)),  # small images are scaled up
        (4096, 2048, (0.1, 0.1), (MAX_SIDE // 2, MAX_SIDE)),  # large ones down: bounded work
        (512, 256, (0.5, 1.0), (512, 512)),  # square pixels on the patient
        (700, 700, (0.7, 0.7), (700, 700)),
    ],
)
def test_pictures_are_sized_within_bounds(
    rows: int, columns: int, spacing: tuple[float, float], size: tuple[int, int]
) -> None:
    assert display_size(rows, columns, spacing) == size


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"output": "abc", "segment": "1", "slice": "0"}, "output: a number"),
        ({"output": "-1", "segment": "1", "slice": "0"}, "output: a number"),
        ({"output": "99", "segment": "1", "slice": "0"}, "output: the job has 5 outputs"),
        ({"output": "1", "slice": "0"}, "only a SEG or a Parametric Map"),
        ({"output": "0", "segment": "7", "slice": "0"}, "segment: the SEG's segments are 1"),
        ({"output": "0", "segment": "1", "slice": "9999"}, "slice: the output has"),
        ({"output": "0", "segment": "1"}, "required"),
        ({"output": "0", "segment": "1", "slice": "10000000000000000000000"}, "slice: a number"),
    ],
)
def test_bad_overlay_parameters_are_400_with_the_reason(
    server: LiveServer, job: FinishedJob, params: dict[str, str], reason: str
) -> None:
    response = get(server, f"/ui/jobs/{job.job_id}/overlay", **params)
    assert response.status_code == 400
    assert reason in html.unescape(response.text)


def test_an_unknown_job_is_404(server: LiveServer) -> None:
    assert get(server, "/ui/jobs/999/results").status_code == 404
    assert get(server, "/ui/jobs/999/overlay", output=0, segment=1, slice=0).status_code == 404


def test_a_slice_the_lesion_does_not_touch_is_400_on_the_page(server: LiveServer, job: FinishedJob) -> None:
    nodule = previews(server, job)["nodule 1"]
    outside = next(k for k in range(100) if k not in nodule.slices)
    response = get(server, f"/ui/jobs/{job.job_id}/results", output=0, segment=1, lesion=1, slice=outside)
    assert response.status_code == 400 and "nodule 1 lies on" in html.unescape(response.text)
    fragment = get(server, f"/ui/jobs/{job.job_id}/results/preview", output=0, segment=1, lesion=1, slice=outside)
    assert fragment.status_code == 400


def test_the_page_and_its_pictures_need_a_token(server: LiveServer, job: FinishedJob) -> None:
    for path in (f"/ui/jobs/{job.job_id}/results", f"/ui/jobs/{job.job_id}/overlay?output=0&segment=1&slice=0"):
        assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 401


def test_a_job_whose_outputs_were_purged_says_so(job: FinishedJob, tmp_path: Path) -> None:
    copy = FinishedJob(shutil.copytree(job.data_dir, tmp_path / "data"), job.job_id, job.ct, job.detail)
    store = InstanceStore(copy.settings().store)
    try:
        days = RetentionSettings(instances_days=None, outputs_days=1, failed_days=None, disk_high_watermark=1.0)
        assert Retention(store, days, 0).run(now=time.time() + 2 * DAY_S).outputs == 1
    finally:
        store.close()
    with LiveServer(copy.settings()) as server:
        page = get(server, f"/ui/jobs/{job.job_id}/results")
        assert page.status_code == 200
        assert "were removed by retention" in page.text and "its file is no longer held" in page.text
        assert get(server, f"/ui/jobs/{job.job_id}/overlay", output=0, segment=1, slice=0).status_code == 404
