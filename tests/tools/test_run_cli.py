"""``gateway run``: the whole pipeline on files with the shipped models, as a data scientist runs it (named with
``--model`` though disabled, or all of them when no model is enabled)."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_cli import assert_readable_failure, clean_env, gateway_cli

from gateway.synth.ct import write_synthetic_ct


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    folder = tmp_path_factory.mktemp("ct")
    synth = write_synthetic_ct(folder / "series", 24, rows=96, columns=96, seed=5)
    return folder / "series", set(synth.sop_instance_uids)


@pytest.mark.slow
def test_run_writes_masks_measurements_and_dicom_outputs(ct: tuple[Path, set[str]], tmp_path: Path) -> None:
    series, uids = ct
    result = gateway_cli(
        "run", series, "-o", tmp_path / "out", "--model", "ct-tissue", "--data-dir", "data", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ct-tissue@1.0.0" in result.stdout and "run" in result.stdout
    assert "body" in result.stdout and "ml" in result.stdout
    out = tmp_path / "out"
    (summary_path,) = out.glob("*_ct-tissue.json")
    summary = json.loads(summary_path.read_text())
    volumes = {m["name"]: m["values"]["volume"] for m in summary["measurements"]}
    assert set(volumes) == {"body", "air", "fat", "soft tissue", "bone"}
    assert volumes["body"] > volumes["air"] > 0
    (body_path,) = out.glob("*_ct-tissue_body.nii.gz")
    body = np.asarray(nib.load(body_path).dataobj)
    assert body.shape == (96, 96, 24) and 0.2 < body.mean() < 0.8
    (run,) = json.loads((out / "run.json").read_text())["series"]
    assert [d["model"] for d in run["routing"]] == ["ct-tissue@1.0.0"]
    files = sorted((out / "dicom").rglob("*.dcm"))
    modalities = [pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files]
    kinds = dict(zip(modalities, files, strict=True))
    assert set(kinds) == {"SEG", "SR", "PR", "KO", "OT"}  # OT: burned-in key images, one per finding
    assert modalities.count("OT") == 5 and modalities.count("SEG") == 1
    seg = hd.seg.segread(kinds["SEG"])
    assert {d.SegmentLabel for d in seg.SegmentSequence} == {"body", "air", "fat", "soft tissue", "bone"}
    referenced = {
        r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence
    }
    assert referenced <= uids and referenced


@pytest.mark.slow
def test_run_says_why_no_model_ran(ct: tuple[Path, set[str]], tmp_path: Path) -> None:
    series, _ = ct
    result = gateway_cli(
        "run", series, "-o", tmp_path / "out", "--model", "adc-dwi", "--data-dir", "data", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "adc-dwi@1.0.0" in result.stdout and "not run" in result.stdout and "MR" in result.stdout


def head_ct(folder: Path) -> Path:
    """The synthetic phantom labelled as a head CT (BodyPartExamined HEAD, a head protocol's description)."""
    write_synthetic_ct(folder, 24, rows=96, columns=96, seed=6, n_nodules=0)
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined, ds.SeriesDescription = "HEAD", "CT HEAD WO CONTRAST 5mm"
        ds.save_as(path)
    return folder


def decisions(stdout: str) -> dict[str, str]:
    """``model@version -> run | not run: ...`` from ``gateway run``'s routing lines."""
    found = {}
    for line in stdout.splitlines():
        words = line.split(maxsplit=2)
        if len(words) == 3 and "@" in words[1] and words[2].startswith(("run", "not run")):
            found[words[1]] = words[2]
    return found


@pytest.mark.slow
def test_run_with_no_model_enabled_runs_the_shipped_examples_and_says_so(tmp_path: Path) -> None:
    series = head_ct(tmp_path / "head")
    result = gateway_cli("run", series, "-o", tmp_path / "out", "--data-dir", "data", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.startswith(
        f"data folder: {(tmp_path / 'data').resolve()}\n"
        "no model enabled: running the shipped examples (demonstrations trained or built on phantoms): "
        "adc-dwi@1.0.0, ct-nodule-unet@1.1.0, ct-tissue@1.0.0\n"
    ), result.stderr
    routed = decisions(result.stdout)
    assert routed["ct-tissue@1.0.0"] == "run"
    assert routed["ct-nodule-unet@1.1.0"].startswith(
        "not run: body_part_examined: BodyPartExamined HEAD is not one of CHEST, THORAX, LUNG"
    ), "the nodule model is for chest CT only"
    assert routed["adc-dwi@1.0.0"].startswith("not run: modality: Modality CT is not one of MR")
    listed = gateway_cli("models", "list", "--data-dir", "data", cwd=tmp_path)
    enabled = {line.split()[0]: line.split()[3] for line in listed.stdout.splitlines()[1:]}
    assert enabled == {"adc-dwi": "no", "ct-nodule-unet": "no", "ct-tissue": "no"}, "run enables nothing"


def test_run_with_nothing_to_run_is_a_readable_error(ct: tuple[Path, set[str]], tmp_path: Path) -> None:
    series, _ = ct
    env = clean_env(GATEWAY_MODELS__REGISTER_SHIPPED="false")
    result = gateway_cli("run", series, "-o", tmp_path / "out", "--data-dir", "data", cwd=tmp_path, env=env)
    assert_readable_failure(result, 1, "no model to run", "gateway models enable NAME")


def test_run_with_an_unknown_model_is_a_readable_error(ct: tuple[Path, set[str]], tmp_path: Path) -> None:
    series, _ = ct
    result = gateway_cli(
        "run", series, "-o", tmp_path / "out", "--model", "no-such-model", "--data-dir", "data", cwd=tmp_path
    )
    assert_readable_failure(result, 1, "no-such-model")
