"""``gateway volume``: the real console script on synthetic and real series."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from gateway.synth.ct import write_synthetic_ct

GATEWAY = Path(sys.executable).with_name("gateway")


def run_volume(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GATEWAY), "volume", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_volume_writes_nifti_and_sidecar(tmp_path: Path) -> None:
    ct = write_synthetic_ct(tmp_path / "ct", 12, rows=64, columns=64)
    result = run_volume(tmp_path / "ct", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "1 volume(s) written, 0 refused" in result.stdout
    (image_path,) = (tmp_path / "out").glob("*.nii")
    image = nib.load(image_path)
    assert image.shape == (64, 64, 12)
    sidecar = json.loads(image_path.with_suffix(".json").read_text())
    assert sidecar["SeriesInstanceUID"] == ct.series_instance_uid
    assert {s["SOPInstanceUID"] for s in sidecar["slices"]} == set(ct.sop_instance_uids)
    hu = np.asarray(image.dataobj)
    assert hu.min() >= -1024 and hu.max() > 300, "values are HU (rescale applied)"


def test_volume_refuses_mixed_frame_sizes_with_a_reason(tmp_path: Path) -> None:
    write_synthetic_ct(tmp_path / "ct", 6, rows=64, columns=64)
    odd = sorted((tmp_path / "ct").glob("*.dcm"))[2]
    ds = pydicom.dcmread(odd)
    small = ds.pixel_array[:32, :32].copy()
    ds.Rows = ds.Columns = 32
    ds.PixelData = small.tobytes()
    ds.save_as(odd)
    result = run_volume(tmp_path / "ct", "-o", tmp_path / "out")
    assert result.returncode == 1
    assert "refused" in result.stderr and "frame size" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("*.nii")), "never a volume from an inconsistent series"


def test_volume_on_a_missing_path(tmp_path: Path) -> None:
    result = run_volume(tmp_path / "nope", "-o", tmp_path / "out")
    assert result.returncode == 2 and "no such file or folder" in result.stderr
