"""The model registry: registration with a dry run, idempotence, conflicts, versions, enable/disable/remove."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.config import ModelsSettings, Settings, StoreSettings
from gateway.errors import ManifestError, ModelConflict, ModelError, NotFound
from gateway.registry.manifest import Manifest
from gateway.registry.registry import Registry, RegistryIndex, parse_ref, shipped_models_dir, weights_sha256
from gateway.runtime import Gateway
from gateway.store.index import ModelVersion, RemovedModel
from gateway.store.store import InstanceStore

from conftest import make_settings
from model_packages import manifest_dict, onnx_model, tar_folder, write_package, zip_folder


@pytest.fixture
def index(tmp_path: Path) -> Iterator[RegistryIndex]:
    idx = RegistryIndex(StoreSettings(data_dir=tmp_path / "data"))
    try:
        yield idx
    finally:
        idx.close()


@pytest.fixture
def registry(index: RegistryIndex) -> Registry:
    return Registry(index)


def package(tmp_path: Path, version: str = "1.0.0", name: str = "tiny-seg", **kwargs: object) -> Path:
    return write_package(tmp_path / f"src-{name}-{version}", manifest_dict(name, version), **kwargs)


def rows(index: RegistryIndex) -> int:
    with index.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(ModelVersion)) or 0)


def staged(registry: Registry) -> list[Path]:
    return list(registry.staging.iterdir())


# --- registering ------------------------------------------------------------------------------------------------


def test_register_a_folder(registry: Registry, tmp_path: Path) -> None:
    src = package(tmp_path)
    model = registry.register(src)
    assert (model.name, model.version, model.ref) == ("tiny-seg", "1.0.0", "tiny-seg@1.0.0")
    assert model.folder == registry.root / "tiny-seg" / "1.0.0"
    assert (model.folder / "model.yaml").read_bytes() == (src / "model.yaml").read_bytes()
    assert model.sha256 == hashlib.sha256((src / "model.onnx").read_bytes()).hexdigest()
    assert model.active and model.enabled and model.registered_at > 0
    assert model.dry_run["input_shape"] == [1, 1, 8, 16, 16]
    assert model.dry_run["output_shape"] == [1, 3, 8, 16, 16]
    assert model.dry_run["device"] == "cpu" and model.dry_run["seconds"] >= 0
    assert isinstance(model.manifest, Manifest) and model.manifest.inference.patch_size == (8, 16, 16)
    assert registry.get("tiny-seg") == model == registry.get("tiny-seg@1.0.0")
    assert registry.list() == [model] == registry.active()
    assert staged(registry) == [], "nothing left in staging"


@pytest.mark.parametrize(("kind", "top"), [("zip", None), ("zip", "pkg"), ("tar.gz", None), ("tgz", "pkg")])
def test_register_an_archive(registry: Registry, tmp_path: Path, kind: str, top: str | None) -> None:
    src = package(tmp_path)
    archive = tmp_path / f"model.{kind}"
    (zip_folder if kind == "zip" else tar_folder)(src, archive, top=top)
    model = registry.register(archive)
    assert model.ref == "tiny-seg@1.0.0" and model.active
    assert sorted(p.name for p in model.folder.iterdir()) == ["model.onnx", "model.yaml"]
    assert model.sha256 == hashlib.sha256((src / "model.onnx").read_bytes()).hexdigest()
    assert staged(registry) == []


def test_registering_again_is_idempotent(registry: Registry, index: RegistryIndex, tmp_path: Path) -> None:
    src = package(tmp_path)
    first = registry.register(src)
    again = registry.register(src)
    from_zip = registry.register(zip_folder(src, tmp_path / "same.zip"))
    assert again == first == from_zip
    assert rows(index) == 1


def test_same_weights_name_and_version_with_other_weights_conflict(
    registry: Registry, index: RegistryIndex, tmp_path: Path
) -> None:
    registry.register(package(tmp_path))
    other = write_package(tmp_path / "other", manifest_dict(), weights=onnx_model(3, seed=2))
    with pytest.raises(ModelConflict, match=r"tiny-seg@1\.0\.0 is already registered with other weights"):
        registry.register(other)
    archive = zip_folder(other, tmp_path / "other.zip")
    with pytest.raises(ModelConflict, match="other weights"):
        registry.register(archive)
    assert rows(index) == 1 and staged(registry) == []


def test_same_version_with_another_manifest_is_a_conflict(registry: Registry, tmp_path: Path) -> None:
    src = package(tmp_path)
    registry.register(src)
    changed = manifest_dict(description="Changed, same weights.")
    write_package(tmp_path / "changed", changed, weights=(src / "model.onnx").read_bytes())
    with pytest.raises(ModelConflict, match=r"another model\.yaml"):
        registry.register(tmp_path / "changed")


def test_a_bad_manifest_names_its_keys(registry: Registry, index: RegistryIndex, tmp_path: Path) -> None:
    data = manifest_dict(inferense={"batch_size": 2})  # misspelt section
    data["inference"] = {"patch_size": [8, 0, 16]}
    write_package(tmp_path / "bad", data)
    with pytest.raises(ManifestError) as refused:
        registry.register(tmp_path / "bad")
    assert "inferense" in refused.value.reason and "inference.patch_size" in refused.value.reason
    (tmp_path / "nomanifest").mkdir()
    with pytest.raises(ManifestError, match=r"no model\.yaml"):
        registry.register(tmp_path / "nomanifest")
    assert rows(index) == 0


def test_missing_weights_are_refused(registry: Registry, index: RegistryIndex, tmp_path: Path) -> None:
    src = package(tmp_path)
    (src / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"weights 'model.onnx' not found"):
        registry.register(src)
    with pytest.raises(ModelError, match=r"weights 'model.onnx' not found"):
        registry.register(zip_folder(src, tmp_path / "noweights.zip"))
    assert rows(index) == 0 and not (registry.root / "tiny-seg").exists() and staged(registry) == []


def test_corrupt_weights_fail_the_dry_run(registry: Registry, index: RegistryIndex, tmp_path: Path) -> None:
    src = write_package(tmp_path / "corrupt", manifest_dict(), weights=b"this is not an ONNX model" * 10)
    with pytest.raises(ModelError, match=r"^dry run: cannot load the model: .*model\.onnx"):
        registry.register(src)
    assert rows(index) == 0 and not (registry.root / "tiny-seg").exists() and staged(registry) == []


def test_a_dry_run_shape_mismatch_is_refused(registry: Registry, index: RegistryIndex, tmp_path: Path) -> None:
    five = write_package(tmp_path / "five", manifest_dict(labels=5), out_channels=3)
    with pytest.raises(ModelError) as refused:
        registry.register(five)
    assert (
        refused.value.reason
        == "dry run: output has 3 channels, the manifest declares 5 labels, values up to 5 (needs 6)"
    )
    pooled = write_package(tmp_path / "pooled", manifest_dict(), pool=True)
    with pytest.raises(ModelError, match=r"output spatial shape \[4, 8, 8\] differs from the input's \[8, 16, 16\]"):
        registry.register(pooled)
    nan = write_package(tmp_path / "nan", manifest_dict(), nan=True)
    with pytest.raises(ModelError, match="NaN or infinite"):
        registry.register(nan)
    assert rows(index) == 0 and staged(registry) == []


def test_registering_without_a_dry_run(index: RegistryIndex, tmp_path: Path) -> None:
    registry = Registry(index, dry_run=None)
    src = write_package(tmp_path / "corrupt", manifest_dict(), weights=b"not a model")
    model = registry.register(src)
    assert model.dry_run == {} and model.active


def test_not_a_package(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "model.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model package folder or archive"):
        registry.register(tmp_path / "model.txt")
    with pytest.raises(ModelError, match="not a model package folder or archive"):
        registry.register(tmp_path / "missing")


def test_a_link_in_a_package_folder_is_refused(registry: Registry, tmp_path: Path) -> None:
    src = package(tmp_path)
    (tmp_path / "elsewhere.txt").write_text("outside")
    (src / "notes.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(ModelError, match=r"notes\.txt is a link"):
        registry.register(src)


def test_a_bundle_folder_is_hashed_file_by_file(tmp_path: Path) -> None:
    bundle = tmp_path / "pkg" / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    (bundle / "configs").mkdir()
    (bundle / "configs" / "inference.json").write_text("{}")
    manifest = Manifest.model_validate(manifest_dict(backend="monai-bundle", weights="bundle"))
    first = weights_sha256(tmp_path / "pkg", manifest)
    assert first == weights_sha256(tmp_path / "pkg", manifest), "stable"
    (bundle / "configs" / "inference.json").rename(bundle / "configs" / "other.json")
    assert weights_sha256(tmp_path / "pkg", manifest) != first, "a renamed file changes the digest"
    (bundle / "configs" / "other.json").unlink()
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match="holds no files"):
        weights_sha256(tmp_path / "pkg", manifest)


def test_an_interrupted_registration_leaves_a_folder_that_is_replaced(registry: Registry, tmp_path: Path) -> None:
    leftover = registry.root / "tiny-seg" / "1.0.0"
    leftover.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half")
    model = registry.register(package(tmp_path))
    assert (model.folder / "model.onnx").read_bytes() == (tmp_path / "src-tiny-seg-1.0.0" / "model.onnx").read_bytes()
    assert staged(registry) == []


# --- versions ---------------------------------------------------------------------------------------------------


def test_versions_side_by_side_and_the_active_one(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.register(package(tmp_path, "1.0.0"))
    v2 = registry.register(package(tmp_path, "1.1.0"))
    assert v1.folder.is_dir() and v2.folder.is_dir() and v1.folder != v2.folder
    assert [(m.version, m.active) for m in registry.list()] == [("1.0.0", False), ("1.1.0", True)]
    assert registry.get("tiny-seg").version == "1.1.0", "the newest registered version is active"
    assert registry.get("tiny-seg@1.0.0").version == "1.0.0"

    chosen = registry.enable("tiny-seg@1.0.0")
    assert chosen.active and chosen.version == "1.0.0"
    registry.register(package(tmp_path, "1.2.0"))
    assert [m.ref for m in registry.active()] == ["tiny-seg@1.0.0"], "a chosen version stays active"
    assert [m.version for m in registry.versions("tiny-seg")] == ["1.0.0", "1.1.0", "1.2.0"]
    registry.enable("tiny-seg@1.2.0")
    assert registry.get("tiny-seg").version == "1.2.0"


def test_disable_and_enable(registry: Registry, tmp_path: Path) -> None:
    registry.register(package(tmp_path, "1.0.0"))
    registry.register(package(tmp_path, "1.0.0", name="other"))
    disabled = registry.disable("tiny-seg")
    assert [m.enabled for m in disabled] == [False]
    assert [m.ref for m in registry.active()] == ["other@1.0.0"]
    assert not registry.get("tiny-seg").enabled, "still registered, still answers get"
    registry.register(package(tmp_path, "2.0.0"))
    assert [m.ref for m in registry.active()] == ["other@1.0.0"], "a new version of a disabled model stays disabled"
    enabled = registry.enable("tiny-seg")
    assert enabled.ref == "tiny-seg@2.0.0" and enabled.enabled
    assert [m.ref for m in registry.active()] == ["other@1.0.0", "tiny-seg@2.0.0"]
    with pytest.raises(ModelError, match="disable takes a model name"):
        registry.disable("tiny-seg@2.0.0")
    with pytest.raises(NotFound):
        registry.disable("nothing")


def test_remove(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.register(package(tmp_path, "1.0.0"))
    v2 = registry.register(package(tmp_path, "2.0.0"))
    removed = registry.remove("tiny-seg@2.0.0")
    assert removed.ref == v2.ref and not v2.folder.exists()
    assert registry.get("tiny-seg") == registry.get("tiny-seg@1.0.0") and registry.get("tiny-seg").active
    with pytest.raises(ModelError, match="remove takes NAME@VERSION"):
        registry.remove("tiny-seg")
    with pytest.raises(NotFound, match=r"no model tiny-seg@9"):
        registry.remove("tiny-seg@9")
    registry.remove("tiny-seg@1.0.0")
    assert not v1.folder.exists() and not (registry.root / "tiny-seg").exists()
    assert registry.list() == [] and registry.active() == [] and staged(registry) == []
    with pytest.raises(NotFound, match="no model 'tiny-seg'"):
        registry.get("tiny-seg")
    again = registry.register(package(tmp_path, "2.0.0"))
    assert again.active, "a removed version can be registered again"


def test_unknown_models(registry: Registry) -> None:
    for call in (registry.get, registry.enable):
        with pytest.raises(NotFound):
            call("nothing")
        with pytest.raises(NotFound):
            call("nothing@1")
    with pytest.raises(ModelError, match="not a model reference"):
        registry.get("@1")


def test_parse_ref() -> None:
    assert parse_ref("a") == ("a", None)
    assert parse_ref("a@1.0+cu") == ("a", "1.0+cu")
    for bad in ("", "@", "a@", "@1"):
        with pytest.raises(ModelError):
            parse_ref(bad)


# --- sharing the index ------------------------------------------------------------------------------------------


def test_a_model_registered_by_one_registry_is_seen_by_another(tmp_path: Path) -> None:
    settings = StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0)
    store = InstanceStore(settings)
    cli_index = RegistryIndex(settings)
    try:
        serving, cli = Registry(store), Registry(cli_index)
        assert serving.active() == []
        cli.register(package(tmp_path))
        assert [m.ref for m in serving.active()] == ["tiny-seg@1.0.0"]
        cli.disable("tiny-seg")
        assert serving.active() == []
        serving.enable("tiny-seg")
        assert [m.ref for m in cli.active()] == ["tiny-seg@1.0.0"]
    finally:
        cli_index.close()
        store.close()


def test_shipped_packages_are_registered_once_and_broken_ones_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shipped = tmp_path / "shipped"
    write_package(shipped / "good", manifest_dict())
    write_package(shipped / "broken", manifest_dict("broken", labels=5), out_channels=2)
    zip_folder(write_package(tmp_path / "zipped", manifest_dict("zipped")), shipped / "zipped.zip")
    (shipped / "README.txt").write_text("not a package")
    settings = make_settings(tmp_path / "data", models=ModelsSettings(shipped_dir=shipped))
    assert shipped_models_dir(settings.models) == shipped
    caplog.set_level(logging.INFO)
    for _ in range(2):
        gateway = Gateway(settings, dimse=False)
        gateway.start()
        try:
            assert [m.ref for m in gateway.registry.list()] == ["tiny-seg@1.0.0", "zipped@1.0.0"]
            assert not any(m.enabled for m in gateway.registry.list()) and gateway.registry.active() == []
        finally:
            gateway.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("broken not registered" in w and "needs 6" in w for w in warnings)
    notice = (
        "shipped demonstration models registered but disabled: tiny-seg, zipped; "
        "enable one with `gateway models enable NAME`"
    )
    notices = [r.getMessage() for r in caplog.records if "registered but" in r.getMessage()]
    assert notices == [notice, notice], "one line at each start"


def shipped_start(settings: Settings) -> list[tuple[str, bool, bool]]:
    """Start and stop a gateway (registering the shipped packages); every version as (ref, enabled, active)."""
    gateway = Gateway(settings, dimse=False)
    gateway.start()
    try:
        return [(m.ref, m.enabled, m.active) for m in gateway.registry.list()]
    finally:
        gateway.stop()


def test_an_operator_enable_survives_restarts_and_a_new_shipped_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shipped = tmp_path / "shipped"
    write_package(shipped / "tiny-seg-1", manifest_dict())
    settings = make_settings(tmp_path / "data", models=ModelsSettings(shipped_dir=shipped))
    assert shipped_start(settings) == [("tiny-seg@1.0.0", False, True)]
    index = RegistryIndex(settings.store)  # the operator, with `gateway models enable tiny-seg`
    try:
        assert Registry(index).enable("tiny-seg").enabled
    finally:
        index.close()
    caplog.set_level(logging.INFO)
    assert shipped_start(settings) == [("tiny-seg@1.0.0", True, True)]
    enabled = [r for r in caplog.records if "demonstration models enabled: tiny-seg;" in r.getMessage()]
    assert len(enabled) == 1 and enabled[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if "registered but disabled" in r.getMessage()]

    write_package(shipped / "tiny-seg-2", manifest_dict(version="2.0.0"))  # a new release ships a new version
    assert shipped_start(settings) == [("tiny-seg@1.0.0", True, False), ("tiny-seg@2.0.0", True, True)]


def test_an_operator_disable_survives_a_new_shipped_version(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    write_package(shipped / "tiny-seg-1", manifest_dict())
    settings = make_settings(tmp_path / "data", models=ModelsSettings(shipped_dir=shipped))
    index = RegistryIndex(settings.store)
    try:
        registry = Registry(index)
        registry.register_shipped(shipped)
        registry.enable("tiny-seg")
        registry.disable("tiny-seg")
        write_package(shipped / "tiny-seg-2", manifest_dict(version="2.0.0"))
        (_, new) = registry.register_shipped(shipped)
        assert new.ref == "tiny-seg@2.0.0" and new.active and not new.enabled
    finally:
        index.close()


def test_an_explicit_registration_is_enabled_and_a_shipped_one_keeps_it(registry: Registry, tmp_path: Path) -> None:
    explicit = registry.register(package(tmp_path))
    assert explicit.enabled, "registering a package on purpose enables it, as before"
    shipped = tmp_path / "shipped"
    write_package(shipped / "1-same", manifest_dict())
    write_package(shipped / "2-newer", manifest_dict(version="2.0.0"))
    same, newer = registry.register_shipped(shipped)  # in the folder's order
    assert same == explicit and newer.enabled and newer.active


def tombstones(index: RegistryIndex) -> list[tuple[str, str, str]]:
    with index.sessions() as session:
        return [(t.name, t.version, t.sha256) for t in session.scalars(select(RemovedModel))]


def test_removing_a_shipped_model_survives_restarts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shipped = tmp_path / "shipped"
    write_package(shipped / "tiny-seg", manifest_dict())
    write_package(shipped / "other", manifest_dict("other"))
    settings = make_settings(tmp_path / "data", models=ModelsSettings(shipped_dir=shipped))
    assert [ref for ref, _, _ in shipped_start(settings)] == ["other@1.0.0", "tiny-seg@1.0.0"]
    index = RegistryIndex(settings.store)  # `gateway models remove tiny-seg@1.0.0`
    try:
        removed = Registry(index).remove("tiny-seg@1.0.0")
        assert tombstones(index) == [("tiny-seg", "1.0.0", removed.sha256)]
    finally:
        index.close()
    caplog.set_level(logging.INFO)
    for _ in range(2):
        assert [ref for ref, _, _ in shipped_start(settings)] == ["other@1.0.0"]
    skipped = [r.getMessage() for r in caplog.records if "the operator removed it" in r.getMessage()]
    assert len(skipped) == 2 and all(m.startswith("shipped model tiny-seg@1.0.0 not registered") for m in skipped)
    assert not (tmp_path / "data" / "models" / "tiny-seg").exists(), "no dry run, no package left behind"


def test_an_explicit_registration_clears_the_removal(registry: Registry, index: RegistryIndex, tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    zip_folder(write_package(tmp_path / "zipped", manifest_dict()), shipped / "tiny-seg.zip")
    (model,) = registry.register_shipped(shipped)
    registry.remove(model.ref)
    assert registry.register_shipped(shipped) == [] and registry.list() == []
    again = registry.register(shipped / "tiny-seg.zip")
    assert again.ref == "tiny-seg@1.0.0" and again.enabled and tombstones(index) == []
    assert registry.register_shipped(shipped) == [again]
    registry.remove(again.ref)
    registry.remove(registry.register(shipped / "tiny-seg.zip").ref)  # removed twice: one tombstone
    assert [t[:2] for t in tombstones(index)] == [("tiny-seg", "1.0.0")]
    assert registry.register_shipped(shipped) == []


def test_shipped_packages_can_be_turned_off(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    write_package(shipped / "good", manifest_dict())
    settings = make_settings(tmp_path / "data", models=ModelsSettings(shipped_dir=shipped, register_shipped=False))
    gateway = Gateway(settings, dimse=False)
    gateway.start()
    try:
        assert gateway.registry.list() == []
    finally:
        gateway.stop()


def test_the_default_shipped_folder_is_the_repositorys() -> None:
    assert shipped_models_dir(ModelsSettings()) == Path(__file__).resolve().parents[2] / "models"
