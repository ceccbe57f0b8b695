"""The Graphic Annotation Sequence written as bytes: pydicom reads back exactly what was meant."""

from __future__ import annotations

import itertools
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway.encode.annotations import MAX_POINTS, annotation, annotation_sequence, polylines


def _read_back(items: list[bytes], tmp_path: Path) -> Dataset:
    """A dataset holding the sequence, written to a file and read again."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    sequence = annotation_sequence(items)
    ds[sequence.tag] = sequence
    ds.set_original_encoding(False, True, "iso8859")
    ds.save_as(tmp_path / "gsps.dcm", enforce_file_format=True)
    return pydicom.dcmread(tmp_path / "gsps.dcm")


def test_an_annotation_reads_back_as_written(tmp_path: Path) -> None:
    square = np.array([(1.5, 2.5), (9.5, 2.5), (9.5, 8.5), (1.5, 8.5), (1.5, 2.5)])
    text = hd.pr.TextObject("nodule 1: 3.05 ml", units="PIXEL", bounding_box=(1.0, 1.0, 60.0, 12.0))
    uid = generate_uid()
    items = [
        annotation("1.2.840.10008.5.1.4.1.1.2", uid, None, "NODULE", polylines(square, "nodule 1", "1.2.3"), [text]),
        annotation("1.2.840.10008.5.1.4.1.1.2.1", uid, 7, "BONE", polylines(square[:2], "bone", "1.2.33")),
    ]
    ds = _read_back(items, tmp_path)
    first, second = ds.GraphicAnnotationSequence
    assert first.ReferencedImageSequence[0].ReferencedSOPInstanceUID == uid
    assert "ReferencedFrameNumber" not in first.ReferencedImageSequence[0]
    assert second.ReferencedImageSequence[0].ReferencedFrameNumber == 7
    assert (first.GraphicLayer, second.GraphicLayer) == ("NODULE", "BONE")
    (graphic,) = first.GraphicObjectSequence
    assert (graphic.GraphicType, graphic.GraphicAnnotationUnits, graphic.GraphicFilled) == ("POLYLINE", "PIXEL", "N")
    assert graphic.GraphicDimensions == 2 and graphic.NumberOfGraphicPoints == 5
    np.testing.assert_array_equal(np.reshape(graphic.GraphicData, (-1, 2)), square)
    assert (graphic.TrackingID, graphic.TrackingUID) == ("nodule 1", "1.2.3")
    assert second.GraphicObjectSequence[0].TrackingUID == "1.2.33", "an odd-length UID, padded"
    assert first.TextObjectSequence[0].UnformattedTextValue == "nodule 1: 3.05 ml"
    assert "TextObjectSequence" not in second


def test_a_long_outline_is_split_into_polylines_that_join(tmp_path: Path) -> None:
    """Graphic Data has a 2-byte length: an outline of more points is drawn by several polylines, end to start."""
    n = 2 * MAX_POINTS + 100
    points = np.stack([np.arange(n, dtype=float), np.arange(n, dtype=float) % 7], axis=1)
    items = [annotation("1.2.840.10008.5.1.4.1.1.2", generate_uid(), None, "BODY", polylines(points, "body", "1.2"))]
    graphics = _read_back(items, tmp_path).GraphicAnnotationSequence[0].GraphicObjectSequence
    parts = [np.reshape(g.GraphicData, (-1, 2)) for g in graphics]
    assert [len(part) for part in parts] == [MAX_POINTS, MAX_POINTS, n - 2 * (MAX_POINTS - 1)]
    assert all(np.array_equal(a[-1], b[0]) for a, b in itertools.pairwise(parts))
    np.testing.assert_array_equal(np.vstack([parts[0], *(part[1:] for part in parts[1:])]), points)


@pytest.mark.parametrize("points", [1, MAX_POINTS])
def test_short_outlines_are_one_polyline(points: int) -> None:
    assert len(polylines(np.zeros((points, 2)), "x", "1.2")) == 1
