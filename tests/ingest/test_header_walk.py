"""The struct-based header walk (gateway.ingest.header) and the quick reading of the indexed values, against
pydicom's generic walk and value conversion, file for file.

Every DICOM file at hand (pydicom's test files, ../shared/data, a synthetic CT) and crafted damage to a real
header (lying lengths, truncations, random bytes) must get the same answer from both: the same ReceivedInstance,
or the same refusal (exception class and DICOM status).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pydicom.data
import pydicom.dataset
import pytest

from gateway.errors import GatewayError
from gateway.ingest import instance
from gateway.ingest.header import walk_header
from gateway.synth.ct import write_synthetic_ct

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"

Outcome = tuple[str, object]


def _outcome(read: Callable[[], instance.ReceivedInstance]) -> Outcome:
    try:
        return ("ok", read())
    except GatewayError as exc:
        return (type(exc).__name__, getattr(exc, "status", None))


def _both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Outcome, Outcome]:
    """(fast path, pydicom's walk and conversion alone) for ``path``."""
    fast = _outcome(lambda: instance.read_received(path))
    with monkeypatch.context() as m:
        m.setattr(instance, "walk_header", lambda *args: None)
        m.setattr(instance, "_quick", lambda *args: instance._SLOW)
        generic = _outcome(lambda: instance.read_received(path))
    return fast, generic


def _dicom_files() -> Iterator[Path]:
    for path in sorted(PYDICOM_FILES.rglob("*")):
        if path.is_file() and path.stat().st_size > 132 and path.read_bytes()[128:132] == b"DICM":
            yield path
    if SHARED.is_dir():
        yield from (p for p in sorted(SHARED.rglob("*.dcm"))[:400] if p.stat().st_size < 64 << 20)


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    write_synthetic_ct(folder, 40, rows=64, columns=64, seed=0)
    return sorted(folder.glob("*.dcm"))[0]


def test_same_answer_on_every_file_at_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    files = list(_dicom_files())
    assert len(files) > 50
    fast_hits = 0
    for path in files:
        fast, generic = _both(path, monkeypatch)
        assert fast == generic, path
        fast_hits += fast[0] == "ok" and _walked_fast(path)
    assert fast_hits > len(files) // 4  # the fast path is taken for the common files, not only the fallback


def _walked_fast(path: Path) -> bool:
    return walk_header(path, instance._WANTED, 256, instance.ACCEPTED_TRANSFER_SYNTAXES) is not None


def test_synthetic_ct_takes_the_fast_path(ct_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = walk_header(ct_file, instance._WANTED, 256, instance.ACCEPTED_TRANSFER_SYNTAXES)
    assert header is not None
    fast, generic = _both(ct_file, monkeypatch)
    assert fast[0] == "ok"
    assert fast == generic


def _element_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset of the length field, its width) of each top-level Explicit VR LE element after the file meta."""
    (group_length,) = struct.unpack_from("<L", data, 140)
    pos, found = 144 + group_length, []
    while pos + 8 <= len(data):
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV", b"SV", b"UV"):
            found.append((pos + 8, 4))
            (length,) = struct.unpack_from("<L", data, pos + 8)
            pos += 12 + length
        else:
            found.append((pos + 6, 2))
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return found


def test_lying_lengths_are_refused_alike(ct_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ct_file.read_bytes()
    target = tmp_path / "lying.dcm"
    refused = 0
    for offset, width in _element_offsets(data):
        for value in (len(data), (1 << (8 * width)) - 2, 0xFFFFFFFF if width == 4 else 0xFFFF):
            crafted = bytearray(data)
            crafted[offset : offset + width] = value.to_bytes(width, "little")
            target.write_bytes(crafted)
            fast, generic = _both(target, monkeypatch)
            assert fast == generic, (offset, value)
            refused += fast[0] != "ok"
    assert refused > 0


def test_truncations_are_refused_alike(ct_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ct_file.read_bytes()
    target = tmp_path / "cut.dcm"
    cuts = [*range(120, 1200, 7), len(data) - 1, len(data) - 100]
    refused = 0
    for cut in cuts:
        target.write_bytes(data[:cut])
        fast, generic = _both(target, monkeypatch)
        assert fast == generic, cut
        refused += fast[0] != "ok"  # a cut at an element's end leaves a shorter, valid data set
    assert refused > 0.8 * len(cuts)


def test_random_damage_to_the_header_is_judged_alike(
    ct_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ct_file.read_bytes()
    rng = random.Random(12)
    target = tmp_path / "damaged.dcm"
    for _ in range(400):
        crafted = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            crafted[rng.randrange(128, 1400)] = rng.randrange(256)
        target.write_bytes(crafted)
        fast, generic = _both(target, monkeypatch)
        assert fast == generic


def _written(tmp_path: Path, implicit: bool, **values: object) -> Path:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3", "1.2.3.5"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    path = tmp_path / f"values-{'implicit' if implicit else 'explicit'}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(
    "values",
    [
        {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jörg", "StudyDescription": "Thorax  "},
        {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Wang^XiaoDong=王^小東", "PatientID": " 007 "},
        {"SeriesNumber": "  7 ", "InstanceNumber": "+3", "NumberOfFrames": "0012", "Rows": 512, "Columns": 1},
        {"SeriesNumber": "99999999999", "InstanceNumber": "-0", "Modality": "CT", "BodyPartExamined": ""},
        {"StudyDescription": ["A", "B"], "PatientName": "A^B\\C^D", "AccessionNumber": "\0"},
        {"Rows": [1, 2], "StudyDate": "20240101", "StudyTime": "101010.123 "},
    ],
)
def test_indexed_values_are_read_alike(
    values: dict[str, object], implicit: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _written(tmp_path, implicit, **values)
    fast, generic = _both(path, monkeypatch)
    assert fast[0] == "ok"
    assert fast == generic


@pytest.mark.parametrize("crafted", [b"12A", b"1.5", b"1\\2", b"\xff12", b"1\x1b2", b"   "])
def test_malformed_integer_strings_are_read_alike(
    crafted: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _written(tmp_path, False, SeriesNumber="123")
    data = path.read_bytes()
    path.write_bytes(data.replace(b"IS\x04\x00123 ", b"IS\x04\x00" + crafted.ljust(4, b" ")[:4]))
    assert path.read_bytes() != data
    fast, generic = _both(path, monkeypatch)
    assert fast == generic
