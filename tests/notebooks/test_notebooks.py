"""The notebooks run from top to bottom in a fresh kernel (a notebook that no longer runs is a broken document),
leave nothing behind in the temporary folder, and say no number in their prose that their outputs do not show.

The notebooks that read a gateway's results run against a real one: ``gateway serve`` (its console script) running
``ct-nodule-unet`` and sending its results by STOW-RS to a real Orthanc, the PACS they are read back from. Their
parameters are set as papermill sets them: a cell after the one tagged ``parameters``. What a notebook computed is
read from its kernel by a probe cell run after its last cell (and not kept), then checked against the job's own
record (``GET /api/jobs/{id}``) and against the phantom's truth, computed here independently.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nbformat
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from nbclient import NotebookClient
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from gateway.infer.measure import for_reading
from gateway.synth.ct import SynthCT, VolumeGeometry, nodule_mask, place_nodules, write_synthetic_ct

from conftest import require_tool
from peers import ADMIN_TOKEN, Orthanc, ServedGateway, dicomweb_plugin, orthanc_binary

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
MODEL = Path(__file__).resolve().parents[2] / "models" / "ct-nodule-unet"
#: The prefix of the work folder the notebook makes in the temporary folder.
WORK_PREFIX = "gateway-notebook-"
_NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w.])")
#: What the probe cell prints its answer after, on a line of its own.
_PROBE = "notebook-probe:"
FINAL = ("exported", "failed", "skipped", "cancelled")
SLICES, SIZE = 48, 160


def outputs_text(notebook: nbformat.NotebookNode) -> str:
    """Everything the code cells printed or displayed."""
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def prose_numbers(notebook: nbformat.NotebookNode) -> set[float]:
    """The numbers in the markdown cells, less headings and the numbers of numbered lists."""
    numbers = set()
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            if line.startswith("#"):
                continue
            line = re.sub(r"^\s*\d+\.\s", "", line)
            numbers.update(float(n) for n in _NUMBER.findall(line))
    return numbers


def inject(notebook: nbformat.NotebookNode, parameters: Mapping[str, Any]) -> None:
    """Set parameters as papermill does: a cell of assignments after the cell tagged ``parameters``."""
    (index,) = [k for k, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    declared = set(re.findall(r"^(\w+)\s*=", notebook.cells[index].source, re.MULTILINE))
    assert set(parameters) <= declared, f"not parameters of the notebook: {set(parameters) - declared}"
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)


def run(
    name: str, folder: Path, parameters: Mapping[str, Any] | None = None, probe: str | None = None
) -> tuple[nbformat.NotebookNode, Any]:
    """Execute a notebook in a fresh kernel whose working folder is ``folder``; with ``probe``, an expression
    evaluated in the kernel after the last cell, returned decoded from JSON (its cell is then removed)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    if parameters:
        inject(notebook, parameters)
    if probe is not None:
        notebook.cells.append(
            nbformat.v4.new_code_cell(f"import json as _json\nprint({_PROBE!r}, _json.dumps({probe}))")
        )
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
    client.execute()
    if probe is None:
        return notebook, None
    cell = notebook.cells.pop()
    text = "".join(out.get("text", "") for out in cell.outputs)
    return notebook, json.loads(text.split(_PROBE, 1)[1])


def assert_prose_shown(notebook: nbformat.NotebookNode) -> None:
    """Every number its prose states is one its outputs show (computed, or an input it prints)."""
    shown = {float(n) for n in re.findall(r"\d+(?:\.\d+)?", outputs_text(notebook))}
    assert prose_numbers(notebook) <= shown, f"prose numbers not in the outputs: {prose_numbers(notebook) - shown}"


def images_shown(notebook: nbformat.NotebookNode) -> int:
    """How many images (PNG) the code cells displayed."""
    return sum(
        "image/png" in out.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["register_a_model.ipynb"])
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's own warning about its future default
    temp = Path(tempfile.gettempdir())  # the kernel's too: it inherits this environment
    before = set(os.listdir(temp))
    notebook, _ = run(name, tmp_path)
    outputs = outputs_text(notebook)
    new = set(os.listdir(temp)) - before
    assert "ct-bone@0.1.0 runs" in outputs
    assert "refused:" in outputs and "patch_size" in outputs
    assert "ct-bone@0.2.0 does not run:" in outputs and "min_slices" in outputs

    # Nothing left behind: its work folder (it prints where) is gone, and no other new entry of the temporary
    # folder is one the notebook made (other processes on the machine may add their own meanwhile).
    (work,) = set(re.findall(rf"{re.escape(str(temp))}/({WORK_PREFIX}\w+)", outputs))
    assert not (temp / work).exists(), f"{temp / work} left behind"
    assert f"removed {temp / work}: True" in outputs
    left = {entry for entry in new if entry.startswith(WORK_PREFIX) or entry in outputs}
    assert not left, f"the notebook left {sorted(left)} in {temp}"
    assert_prose_shown(notebook)


# -- notebooks over a running gateway and a PACS ----------------------------------------------------------------


@dataclass
class Peers:
    """A served gateway running ``ct-nodule-unet`` that sends its results by STOW-RS to Orthanc."""

    gateway: ServedGateway
    orthanc: Orthanc

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    def job_of(self, series_instance_uid: str) -> dict[str, Any] | None:
        """The newest job of a series, in full, or ``None``."""
        jobs = [j for j in self.gateway.api("/jobs?limit=1000") if j["series_instance_uid"] == series_instance_uid]
        return self.gateway.api(f"/jobs/{jobs[0]['id']}") if jobs else None

    def wait_for_job(self, series_instance_uid: str, timeout_s: float = 300) -> dict[str, Any]:
        """The series' job once it is final; it must have been exported."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job_of(series_instance_uid)
            if job is not None and job["state"] in FINAL:
                assert job["state"] == "exported", job["detail"]
                return job
            time.sleep(0.5)
        raise AssertionError(f"no finished job for the series after {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    if orthanc_binary() is None:
        require_tool("Orthanc")
    if dicomweb_plugin() is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (make test installs orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("peers")
    with Orthanc(root / "orthanc") as orthanc:
        sections = {
            "ingest": {"quiet_period_s": 1.0, "completion_poll_s": 0.2},
            "jobs": {"workers": 1, "poll_s": 0.2},
            "export": {
                "destinations": {"pacs": {"stow_url": f"{orthanc.dicomweb_url}/studies"}},
                "default": ["pacs"],
                "backoff_initial_s": 0.2,
                "backoff_max_s": 0.5,
                "poll_s": 0.1,
                "workers": 1,
            },
        }
        gateway = ServedGateway(root / "gateway", root / "data", sections)
        config = ["--config", str(gateway.config_path)]
        gateway.cli("models", "register", str(MODEL), *config)
        gateway.cli("models", "enable", "ct-nodule-unet", *config)
        with gateway:
            yield Peers(gateway, orthanc)


def nodule_ct(folder: Path, seed: int, nodules: int = 2) -> SynthCT:
    """A synthetic chest CT with nodules of 6-10 mm radius (the model measures those within 10 %)."""
    geometry = VolumeGeometry((SLICES, SIZE, SIZE), (360 / SIZE, 360 / SIZE), 2.5)
    truth = place_nodules(geometry, nodules, np.random.default_rng(seed), radius_range_mm=(6.0, 10.0))
    return write_synthetic_ct(folder, SLICES, rows=SIZE, columns=SIZE, seed=seed, nodules=truth)


@pytest.fixture
def kernel_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The kernel's working folder, empty; afterwards the notebook must have left nothing in it, in the notebooks'
    folder or in the temporary folder."""
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's own warning about its future default
    folder = tmp_path / "kernel"
    folder.mkdir()
    temp = Path(tempfile.gettempdir())
    before, notebooks = set(os.listdir(temp)), set(os.listdir(NOTEBOOKS))
    yield folder
    assert not list(folder.iterdir()), f"the notebook left {sorted(p.name for p in folder.iterdir())}"
    assert set(os.listdir(NOTEBOOKS)) == notebooks, "the notebook wrote into notebooks/"
    left = {entry for entry in set(os.listdir(temp)) - before if entry.startswith(WORK_PREFIX)}
    assert not left, f"the notebook left {sorted(left)} in {temp}"


#: The report's measurement names (with their derivation) as the job's record names its values.
_RECORD_NAMES = {
    "Volume": "volume",
    "Long axis": "long_axis",
    "Short axis": "short_axis",
    "Attenuation Coefficient (mean)": "mean",
    "Attenuation Coefficient (standard deviation)": "stddev",
    "Probability (maximum)": "percent",
}


def recorded_measurements(job: dict[str, Any]) -> set[tuple[str, str, float, str]]:
    """``(finding, measurement, value rounded for reading, unit)`` of every lesion the job's record holds."""
    expected = set()
    (result,) = job["detail"]["inference"]["results"]
    for found in result["lesions"]:
        for lesion in found["lesions"]:
            finding = f"{found['name']} {lesion['number']}"
            for key, value in lesion["values"].items():
                expected.add((finding, key, float(for_reading(key, value)), lesion["units"][key]))
            expected.add((finding, "percent", float(for_reading("percent", 100 * lesion["probability"])), "%"))
    return expected


@pytest.mark.slow
def test_read_results(peers: Peers, tmp_path: Path, kernel_folder: Path) -> None:
    """The job's measurements, from the report in the PACS, in a DataFrame equal to the job's record; the overlay
    drawn on the image where the largest nodule (by the phantom's truth) is largest."""
    ct = nodule_ct(tmp_path / "ct", seed=21)
    for path in sorted((tmp_path / "ct").glob("*.dcm")):
        peers.orthanc.rest("POST", "/instances", path.read_bytes())  # the PACS holds the source, as in a hospital
    peers.gateway.cli("send", str(tmp_path / "ct"), "--to", peers.gateway.address)
    job = peers.wait_for_job(ct.series_instance_uid)

    parameters = {"gateway_url": peers.gateway_url, "dicomweb_url": peers.orthanc.dicomweb_url, "job_id": job["id"]}
    probe = '{"table": table.to_dict(orient="records"), "instance": int(image.InstanceNumber)}'
    notebook, seen = run("read_results.ipynb", kernel_folder, parameters, probe)

    names = {row["measurement"] for row in seen["table"]}
    assert names <= set(_RECORD_NAMES), names - set(_RECORD_NAMES)
    table = {(r["finding"], _RECORD_NAMES[r["measurement"]], r["value"], r["unit"]) for r in seen["table"]}
    assert len(table) == len(seen["table"])
    assert table == recorded_measurements(job)
    assert {r["finding"] for r in seen["table"]} == {"nodule 1", "nodule 2"}

    # The overlay's image is where the largest nodule of the truth is: the slice nearest its centre.
    largest = max(ct.nodules, key=lambda n: n.radius_mm)
    nearest = min(range(SLICES), key=lambda k: abs(ct.geometry.z_mm(k) - largest.center_mm[2]))
    assert abs(seen["instance"] - (nearest + 1)) <= 1, (seen["instance"], nearest + 1)
    assert images_shown(notebook) == 1
    outputs = outputs_text(notebook)
    assert f"job {job['id']}: exported" in outputs
    assert_prose_shown(notebook)


def reference_case(folder: Path, seed: int, nodules: int) -> tuple[SynthCT, np.ndarray]:
    """A case of the evaluation: a synthetic CT in ``folder/series`` and a reference SEG (``folder/reference.dcm``)
    written with highdicom from the phantom's exact truth; the description and the truth mask."""
    ct = nodule_ct(folder / "series", seed, nodules)
    truth = nodule_mask(ct.shape, ct.pixel_spacing, ct.slice_spacing, ct.nodules)
    sources = [pydicom.dcmread(path) for path in sorted((folder / "series").glob("*.dcm"))]  # slice order
    assert [s.SOPInstanceUID for s in sources] == list(ct.sop_instance_uids)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    reference = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=truth,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="phantom truth",
        manufacturer_model_name="gateway.synth.ct",
        software_versions="1",
        device_serial_number="1",
    )
    reference.save_as(folder / "reference.dcm")
    return ct, truth


def seg_mask(seg: pydicom.Dataset, sop_instance_uids: list[str]) -> np.ndarray:
    """A SEG's foreground on the given images ([image, row, column]), decoded here with pydicom alone."""
    index = {uid: k for k, uid in enumerate(sop_instance_uids)}
    mask = np.zeros((len(sop_instance_uids), seg.Rows, seg.Columns), dtype=bool)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        mask[index[source]] |= frame > 0
    return mask


@pytest.mark.slow
def test_evaluate_a_model(peers: Peers, tmp_path: Path, kernel_folder: Path) -> None:
    """Per-case Dice and volumes through the gateway; one case's Dice and volumes recomputed here with numpy from
    the phantom's truth and the gateway's output SEG (decoded with pydicom)."""
    studies = tmp_path / "studies"
    cases = {
        f"case-{k}": reference_case(studies / f"case-{k}", seed, n)
        for k, (seed, n) in enumerate([(31, 2), (32, 1), (33, 2)])
    }
    parameters = {"studies": str(studies), "gateway_url": peers.gateway_url, "token": ADMIN_TOKEN}
    probe = '{"table": table.reset_index().to_dict(orient="records"), "bias": float(bias)}'
    notebook, seen = run("evaluate_a_model.ipynb", kernel_folder, parameters, probe)
    rows = {row["case"]: row for row in seen["table"]}
    assert set(rows) == set(cases)
    assert all(row["has_output"] for row in rows.values())

    ct, truth = cases["case-0"]
    job = peers.wait_for_job(ct.series_instance_uid)
    (output,) = [o for o in job["detail"]["outputs"] if o["kind"] == "SEG"]
    dicomweb = DICOMwebClient(url=f"{peers.gateway_url}/dicomweb")
    seg = dicomweb.retrieve_instance(ct.study_instance_uid, output["SeriesInstanceUID"], output["SOPInstanceUID"])
    predicted = seg_mask(seg, list(ct.sop_instance_uids))
    dice = 2 * np.logical_and(truth, predicted).sum() / (truth.sum() + predicted.sum())
    voxel_ml = ct.pixel_spacing[0] * ct.pixel_spacing[1] * ct.slice_spacing / 1000
    assert rows["case-0"]["dice"] == pytest.approx(dice, abs=1e-12)
    assert rows["case-0"]["reference_ml"] == pytest.approx(truth.sum() * voxel_ml, rel=1e-9)
    assert rows["case-0"]["model_ml"] == pytest.approx(predicted.sum() * voxel_ml, rel=1e-9)
    assert rows["case-0"]["reference_ml"] == pytest.approx(sum(n.volume_ml for n in ct.nodules), rel=0.05)
    assert 0.7 < dice < 1.0  # a real overlap, not a mask compared with itself

    differences = [row["model_ml"] - row["reference_ml"] for row in rows.values()]
    assert seen["bias"] == pytest.approx(np.mean(differences), abs=1e-12)
    outputs = outputs_text(notebook)
    assert f"bias {seen['bias']:+.3f} ml" in outputs
    assert images_shown(notebook) == 1
    assert_prose_shown(notebook)
