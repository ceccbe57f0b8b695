"""A MONAI model-zoo bundle as it comes: its manifest synthesised from its own configs, overrides, registration.

The bundle is the real ``spleen_ct_segmentation`` from ``../shared/data/monai-bundles`` (configs and LICENSE, no
weights): ``models/model.pt`` is built from its own ``network_def`` by MONAI's parser, as the model zoo's weights are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import StoreSettings
from gateway.errors import ManifestError, ModelConflict, ModelError
from gateway.registry.bundle_manifest import label_codes, package_manifest
from gateway.registry.dryrun import input_shape
from gateway.registry.manifest import GENERIC_CATEGORY, GENERIC_TYPE
from gateway.registry.registry import Registry, RegistryIndex, weights_sha256

from model_packages import tar_folder, zip_folder
from monai_bundles import SPLEEN, spleen_bundle
from monai_bundles import spleen_weights as make_spleen_weights

SPLEEN_CODE = {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"}
ANATOMY = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}


@pytest.fixture(scope="session")
def spleen_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_spleen_weights(tmp_path_factory.mktemp("spleen-weights"))


@pytest.fixture
def bundle(tmp_path: Path, spleen_weights: Path) -> Path:
    return spleen_bundle(tmp_path / "src", spleen_weights)


def edit_json(path: Path, change: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> None:
    """Change ``path``'s JSON: set each ``a.b.c`` key of ``change``, remove each ``a.b.c`` in ``drop``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for dotted, value in (change or {}).items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    for dotted in drop:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[last]
    path.write_text(json.dumps(data), encoding="utf-8")


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


OUTPUT = "network_data_format.outputs.pred"


# --- the synthesised manifest -----------------------------------------------------------------------------------


def test_the_spleen_bundle_as_it_comes(bundle: Path) -> None:
    manifest = package_manifest(bundle)
    assert (manifest.name, manifest.version, manifest.ref) == ("spleen_ct_segmentation", "0.5.9", manifest.ref)
    assert (manifest.backend, manifest.weights, manifest.trust_code) == ("monai-bundle", ".", False)
    assert manifest.inference.pipeline == "bundle" and manifest.inference.input_channels == 1
    assert manifest.inference.patch_size == (96, 96, 96), "the inferer's roi_size"
    assert (manifest.inference.batch_size, manifest.inference.overlap) == (4, 0.5), "sw_batch_size and overlap"
    assert manifest.select.modality == ["CT"]
    assert manifest.description.startswith("A pre-trained model for volumetric (3D) segmentation of the spleen")
    assert manifest.authors == ["MONAI team"]
    assert manifest.licence == "Apache License, Version 2.0, January 2004 (from the bundle's LICENSE file)"
    assert manifest.intended_use == "This is an example, not to be used for diagnostic purposes"
    segmentation = manifest.outputs.segmentation
    assert segmentation is not None and segmentation.kind == "labelmap"
    (spleen,) = segmentation.labels
    assert (spleen.value, spleen.name) == (1, "spleen")
    assert spleen.type.model_dump() == SPLEEN_CODE and spleen.category.model_dump() == ANATOMY


def test_the_name_is_the_folder_name_in_lower_case(tmp_path: Path, spleen_weights: Path) -> None:
    bundle = spleen_bundle(tmp_path, spleen_weights, name="wholeBody_ct_segmentation")
    assert package_manifest(bundle).name == "wholebody_ct_segmentation"
    bad = spleen_bundle(tmp_path, spleen_weights, name="Spleen CT")
    with pytest.raises(ManifestError, match=r"'Spleen CT' lower-cased \('spleen ct'\) is not a model name.*name:"):
        package_manifest(bad)
    write_yaml(bad / "model.yaml", {"name": "spleen-ct"})
    assert package_manifest(bad).name == "spleen-ct"


def test_fallbacks_say_where_they_came_from(bundle: Path) -> None:
    (bundle / "LICENSE").unlink()
    edit_json(bundle / "configs" / "metadata.json", {"authors": ["A. Author", "B. Author"]}, drop=("intended_use",))
    manifest = package_manifest(bundle)
    assert manifest.licence == "Copyright (c) MONAI Consortium", "metadata's copyright without a LICENSE file"
    assert manifest.authors == ["A. Author", "B. Author"]
    assert manifest.intended_use == "not stated (configs/metadata.json has no intended_use)"
    edit_json(bundle / "configs" / "metadata.json", drop=("copyright", "authors", "description"))
    manifest = package_manifest(bundle)
    assert manifest.licence.startswith("not stated (no LICENSE file")
    assert manifest.authors == ["unknown (configs/metadata.json names no authors)"]
    assert manifest.description == "Spleen CT segmentation", "metadata's name when there is no description"


def test_modality_and_patch_size_fallbacks(bundle: Path) -> None:
    edit_json(bundle / "configs" / "metadata.json", {"network_data_format.inputs.image.modality": "MRI"})
    edit_json(bundle / "configs" / "inference.json", {"inferer.roi_size": "@roi", "roi": [64, 64, 32]})
    manifest = package_manifest(bundle)
    assert manifest.select.modality == ["MR"]
    assert manifest.inference.patch_size == (64, 64, 32), "an @id reference to a literal is followed"
    edit_json(bundle / "configs" / "inference.json", {"inferer": {"_target_": "SimpleInferer"}})
    assert package_manifest(bundle).inference.patch_size == (96, 96, 96), "metadata's spatial_shape"


@pytest.mark.parametrize(
    ("label", "code"),
    [
        ("spleen", "78961009"),
        ("Spleen", "78961009"),
        ("inferior_vena_cava", "64131007"),
        ("kidney_left", "64033007"),
        ("right adrenal gland", "23451007"),
        ("PortalVein", "32764006"),
    ],
)
def test_label_codes(label: str, code: str) -> None:
    category, kind = label_codes(label)
    assert kind["value"] == code and kind["scheme"] == "SCT" and category == ANATOMY


def test_a_tumour_is_a_morphologically_abnormal_structure() -> None:
    category, kind = label_codes("tumor")
    assert (category["value"], kind["value"]) == ("49755003", "108369006")


def test_an_unknown_label_gets_the_generic_codes_and_keeps_its_name(bundle: Path) -> None:
    channels = {"0": "background", "1": "spleen", "2": "splenic hilum thing"}
    edit_json(bundle / "configs" / "metadata.json", {f"{OUTPUT}.channel_def": channels})
    segmentation = package_manifest(bundle).outputs.segmentation
    assert segmentation is not None
    spleen, other = segmentation.labels
    assert (other.value, other.name, other.category, other.type) == (
        2,
        "splenic hilum thing",
        GENERIC_CATEGORY,
        GENERIC_TYPE,
    )
    assert spleen.color != other.color, "a distinct colour per label"


def test_labels_from_pred_classes_when_unambiguous(bundle: Path) -> None:
    metadata = bundle / "configs" / "metadata.json"
    edit_json(metadata, drop=(f"{OUTPUT}.channel_def",))
    segmentation = package_manifest(bundle).outputs.segmentation
    assert segmentation is not None and [(s.value, s.name) for s in segmentation.labels] == [(1, "spleen")]
    edit_json(metadata, {"pred_classes": "2 channels, the rest is spleen", "label_classes": "one channel"})
    with pytest.raises(ManifestError, match=r"channel_def is missing.*outputs\.segmentation\.labels in a model\.yaml"):
        package_manifest(bundle)


# --- refusals ---------------------------------------------------------------------------------------------------


def test_an_expression_in_a_field_read_is_refused_by_name(bundle: Path) -> None:
    edit_json(bundle / "configs" / "inference.json", {"inferer.roi_size": "$[96] * 3"})
    with pytest.raises(ManifestError, match=r"configs/inference\.json: inferer::roi_size = '\$\[96\] \* 3' is an expr"):
        package_manifest(bundle)
    write_yaml(bundle / "model.yaml", {"inference": {"patch_size": [96, 96, 96]}})
    assert package_manifest(bundle).inference.patch_size == (96, 96, 96), "a field the override gives is not read"
    edit_json(bundle / "configs" / "metadata.json", {"network_data_format.inputs.image.modality": "$'CT'"})
    with pytest.raises(ManifestError, match=r"network_data_format\.inputs\.image\.modality = \"\$'CT'\""):
        package_manifest(bundle)


def test_a_bad_metadata_json_is_named(bundle: Path) -> None:
    metadata = bundle / "configs" / "metadata.json"
    metadata.write_text('{"version": "0.5.9",', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"spleen_ct_segmentation/configs/metadata\.json: not readable JSON"):
        package_manifest(bundle)
    metadata.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        package_manifest(bundle)
    metadata.write_text(json.dumps({"version": "0.1"}), encoding="utf-8")
    with pytest.raises(ManifestError, match=r"network_data_format\.inputs is missing"):
        package_manifest(bundle)
    metadata.write_text(
        json.dumps(
            {
                "version": "0 1",
                "network_data_format": json.loads(
                    SPLEEN.joinpath("configs", "metadata.json").read_text(encoding="utf-8")
                )["network_data_format"],
            }
        )
    )
    with pytest.raises(
        ManifestError, match=r"MONAI bundle spleen_ct_segmentation \(configs/metadata\.json\): version:"
    ):
        package_manifest(bundle)


# --- overrides --------------------------------------------------------------------------------------------------


SPLEEN_OVERRIDE = {
    "version": "0.5.9-site1",
    "select": {"body_part_examined": ["ABDOMEN"], "min_slices": 40},
    "outputs": {
        "display_window": [40, 400],
        "segmentation": {
            "labels": [
                {"name": "spleen", "color": [0, 151, 206], "measurements": ["volume", "mean"], "lesions": False},
                {
                    "value": 2,
                    "name": "accessory spleen",
                    "category": ANATOMY,
                    "type": {"value": "17075002", "scheme": "SCT", "meaning": "Accessory spleen"},
                },
            ]
        },
    },
}


def test_an_override_beside_the_bundle(bundle: Path) -> None:
    write_yaml(bundle / "model.yaml", SPLEEN_OVERRIDE)
    manifest = package_manifest(bundle)
    assert manifest.version == "0.5.9-site1" and manifest.name == "spleen_ct_segmentation"
    assert manifest.select.modality == ["CT"] and manifest.select.body_part_examined == ["ABDOMEN"]
    assert manifest.select.min_slices == 40 and manifest.outputs.display_window == (40, 400)
    segmentation = manifest.outputs.segmentation
    assert segmentation is not None
    spleen, accessory = segmentation.labels
    assert spleen.type.model_dump() == SPLEEN_CODE, "merged by name: the bundle's codes stay"
    assert spleen.color == (0, 151, 206) and spleen.measurements == ["volume", "mean"]
    assert (accessory.value, accessory.type.value) == (2, "17075002")
    assert manifest.inference.pipeline == "bundle" and manifest.weights == "."


def test_an_override_with_an_unknown_key_or_label_is_named(bundle: Path) -> None:
    write_yaml(bundle / "model.yaml", {"select": {"modalty": ["CT"]}})
    with pytest.raises(ManifestError, match=r"configs/metadata\.json \+ model\.yaml\): select\.modalty: Extra inputs"):
        package_manifest(bundle)
    write_yaml(
        bundle / "model.yaml", {"outputs": {"segmentation": {"labels": [{"name": "liver", "color": [1, 2, 3]}]}}}
    )
    with pytest.raises(ManifestError, match=r"labels\[0\]: no label named 'liver'.*'spleen'"):
        package_manifest(bundle)
    write_yaml(bundle / "model.yaml", {"preprocess": {"orientation": "IPL"}})
    with pytest.raises(ManifestError, match="leave preprocess out"):
        package_manifest(bundle)
    write_yaml(bundle / "model.yaml", {"backend": "monai-bundle"})
    with pytest.raises(ManifestError, match="names backend but not weights"):
        package_manifest(bundle)


def test_an_override_gives_the_labels_a_bundle_lacks(bundle: Path) -> None:
    edit_json(bundle / "configs" / "metadata.json", drop=(f"{OUTPUT}.channel_def", "pred_classes", "label_classes"))
    labels = [{"value": 1, "name": "spleen", "category": ANATOMY, "type": SPLEEN_CODE}]
    write_yaml(bundle / "model.yaml", {"outputs": {"segmentation": {"labels": labels}}})
    segmentation = package_manifest(bundle).outputs.segmentation
    assert segmentation is not None and segmentation.labels[0].type.model_dump() == SPLEEN_CODE


def test_an_override_wrapping_the_bundle(tmp_path: Path, spleen_weights: Path) -> None:
    package = tmp_path / "site-spleen"
    spleen_bundle(package, spleen_weights)
    write_yaml(package / "model.yaml", {"weights": "spleen_ct_segmentation", "select": {"min_slices": 20}})
    manifest = package_manifest(package)
    assert (manifest.name, manifest.weights, manifest.select.min_slices) == (
        "spleen_ct_segmentation",
        "spleen_ct_segmentation",
        20,
    )
    write_yaml(package / "model.yaml", {"weights": "elsewhere"})
    with pytest.raises(ManifestError, match="'elsewhere' is not a MONAI bundle"):
        package_manifest(package)


def test_a_full_model_yaml_is_read_as_it_is(bundle: Path) -> None:
    full = package_manifest(bundle).model_dump(mode="json")
    full.update(name="spleen-full", version="1")
    write_yaml(bundle / "model.yaml", full)
    manifest = package_manifest(bundle)
    assert manifest.ref == "spleen-full@1"
    full["select"] = {"modalty": ["CT"]}
    write_yaml(bundle / "model.yaml", full)
    with pytest.raises(ManifestError, match=r"model\.yaml: select\.modalty"):
        package_manifest(bundle)


# --- registration -----------------------------------------------------------------------------------------------


@pytest.fixture
def index(tmp_path: Path) -> Iterator[RegistryIndex]:
    idx = RegistryIndex(StoreSettings(data_dir=tmp_path / "data"))
    try:
        yield idx
    finally:
        idx.close()


def test_registering_a_bare_bundle(index: RegistryIndex, bundle: Path) -> None:
    registry = Registry(index, dry_run=None)  # the bookkeeping; the dry run is test_registering_with_the_dry_run's
    model = registry.register(bundle)
    assert model.ref == "spleen_ct_segmentation@0.5.9" and model.active and model.enabled
    assert model.manifest == package_manifest(bundle) and model.manifest.trust_code is False
    assert (model.folder / "models" / "model.pt").is_file() and (model.folder / "configs" / "inference.json").is_file()
    assert model.sha256 == weights_sha256(bundle, model.manifest)
    assert registry.register(bundle).registered_at == model.registered_at, "idempotent"
    registry.remove(model.ref)
    assert registry.register(bundle).ref == model.ref, "a removed version comes back when registered again"


def test_an_override_is_the_manifest_not_the_weights(index: RegistryIndex, bundle: Path) -> None:
    registry = Registry(index, dry_run=None)
    first = registry.register(bundle)
    write_yaml(bundle / "model.yaml", {"select": {"min_slices": 30}})
    assert weights_sha256(bundle, package_manifest(bundle)) == first.sha256, "model.yaml is left out of the digest"
    with pytest.raises(ModelConflict, match=r"same weights but another model\.yaml"):
        registry.register(bundle)
    write_yaml(bundle / "model.yaml", {"version": "0.5.9-b", "trust_code": True})
    with pytest.raises(ModelError, match="only an admin may register it"):
        registry.register(bundle)
    assert registry.register(bundle, code_allowed_by="test admin").dry_run["code_allowed_by"] == "test admin"


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_registering_a_bare_bundle_archive(index: RegistryIndex, bundle: Path, tmp_path: Path, kind: str) -> None:
    registry = Registry(index, dry_run=None)
    pack = zip_folder if kind == "zip" else tar_folder
    archive = pack(bundle, tmp_path / f"upload-1234.{kind}", top=bundle.name)
    assert registry.register(archive).ref == "spleen_ct_segmentation@0.5.9", "named after the archive's top folder"
    flat = pack(bundle, tmp_path / f"flat.{kind}")
    with pytest.raises(ManifestError, match="at the top of the archive, so its folder name is unknown"):
        registry.register(flat)
    assert list(registry.staging.iterdir()) == []


def test_registering_with_the_dry_run(index: RegistryIndex, bundle: Path) -> None:
    """The default registry's dry run (in a child process) on the bare bundle: for ``inference.pipeline: bundle``
    the bundle's own pipeline on a synthetic volume (gateway.registry.dryrun)."""
    model = Registry(index).register(bundle)
    shape = input_shape(model.manifest)
    assert model.dry_run["input_shape"] == list(shape) and shape[1] == 1
    output = model.dry_run["output_shape"]
    assert output[0] == 1 and output[2:] == list(shape[2:]) and output[1] in (1, 2), output


def test_the_cli_registers_a_bare_bundle(tmp_path: Path, bundle: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_MODELS__REGISTER_SHIPPED"] = "false"
    command = [sys.executable, "-m", "gateway", "models", "register", str(bundle), "--data-dir", str(tmp_path / "d")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("spleen_ct_segmentation@0.5.9: active, sha256 "), done.stdout
    edit_json(bundle / "configs" / "metadata.json", {"version": "0.6.0", "intended_use": "$print('hi')"})
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "intended_use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "hi\n" not in done.stdout


def test_the_documented_override(index: RegistryIndex, bundle: Path) -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text(encoding="utf-8")
    marker = "# bundles/spleen_ct_segmentation/model.yaml\n"
    example = docs[docs.index(marker) : docs.index("```", docs.index(marker))]
    (bundle / "model.yaml").write_text(example, encoding="utf-8")
    model = Registry(index, dry_run=None).register(bundle)
    assert model.ref == "spleen_ct_segmentation@0.5.9-site1"
    assert model.manifest.select.body_part_examined == ["ABDOMEN"] and model.manifest.select.modality == ["CT"]
    segmentation = model.manifest.outputs.segmentation
    assert segmentation is not None and segmentation.labels[0].type.model_dump() == SPLEEN_CODE
    assert segmentation.labels[0].color == (0, 151, 206)
