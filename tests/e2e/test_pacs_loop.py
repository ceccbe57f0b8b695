"""PACS -> gateway -> PACS with a real PACS (Orthanc): a synthetic chest CT goes in; a SEG, a TID 1500 SR, the
outlines (GSPS) and the key images (KOS) come back.

Orthanc holds the study and sends it to the gateway (C-STORE to the gateway's DICOM port, or STOW-RS through its
DICOMweb plugin); the gateway completes the series, assembles it, runs ``ct-nodule-unet`` and sends the results back
(by C-STORE to the calling AE, or by STOW-RS to Orthanc's DICOMweb root). The test then reads the results from Orthanc
and checks them with highdicom against the phantom's truth and against each other.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from gateway.config import DicomSettings, ExportSettings, JobsSettings, Settings
from gateway.synth.ct import SynthCT, VolumeGeometry, place_nodules, write_synthetic_ct

from conftest import ADMIN, LiveServer, make_settings, require_tool
from peers import Orthanc, dicomweb_plugin, free_port, orthanc_binary

pytestmark = pytest.mark.slow

MODELS = Path(__file__).resolve().parents[2] / "models"
SLICES, SIZE = 48, 160


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthCT]:
    """A synthetic chest CT with one nodule of 8-10 mm radius (large enough for a 10% volume check at 2.25 mm)."""
    folder = tmp_path_factory.mktemp("study")
    geometry = VolumeGeometry((SLICES, SIZE, SIZE), (360 / SIZE, 360 / SIZE), 2.5)
    nodules = place_nodules(geometry, 1, np.random.default_rng(21), radius_range_mm=(8.0, 10.0))
    return folder, write_synthetic_ct(folder, SLICES, rows=SIZE, columns=SIZE, seed=21, nodules=nodules)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    if orthanc_binary() is None:
        require_tool("Orthanc")
    if dicomweb_plugin() is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (make test installs orthanc-dicomweb)")
    with Orthanc(tmp_path / "orthanc") as server:
        yield server


def gateway_settings(tmp_path: Path, orthanc: Orthanc, dicom_port: int) -> Settings:
    export = ExportSettings(
        destinations={
            "pacs-dimse": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
            "pacs-web": {"stow_url": f"{orthanc.dicomweb_url}/studies"},
        },
        return_to_sender={orthanc.aet: "pacs-dimse"},  # C-STORE from Orthanc: results go back by C-STORE
        default=[],
        backoff_initial_s=0.1,
        backoff_max_s=0.5,
        poll_s=0.05,
    )
    return make_settings(
        tmp_path / "data",
        dicom=DicomSettings(host="127.0.0.1", port=dicom_port),
        jobs=JobsSettings(workers=1, poll_s=0.05),
        export=export,
    )


def upload(orthanc: Orthanc, folder: Path) -> str:
    """Store the study's files in Orthanc; its Orthanc study id."""
    for path in sorted(folder.glob("*.dcm")):
        orthanc.rest("POST", "/instances", path.read_bytes())
    (study_id,) = orthanc.rest("GET", "/studies")
    return str(study_id)


#: What Orthanc must hold of the results, by Modality: SEG, SR, the presentation state (PR) and the key objects (KO).
RESULTS = ("SEG", "SR", "PR", "KO")


def wait_for_results(orthanc: Orthanc, timeout_s: float = 240) -> dict[str, pydicom.Dataset]:
    """Wait until Orthanc holds a series of each of :data:`RESULTS`; return their (only) instances by Modality."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        series = {s["MainDicomTags"].get("Modality"): s for s in orthanc.rest("GET", "/series?expand")}
        if set(RESULTS) <= set(series):
            return {m: _only_instance(orthanc, series[m]) for m in RESULTS}
        time.sleep(0.5)
    raise AssertionError(f"Orthanc holds no {', '.join(RESULTS)} after {timeout_s} s")


def _only_instance(orthanc: Orthanc, series: dict[str, Any]) -> pydicom.Dataset:
    (instance,) = series["Instances"]
    return pydicom.dcmread(BytesIO(orthanc.rest("GET", f"/instances/{instance}/file")))


def check_results(results: dict[str, pydicom.Dataset], synth: SynthCT) -> None:
    """The SEG references the source instances; the SR reports the nodule as a lesion, at the phantom's nodule and
    within 10 % of its volume; the GSPS outlines the SEG's nodule on the source images; the KOS flags the image
    where the nodule is largest, with the GSPS and the SR."""
    seg = hd.seg.Segmentation.from_dataset(results["SEG"])
    sr = hd.sr.Comprehensive3DSR.from_dataset(results["SR"])
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == synth.study_instance_uid
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced and referenced <= set(synth.sop_instance_uids)
    sources = {
        src.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for src in derivation.SourceImageSequence
    }
    assert sources and sources <= set(synth.sop_instance_uids)
    assert [s.SegmentLabel.lower() for s in seg.SegmentSequence] == ["nodule"]
    key = check_report(sr, synth)
    check_outlines(results["PR"], seg, key)
    check_key_objects(results["KO"], key, results["PR"], results["SR"])


def check_report(sr: hd.sr.Comprehensive3DSR, synth: SynthCT) -> str:
    """One lesion group: at the nodule's centre, its volume and long axis as the truth's; its key image's UID."""
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.tracking_identifier == "nodule 1"
    values = {m.name.meaning: m for m in group.get_measurements()}
    (truth,) = synth.nodules
    assert values["Volume"].unit.value == "ml"
    assert values["Volume"].value == pytest.approx(truth.volume_ml, rel=0.10), (values["Volume"].value, truth)
    assert values["Long axis"].value == pytest.approx(2 * truth.radius_mm, abs=2 * 360 / SIZE)  # two pixels
    surface = group.roi
    assert isinstance(surface, hd.sr.VolumeSurface)
    centre = np.asarray(surface[0].GraphicData, dtype=float)
    assert np.linalg.norm(centre - np.asarray(truth.center_mm)) < 2.0
    (image,) = hd.sr.utils.find_content_items(group[0], value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    key = str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    assert key in synth.sop_instance_uids
    return key


def check_outlines(gsps: pydicom.Dataset, seg: hd.seg.Segmentation, key: str) -> None:
    """The GSPS outlines, on the key image, the nodule as the SEG holds it there (within a pixel)."""
    from scipy.spatial import cKDTree

    on_key = [a for a in gsps.GraphicAnnotationSequence if a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == key]
    (annotation,) = on_key
    assert annotation.GraphicLayer == "NODULE" and "nodule 1:" in annotation.TextObjectSequence[0].UnformattedTextValue
    mask = seg.get_pixels_by_source_instance([key], segment_numbers=[1])[0, ..., 0].astype(bool)
    inside = cKDTree(np.argwhere(mask)[:, ::-1] + 0.5)
    outside = cKDTree(np.argwhere(~mask)[:, ::-1] + 0.5)
    outlines = [o for o in annotation.GraphicObjectSequence if o.NumberOfGraphicPoints > 2]
    assert outlines, "the nodule's outline"
    for outline in outlines:
        points = np.asarray(outline.GraphicData, dtype=float).reshape(-1, 2)
        assert max(inside.query(points)[0].max(), outside.query(points)[0].max()) <= 1.0


def check_key_objects(ko: pydicom.Dataset, key: str, gsps: pydicom.Dataset, sr: pydicom.Dataset) -> None:
    images = [i for i in ko.ContentSequence if i.ValueType == "IMAGE"]
    assert [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in images] == [key]
    assert images[0].ReferencedSOPSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == gsps.SOPInstanceUID
    composites = {
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in ko.ContentSequence
        if i.ValueType == "COMPOSITE"
    }
    assert composites == {str(gsps.SOPInstanceUID), str(sr.SOPInstanceUID)}


def register_nodule_model(settings: Settings) -> None:
    from gateway.registry.registry import Registry, RegistryIndex

    index = RegistryIndex(settings.store)
    try:
        registry = Registry(index)
        registry.register(MODELS / "ct-nodule-unet")
        registry.enable("ct-nodule-unet")  # on purpose, as an operator does (`gateway models enable`)
    finally:
        index.close()


def test_cstore_in_cstore_back(study: tuple[Path, SynthCT], orthanc: Orthanc, tmp_path: Path) -> None:
    folder, synth = study
    dicom_port = free_port()
    settings = gateway_settings(tmp_path, orthanc, dicom_port)
    register_nodule_model(settings)
    with LiveServer(settings, start_dimse=True):
        orthanc.rest("PUT", "/modalities/gateway", {"AET": "GATEWAY", "Host": "127.0.0.1", "Port": dicom_port})
        study_id = upload(orthanc, folder)
        orthanc.rest("POST", "/modalities/gateway/store", {"Resources": [study_id], "Synchronous": True})
        check_results(wait_for_results(orthanc), synth)


def test_stow_in_stow_back(study: tuple[Path, SynthCT], orthanc: Orthanc, tmp_path: Path) -> None:
    folder, synth = study
    settings = gateway_settings(tmp_path, orthanc, free_port())
    settings.export.default.append("pacs-web")  # STOW-received series have no calling AE: the fixed route
    register_nodule_model(settings)
    with LiveServer(settings, start_dimse=True) as server:
        gateway = {"Url": f"{server.url}/dicomweb", "HttpHeaders": ADMIN}  # STOW-RS needs a token, also on loopback
        orthanc.rest("PUT", "/dicom-web/servers/gateway", gateway)
        study_id = upload(orthanc, folder)
        orthanc.rest("POST", "/dicom-web/servers/gateway/stow", {"Resources": [study_id], "Synchronous": True})
        check_results(wait_for_results(orthanc), synth)
