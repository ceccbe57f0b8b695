"""A frame that cannot be decoded fails its series with the transfer syntax and the reason, never a volume."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless

from gateway.assemble.assemble import assemble_series
from gateway.synth.ct import write_synthetic_ct


def test_undecodable_frame_refuses_the_series_with_the_transfer_syntax(tmp_path: Path) -> None:
    write_synthetic_ct(tmp_path / "ct", 5, rows=32, columns=32)
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(JPEG2000Lossless)
        ds.save_as(f)
    broken = pydicom.dcmread(files[2])
    (frame,) = generate_frames(broken.PixelData, number_of_frames=1)
    broken.PixelData = encapsulate([frame[: len(frame) // 3]])  # the codestream cut short
    broken.save_as(files[2])

    good = assemble_series(files[:2] + files[3:])
    assert len(good.volumes) == 1, "the other slices are fine"

    result = assemble_series(files)
    assert result.volumes == ()
    (refusal,) = result.refused
    assert "JPEG 2000" in refusal.reason
    assert "SYNTH" not in refusal.reason, "no patient data in the reason"
