"""``gateway run``: the whole pipeline on files with the shipped models, as a data scientist runs it."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_cli import assert_readable_failure, gateway_cli

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
    kinds = {pydicom.dcmread(f, stop_before_pixels=True).Modality: f for f in files}
    assert set(kinds) == {"SEG", "SR"}
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


def test_run_with_an_unknown_model_is_a_readable_error(ct: tuple[Path, set[str]], tmp_path: Path) -> None:
    series, _ = ct
    result = gateway_cli(
        "run", series, "-o", tmp_path / "out", "--model", "no-such-model", "--data-dir", "data", cwd=tmp_path
    )
    assert_readable_failure(result, 1, "no-such-model")
