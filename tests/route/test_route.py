"""Routing: each rule passing and failing, with the reasons recorded; planes, resampling, diffusion; a real series;
the shipped nodule model on chest CT only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom import Dataset

from gateway.assemble.assemble import assemble_series
from gateway.assemble.model import QCFlag, SliceRef, Volume
from gateway.registry.manifest import Manifest, load_manifest
from gateway.route.route import Decision, SeriesFacts, diffusion_b_values, plane_of, route, series_facts
from gateway.synth.ct import write_synthetic_ct

from model_packages import manifest_dict

CHEST_CT = SeriesFacts("CT", "CHEST", ("ORIGINAL", "PRIMARY", "AXIAL"), "Thorax 1.0 B31f")
MODELS = Path(__file__).resolve().parents[2] / "models"

AXIAL = ((1, 0, 0), (0, 1, 0))
SAGITTAL = ((0, 1, 0), (0, 0, -1))
CORONAL = ((1, 0, 0), (0, 0, -1))


def tilted(degrees: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Axial orientation rotated about the L-R axis by ``degrees``."""
    a = math.radians(degrees)
    return (1, 0, 0), (0, math.cos(a), math.sin(a))


def volume(
    slices: int = 20,
    orientation: tuple[tuple[float, ...], tuple[float, ...]] = AXIAL,
    spacing: tuple[float, float, float] = (2.5, 0.7, 0.7),
    qc: tuple[QCFlag, ...] = (),
    dimension_4: tuple[tuple[str, Any], ...] = (),
) -> Volume:
    row, col = np.array(orientation[0], float), np.array(orientation[1], float)
    affine = np.eye(4)
    affine[:3, 2] = row * spacing[2]
    affine[:3, 1] = col * spacing[1]
    affine[:3, 0] = np.cross(row, col) * spacing[0]
    shape = (slices, 4, 4) if not dimension_4 else (len(dimension_4), slices, 4, 4)
    return Volume(
        array=np.zeros(shape, np.float32),
        affine=affine,
        slices=tuple(SliceRef(f"1.2.3.{k}") for k in range(slices)),
        series_instance_uid="1.2.3",
        study_instance_uid="1.2",
        frame_of_reference_uid=None,
        modality="CT",
        qc=qc,
        dimension_4=dimension_4,
    )


def model(name: str = "m", **select: Any) -> Manifest:
    return Manifest.model_validate(manifest_dict(name, select=select))


def decide(facts: SeriesFacts, volumes: list[Volume], **select: Any) -> Decision:
    (decision,) = route(facts, volumes, [model(**select)])
    json.dumps(decision.as_dict())  # plain data, storable on a job
    return decision


def failed(decision: Decision) -> dict[tuple[str, int | None], str]:
    return {(c.rule, c.volume): c.detail for c in decision.checks if not c.passed}


# --- series facts -----------------------------------------------------------------------------------------------


def test_series_facts_from_a_header() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription = "Thorax"
    assert series_facts(ds) == SeriesFacts("CT", "CHEST", ("ORIGINAL", "PRIMARY", "AXIAL"), "Thorax")
    assert series_facts(Dataset()) == SeriesFacts(None, None, (), None)
    single = Dataset()
    single.ImageType = "DERIVED"
    single.BodyPartExamined = ""
    assert series_facts(single) == SeriesFacts(image_type=("DERIVED",))


# --- series-level rules -----------------------------------------------------------------------------------------


def test_no_rules_run_on_the_first_3d_volume() -> None:
    decision = decide(SeriesFacts(), [volume()])
    assert decision.run and decision.volume_index == 0
    assert decision.reason == "runs on volume 0: every rule passed"
    assert [c.rule for c in decision.checks] == ["diffusion", "min_slices"]


@pytest.mark.parametrize(
    ("select", "facts", "detail"),
    [
        ({"modality": ["MR"]}, CHEST_CT, "Modality CT is not one of MR"),
        ({"modality": ["CT"]}, SeriesFacts(), "Modality is missing; the model takes CT"),
        ({"body_part_examined": ["HEAD", "BRAIN"]}, CHEST_CT, "BodyPartExamined CHEST is not one of HEAD, BRAIN"),
        ({"image_type": ["ORIGINAL", "LOCALIZER"]}, CHEST_CT, "ImageType ORIGINAL\\PRIMARY\\AXIAL lacks LOCALIZER"),
        ({"series_description": "^lung"}, CHEST_CT, "SeriesDescription does not match /^lung/"),
    ],
)
def test_series_rules_failing(select: dict[str, Any], facts: SeriesFacts, detail: str) -> None:
    decision = decide(facts, [volume()], **select)
    assert not decision.run and decision.volume_index is None
    (rule,) = select
    assert failed(decision) == {(rule, None): detail}
    assert decision.reason == f"{rule}: {detail}"


@pytest.mark.parametrize(
    "select",
    [
        {"modality": ["MR", "ct"]},
        {"body_part_examined": ["chest"]},
        {"image_type": ["original", "AXIAL"]},
        {"series_description": "thorax.*b31"},
    ],
)
def test_series_rules_passing(select: dict[str, Any]) -> None:
    decision = decide(CHEST_CT, [volume()], **select)
    assert decision.run, decision.reason
    (rule,) = select
    assert [c.rule for c in decision.checks if c.volume is None] == [rule]


def test_the_description_is_not_repeated_in_the_reason() -> None:
    decision = decide(CHEST_CT, [volume()], series_description="^abdomen")
    assert "Thorax" not in json.dumps(decision.as_dict())


# --- body part, with the series description as its fallback -----------------------------------------------------

CHEST = {"body_part_examined": ["CHEST", "LUNG"], "body_part_from_description": "chest|thorax|lung"}
MISSING = "BodyPartExamined is missing; SeriesDescription"


@pytest.mark.parametrize(
    ("facts", "rule", "passed", "detail"),
    [
        (CHEST_CT, "body_part_examined", True, "BodyPartExamined CHEST is one of CHEST, LUNG"),
        (SeriesFacts("CT", "lung"), "body_part_examined", True, "BodyPartExamined lung is one of CHEST, LUNG"),
        (
            SeriesFacts("CT", "HEAD", (), "Thorax 1.0 B31f"),  # the description is not read: the header says HEAD
            "body_part_examined",
            False,
            "BodyPartExamined HEAD is not one of CHEST, LUNG",
        ),
        (
            SeriesFacts("CT", None, (), "LUNG 1.25mm"),
            "body_part_from_description",
            True,
            f"{MISSING} matches /chest|thorax|lung/",
        ),
        (
            SeriesFacts("CT", None, (), "CT HEAD WO CONTRAST"),
            "body_part_from_description",
            False,
            f"{MISSING} does not match /chest|thorax|lung/",
        ),
        (SeriesFacts("CT"), "body_part_from_description", False, f"{MISSING} does not match /chest|thorax|lung/"),
    ],
)
def test_body_part_with_the_description_as_its_fallback(
    facts: SeriesFacts, rule: str, passed: bool, detail: str
) -> None:
    decision = decide(facts, [volume()], **CHEST)
    (check,) = [c for c in decision.checks if c.volume is None]
    assert (check.rule, check.passed, check.detail) == (rule, passed, detail)
    assert decision.run == passed
    if not passed:
        assert decision.reason == f"{rule}: {detail}"


def test_without_the_fallback_a_missing_body_part_fails() -> None:
    decision = decide(SeriesFacts("CT", None, (), "Thorax"), [volume()], body_part_examined=["CHEST"])
    assert failed(decision) == {("body_part_examined", None): "BodyPartExamined is missing; the model takes CHEST"}


def test_the_fallback_is_a_checked_regular_expression_beside_body_part_examined() -> None:
    with pytest.raises(ValidationError, match="body_part_from_description is not a regular expression"):
        model(body_part_examined=["CHEST"], body_part_from_description="chest(")
    with pytest.raises(ValidationError, match="set body_part_examined too"):
        model(body_part_from_description="chest")


# --- volume-level rules -----------------------------------------------------------------------------------------


def test_slice_thickness() -> None:
    assert decide(CHEST_CT, [volume(spacing=(1.0, 0.7, 0.7))], slice_thickness_mm=(0.5, 1.0)).run
    decision = decide(CHEST_CT, [volume(spacing=(2.5, 0.7, 0.7))], slice_thickness_mm=(0.5, 1.5))
    assert failed(decision) == {("slice_thickness_mm", 0): "slice spacing 2.5 mm outside [0.5, 1.5] mm"}
    assert decision.reason == "volume 0: slice_thickness_mm: slice spacing 2.5 mm outside [0.5, 1.5] mm"


@pytest.mark.parametrize(
    ("orientation", "plane"),
    [(AXIAL, "axial"), (SAGITTAL, "sagittal"), (CORONAL, "coronal"), (tilted(9.5), "axial"), (tilted(20), "oblique")],
)
def test_planes(orientation: tuple[tuple[float, ...], tuple[float, ...]], plane: str) -> None:
    assert plane_of(volume(orientation=orientation).affine) == plane
    assert decide(CHEST_CT, [volume(orientation=orientation)], orientation=[plane]).run


def test_orientation_failing_names_the_plane() -> None:
    decision = decide(CHEST_CT, [volume(orientation=SAGITTAL), volume(orientation=tilted(25))], orientation=["axial"])
    assert failed(decision) == {
        ("orientation", 0): "sagittal; the model takes axial",
        ("orientation", 1): "oblique; the model takes axial",
    }


def test_runs_on_the_first_volume_passing_every_rule() -> None:
    volumes = [volume(orientation=SAGITTAL), volume(slices=3), volume(), volume()]
    decision = decide(CHEST_CT, volumes, orientation=["axial"], min_slices=10)
    assert decision.run and decision.volume_index == 2
    assert {c.volume for c in decision.checks} == {2}, "the checks of the volume it runs on"


def test_min_slices() -> None:
    decision = decide(CHEST_CT, [volume(slices=5)], min_slices=10)
    assert failed(decision) == {("min_slices", 0): "5 slices; the model needs at least 10"}
    assert decide(CHEST_CT, [volume(slices=10)], min_slices=10).run


def test_resampled_volumes_refused_when_the_model_says_so() -> None:
    tilt = QCFlag("gantry-tilt", "gantry tilt of 15 degrees corrected", resampled=True)
    gap = QCFlag("missing-slices", "a gap", resampled=False)
    resampled = volume(qc=(tilt, gap))
    assert decide(CHEST_CT, [resampled]).run, "accepted by default"
    decision = decide(CHEST_CT, [resampled], accept_resampled=False)
    assert failed(decision) == {("accept_resampled", 0): "resampled by assembly (gantry-tilt)"}
    assert decide(CHEST_CT, [volume(qc=(gap,))], accept_resampled=False).run


def test_volumes_with_missing_slices_refused_when_the_model_says_so() -> None:
    gap = QCFlag("missing-slices", "about 2 slice(s) missing", resampled=False)
    assert decide(CHEST_CT, [volume(qc=(gap,))]).run, "accepted by default"
    decision = decide(CHEST_CT, [volume(qc=(gap,))], accept_missing_slices=False)
    assert failed(decision) == {("accept_missing_slices", 0): "slices missing (about 2 slice(s) missing)"}
    assert decide(CHEST_CT, [volume()], accept_missing_slices=False).run


def test_a_4d_volume_is_not_for_a_3d_model() -> None:
    echoes = volume(dimension_4=(("EchoNumbers", 1), ("EchoNumbers", 2)))
    decision = decide(CHEST_CT, [echoes])
    assert failed(decision) == {("diffusion", 0): "a 4D volume (varying EchoNumbers); the model takes a 3D one"}


def diffusion(*b_values: float) -> Volume:
    gradients = [None if b == 0 else (1.0, 0.0, 0.0) for b in b_values]
    return volume(dimension_4=tuple(("Diffusion", (b, g)) for b, g in zip(b_values, gradients, strict=True)))


def test_diffusion() -> None:
    mr = SeriesFacts("MR", "BRAIN", ("ORIGINAL", "PRIMARY", "DIFFUSION"), "ep2d_diff")
    dwi = diffusion(0, 1000, 1000, 1000)
    assert diffusion_b_values(dwi) == (0.0, 1000.0)
    decision = decide(mr, [volume(), dwi], modality=["MR"], diffusion=True)
    assert decision.run and decision.volume_index == 1
    assert failed(decide(mr, [volume()], diffusion=True)) == {
        ("diffusion", 0): "not a 4D diffusion volume; the model takes one"
    }
    needs_three = decide(mr, [dwi], diffusion=True, min_b_values=3)
    assert failed(needs_three) == {("diffusion", 0): "2 distinct b-values (0, 1000); the model needs at least 3"}
    assert decide(mr, [diffusion(0, 500, 1000)], diffusion=True, min_b_values=3).run
    assert diffusion_b_values(diffusion(0, 1000.04, 1000, 999.96)) == (0.0, 1000.0), "told apart to 0.1 s/mm2"
    assert failed(decide(mr, [dwi])) == {("diffusion", 0): "a 4D volume (varying Diffusion); the model takes a 3D one"}


def test_no_volume() -> None:
    decision = decide(CHEST_CT, [], modality=["CT"])
    assert not decision.run
    assert decision.reason == "volumes: assembly built no volume from the series"


def test_every_model_gets_a_decision_in_order() -> None:
    models = [model("ct-model", modality=["CT"]), model("mr-model", modality=["MR"])]
    decisions = route(CHEST_CT, [volume()], models)
    assert [(d.model, d.run) for d in decisions] == [("ct-model@1.0.0", True), ("mr-model@1.0.0", False)]
    stored = decisions[1].as_dict()
    assert stored["reason"] == "modality: Modality CT is not one of MR"
    assert stored["checks"][0] == {
        "rule": "modality",
        "passed": False,
        "detail": "Modality CT is not one of MR",
        "volume": None,
    }


def test_a_real_synthetic_series(tmp_path: Path) -> None:
    ct = write_synthetic_ct(tmp_path / "ct", 12, rows=32, columns=32, n_nodules=0)
    paths = sorted((tmp_path / "ct").glob("*.dcm"))
    facts = series_facts(pydicom.dcmread(paths[0], stop_before_pixels=True))
    assert facts.modality == "CT" and facts.body_part_examined == "CHEST" and "AXIAL" in facts.image_type
    volumes = assemble_series(paths).volumes
    manifests = [
        model("lung", modality=["CT"], body_part_examined=["CHEST"], orientation=["axial"], min_slices=10),
        model("thin", modality=["CT"], slice_thickness_mm=(0.0, 1.25)),
        model("brain", modality=["MR"], diffusion=True),
    ]
    lung, thin, brain = route(facts, volumes, manifests)
    assert lung.run and lung.volume_index == 0
    assert not thin.run and f"slice spacing {ct.slice_spacing:g} mm outside [0, 1.25] mm" in thin.reason
    assert not brain.run and "Modality CT is not one of MR" in brain.reason
    assert "not a 4D diffusion volume" in brain.reason


def synthetic_ct(folder: Path, body_part: str | None, description: str | None) -> list[Path]:
    """The synthetic (thorax) phantom with its BodyPartExamined and SeriesDescription replaced (``None``: removed)."""
    write_synthetic_ct(folder, 24, rows=32, columns=32, n_nodules=0)
    paths = sorted(folder.glob("*.dcm"))
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in (("BodyPartExamined", body_part), ("SeriesDescription", description)):
            if value is None:
                del ds[keyword]
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return paths


@pytest.mark.parametrize(
    ("body_part", "description", "reason"),
    [
        ("HEAD", "CT HEAD WO CONTRAST 5mm", "body_part_examined: BodyPartExamined HEAD is not one of CHEST, THORAX"),
        (None, "Routine Brain 5.0 H31s", f"body_part_from_description: {MISSING} does not match /chest|thorax|lung/"),
    ],
)
def test_the_shipped_nodule_model_does_not_run_on_a_head_ct(
    tmp_path: Path, body_part: str | None, description: str, reason: str
) -> None:
    paths = synthetic_ct(tmp_path / "ct", body_part, description)
    nodules = load_manifest(MODELS / "ct-nodule-unet")
    (decision,) = route(series_facts(pydicom.dcmread(paths[0])), assemble_series(paths).volumes, [nodules])
    assert not decision.run and decision.reason.startswith(reason), decision.reason


@pytest.mark.parametrize(
    ("body_part", "description", "rule"),
    [
        ("CHEST", "Synthetic thorax phantom (seed 0)", "body_part_examined"),  # as gateway.synth.ct writes it
        ("CHESTABDPELVIS", None, "body_part_examined"),
        (None, "Thorax 1.0 B31f", "body_part_from_description"),
    ],
)
def test_the_shipped_nodule_model_runs_on_the_chest_phantom(
    tmp_path: Path, body_part: str | None, description: str | None, rule: str
) -> None:
    paths = synthetic_ct(tmp_path / "ct", body_part, description)
    nodules = load_manifest(MODELS / "ct-nodule-unet")
    (decision,) = route(series_facts(pydicom.dcmread(paths[0])), assemble_series(paths).volumes, [nodules])
    assert decision.run, decision.reason
    assert [c.rule for c in decision.checks if c.volume is None] == ["modality", rule]
