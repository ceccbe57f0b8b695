"""De-identified research copies (PS3.15 Annex E): the profile and its options, consistent pseudonyms across a study
and its results (and across runs), the residual-PHI check (a planted identifier in a private tag or a nested
sequence is caught), the settings that refuse what cannot be honoured, and the export queue sending research copies
to a real C-STORE SCP (MinimalSCP) with the check's result in each delivery's history."""

from __future__ import annotations

import importlib
import shutil
import stat
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from dicomanonymizer.dicomfields_selector import ANONYMIZATION_CATEGORIES  # type: ignore[import-untyped]
from pacs import deliveries, drain, fast_export, make_job, result_files
from pydantic import ValidationError
from pydicom.dataset import Dataset

from gateway.config import DeidentifySettings, ExportSettings
from gateway.export import queue
from gateway.export.deidentify import (
    HONOURED,
    KEY_FILE,
    TABLE_VERSION,
    Deidentifier,
    DeidentifyError,
    Identity,
    ResidualPHI,
    pseudonym_seed,
    residual_phi,
)
from gateway.export.destinations import Routing, destinations_for
from gateway.store.store import InstanceStore

from peers import MinimalSCP

SEED = "0123456789abcdef" * 4
MODIFIED = DeidentifySettings(options=["retain_longitudinal_modified_dates"])


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic CT (``ct0``, ``ct1``) and one result of each kind about it (seg, sr, gsps, ko, sc)."""
    folder = tmp_path_factory.mktemp("study")
    files = result_files(folder)
    for k, path in enumerate(sorted((folder / "ct").glob("*.dcm"))):
        files[f"ct{k}"] = path
    return files


def deidentified(files: dict[str, Path], folder: Path, settings: DeidentifySettings, seed: str = SEED) -> dict:
    """Each file de-identified into ``folder``, read back."""
    folder.mkdir(parents=True, exist_ok=True)
    deidentifier = Deidentifier(settings, seed)
    return {k: pydicom.dcmread(deidentifier.copy(p, folder / f"{k}.dcm").path) for k, p in files.items()}


def test_copies_record_the_profile_and_pseudonyms_are_consistent(study: dict[str, Path], tmp_path: Path) -> None:
    copies = deidentified(study, tmp_path, MODIFIED)
    original = pydicom.dcmread(study["ct0"])
    for ds in copies.values():
        assert ds.PatientIdentityRemoved == "YES"
        assert [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence] == [
            ("113100", "DCM"),
            ("113107", "DCM"),
        ]
        assert ds.PatientID == copies["ct0"].PatientID != original.PatientID
        assert ds.PatientName == copies["ct0"].PatientName != original.PatientName
        assert ds.StudyInstanceUID == copies["ct0"].StudyInstanceUID != original.StudyInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert not [elem for elem in ds.iterall() if elem.tag.is_private]
    # the SEG refers to the de-identified source instances, as the research copy of the CT holds them
    seg = hd.seg.Segmentation.from_dataset(copies["seg"])
    sources = {copies["ct0"].SOPInstanceUID, copies["ct1"].SOPInstanceUID}
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == copies["ct0"].SeriesInstanceUID
    assert {ref.ReferencedSOPInstanceUID for ref in series.ReferencedInstanceSequence} == sources
    derived = {
        src.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for src in derivation.SourceImageSequence
    }
    assert derived <= sources
    assert seg.FrameOfReferenceUID == copies["ct0"].FrameOfReferenceUID
    # the KO and the GSPS refer to the copies too
    ko_refs = {
        str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for r in copies["ko"].ContentSequence
        if "ReferencedSOPSequence" in r
    }
    assert ko_refs and ko_refs <= sources
    gsps_refs = {
        r.ReferencedSOPInstanceUID for s in copies["gsps"].ReferencedSeriesSequence for r in s.ReferencedImageSequence
    }
    assert gsps_refs and gsps_refs <= sources


def test_the_same_seed_gives_the_same_pseudonyms_another_does_not(study: dict[str, Path], tmp_path: Path) -> None:
    first = deidentified({"ct0": study["ct0"]}, tmp_path / "a", MODIFIED)["ct0"]
    again = deidentified({"ct0": study["ct0"]}, tmp_path / "b", MODIFIED)["ct0"]
    other = deidentified({"ct0": study["ct0"]}, tmp_path / "c", MODIFIED, seed="f" * 64)["ct0"]
    assert (first.PatientID, first.SOPInstanceUID, first.StudyDate) == (
        again.PatientID,
        again.SOPInstanceUID,
        again.StudyDate,
    )
    assert first.PatientID != other.PatientID and first.SOPInstanceUID != other.SOPInstanceUID


def test_date_options(study: dict[str, Path], tmp_path: Path) -> None:
    original = pydicom.dcmread(study["ct0"])
    assert original.StudyDate and original.PatientBirthDate
    plain = deidentified({"ct0": study["ct0"]}, tmp_path / "plain", DeidentifySettings())["ct0"]
    shifted = deidentified({"ct0": study["ct0"]}, tmp_path / "shifted", MODIFIED)["ct0"]
    full = DeidentifySettings(options=["retain_longitudinal_full_dates", "retain_uids"])
    kept = deidentified({"ct0": study["ct0"]}, tmp_path / "kept", full)["ct0"]
    assert plain.StudyDate == ""  # Z in the Basic Profile
    assert shifted.StudyDate not in ("", original.StudyDate) and len(shifted.StudyDate) == 8
    assert kept.StudyDate == original.StudyDate
    assert kept.SOPInstanceUID == original.SOPInstanceUID  # Retain UIDs
    assert plain.PatientBirthDate == shifted.PatientBirthDate == kept.PatientBirthDate == ""
    assert plain.ContentDate == "19000101"  # Z/D: a dummy (Type 1 in some IODs)
    assert [c.CodeValue for c in kept.DeidentificationMethodCodeSequence] == ["113100", "113106", "113110"]


def test_descriptors_and_private_tags_are_removed(study: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(study["ct0"])
    ds.StudyDescription = "CT chest for Mr Example"
    ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x10, "LO", "kept by the scanner")
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    (copy,) = deidentified({"x": src}, tmp_path / "out", MODIFIED).values()
    assert "StudyDescription" not in copy
    assert not any(elem.tag.is_private for elem in copy.iterall())


def planted() -> tuple[Dataset, Identity]:
    ds = Dataset()
    ds.PatientName = "PSEUDO^ANNA"
    ds.PatientID = "X7Q2"
    ds.Manufacturer = "ANNA Systems"  # a name component outside a name or free text: no evidence
    identity = Identity("DOE^JANE^Q", "123456", "19700101", "ACC99")
    return ds, identity


def test_the_check_passes_a_clean_data_set() -> None:
    ds, identity = planted()
    ds.Manufacturer = "DOE Systems"
    assert residual_phi(ds, identity) is None


def test_the_check_catches_an_identifier_in_a_private_tag() -> None:
    ds, identity = planted()
    ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x10, "LO", "old id 123456")
    assert residual_phi(ds, identity) == "PatientID at (0009,1010)"


def test_the_check_catches_a_name_in_a_nested_sequence() -> None:
    ds, identity = planted()
    item, inner = Dataset(), Dataset()
    inner.TextValue = "reviewed with Jane Doe at the bedside"
    item.ContentSequence = [inner]
    ds.ContentSequence = [Dataset(), item]
    assert residual_phi(ds, identity) == "PatientName at (0040,A730)[1] > (0040,A730)[0] > (0040,A160)"
    inner.TextValue = "a jane-like doe"  # single components in free text: no evidence
    assert residual_phi(ds, identity) is None
    observer = Dataset()
    observer.PersonName = "DOE^J"  # a component in a name is
    item.ContentSequence.append(observer)
    assert residual_phi(ds, identity) == "PatientName component at (0040,A730)[1] > (0040,A730)[1] > (0040,A123)"


def test_the_check_catches_a_birth_date_and_an_accession_number() -> None:
    ds, identity = planted()
    ds.ContentDate = "19700101"
    assert residual_phi(ds, identity) == "PatientBirthDate at (0008,0023)"
    del ds.ContentDate
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.SourceApplicationEntityTitle = "ACC99"
    assert residual_phi(ds, identity) == "AccessionNumber at (0002,0016)"


def test_a_copy_with_residual_phi_is_refused_and_names_the_tag_only(study: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(study["sr"])
    family, given = str(ds.PatientName).split("^")[:2]
    name = f"{given} {family}"
    ds.ContentSequence[0].TextValue = f"note: {name} said so"  # free text the profile keeps (and cannot clean)
    src = tmp_path / "sr.dcm"
    ds.save_as(src, enforce_file_format=True)
    dest = tmp_path / "copy.dcm"
    with pytest.raises(ResidualPHI) as caught:
        Deidentifier(MODIFIED, SEED).copy(src, dest)
    assert caught.value.phi_check == "failed: PatientName at (0040,A730)[0] > (0040,A160)"
    assert name not in caught.value.reason and not dest.exists()


def test_an_image_with_burned_in_annotation_is_not_deidentified(study: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(study["sc"])
    ds.BurnedInAnnotation = "YES"
    src = tmp_path / "sc.dcm"
    ds.save_as(src, enforce_file_format=True)
    with pytest.raises(DeidentifyError, match=r"^burned-in annotation"):
        Deidentifier(MODIFIED, SEED).copy(src, tmp_path / "copy.dcm")


#: The options refused, and how the refusal says why (a regular expression).
REFUSED = {
    "retain_patient_characteristics": "its column of Table E.1-1 is in no library",
    "retain_device_identity": "its column of Table E.1-1 is in no library",
    "retain_institution_identity": "its column of Table E.1-1 is in no library",
    "retain_safe_private": r"no library .* keeps a list of safe private attributes \(PS3.15 Table E.3.10-1\)",
    "clean_descriptors": "needs cleaning of free text or graphics",
    "clean_structured_content": "needs cleaning of free text or graphics",
    "clean_graphics": "needs cleaning of free text or graphics",
}


@pytest.mark.parametrize("option", REFUSED)
def test_settings_refuse_each_option_that_cannot_be_honoured_saying_why(option: str) -> None:
    reason = REFUSED[option]
    with pytest.raises(ValidationError, match=rf"\['{option}'\].*cannot be honoured.*{option}: {reason}") as caught:
        DeidentifySettings(options=["retain_uids", option])
    assert "\n" not in str(caught.value.errors()[0]["msg"])  # one line
    with pytest.raises(ValueError, match=option):
        Deidentifier(DeidentifySettings.model_construct(options=[option]), SEED)


def test_the_table_carries_the_basic_profile_column_only() -> None:
    """The retain options of patient characteristics, device and institution identity are refused because
    dicom-anonymizer's table has no option columns: once a release carries one, this fails, and that option can be
    honoured from it (never from a tag list of our own)."""
    module = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.{TABLE_VERSION}")
    assert {name for name in vars(module) if not name.startswith("_")} == set(ANONYMIZATION_CATEGORIES)


def test_settings_take_the_honoured_options_and_refuse_the_rest() -> None:
    with pytest.raises(ValidationError, match="exclude each other"):
        DeidentifySettings(options=["retain_longitudinal_modified_dates", "retain_longitudinal_full_dates"])
    with pytest.raises(ValidationError):
        DeidentifySettings(options=["retain_everything"])
    for option in HONOURED:
        assert DeidentifySettings(options=[option]).options == [option]
    settings = ExportSettings(
        destinations={"research": {"ae_title": "R", "host": "h", "port": 104, "deidentify": {"options": []}}},
        default=["research"],
    )
    assert destinations_for(settings, "stow").with_inputs == {"research"}
    with pytest.raises(ValueError, match="with_inputs"):
        Routing({"pacs": frozenset()}, with_inputs=frozenset({"research"}))


def test_the_pseudonym_secret_is_made_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    seed = pseudonym_seed(tmp_path, "research")
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert pseudonym_seed(tmp_path, "research") == seed != pseudonym_seed(tmp_path, "other")
    (tmp_path / KEY_FILE).chmod(0o644)
    assert pseudonym_seed(tmp_path, "research") == seed
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


def test_research_copies_go_out_and_a_copy_with_phi_does_not(
    study: dict[str, Path], instance_store: InstanceStore, tmp_path: Path
) -> None:
    leaky = pydicom.dcmread(study["sr"])
    leaky.ContentSequence[0].TextValue = f"{leaky.PatientID} follow-up"
    leaky.SOPInstanceUID = leaky.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    leaky_path = tmp_path / "leaky.dcm"
    leaky.save_as(leaky_path, enforce_file_format=True)
    files = [study["seg"], study["sr"], study["ko"], leaky_path]
    with MinimalSCP(tmp_path / "scp") as scp:
        research = {"ae_title": scp.aet, "host": "127.0.0.1", "port": scp.dicom_port, "deidentify": {}}
        settings = fast_export(destinations={"research": research}, default=["research"])
        job_id = make_job(instance_store)
        queue.enqueue(instance_store, job_id, files, destinations_for(settings, "dimse:CT"), now=0.0)
        drain(instance_store, settings, job_id)
        received = [pydicom.dcmread(p) for p in sorted(scp.outdir.iterdir())]
    rows = {row.sop_instance_uid: row for row in deliveries(instance_store, job_id)}
    leaked = rows[str(leaky.SOPInstanceUID)]
    assert leaked.state == queue.DEAD
    assert leaked.last_error == "residual PHI check failed: PatientID at (0040,A730)[0] > (0040,A160)"
    assert leaked.history[-1]["phi_check"].startswith("failed: PatientID at (0040,A730)")
    sent = [row for row in rows.values() if row is not leaked]
    assert {row.state for row in sent} == {queue.DELIVERED}
    assert {row.history[-1]["phi_check"] for row in sent} == {"passed"}
    assert len(received) == 3
    originals = {pydicom.dcmread(p).SOPInstanceUID for p in files}
    assert all(ds.PatientIdentityRemoved == "YES" and ds.SOPInstanceUID not in originals for ds in received)
    assert list(instance_store.tmp_dir.glob("deid-*")) == []  # the copies are removed after the send


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's error lines for ``path``, without the values they quote."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    return {line.split(" - ", 1)[-1] for line in (result.stdout + result.stderr).splitlines() if "Error" in line}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy is not installed")
@pytest.mark.parametrize("options", [[], ["retain_longitudinal_modified_dates"]])
def test_dciodvfy_finds_no_new_error_in_deidentified_seg_and_sr(
    study: dict[str, Path], tmp_path: Path, options: list[str]
) -> None:
    deidentifier = Deidentifier(DeidentifySettings(options=options), SEED)
    for kind in ("seg", "sr"):
        deidentifier.copy(study[kind], tmp_path / f"{kind}.dcm")
        assert dciodvfy_errors(tmp_path / f"{kind}.dcm") <= dciodvfy_errors(study[kind])


def test_real_mr_series_is_deidentified_and_passes_the_check(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "dcm_qa_decubitus" / "In" / "HFS"
    series = sorted(p for d in folder.glob("*t1_fl2d_sag") for p in d.iterdir() if p.is_file())[:5]
    if not series:
        pytest.skip(f"no T1 series under {folder}")
    copies = deidentified({str(k): p for k, p in enumerate(series)}, tmp_path, MODIFIED)
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in series]
    assert len({ds.SeriesInstanceUID for ds in copies.values()}) == 1
    for original, copy in zip(originals, copies.values(), strict=True):
        assert residual_phi(copy, Identity.of(original)) is None
        assert copy.SeriesInstanceUID != original.SeriesInstanceUID
        assert not any(elem.tag.is_private for elem in copy.iterall())
        assert copy.pixel_array.shape == (original.Rows, original.Columns)
