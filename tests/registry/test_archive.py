"""Safe extraction of package archives: unsafe names, links, special files and oversized content are refused."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from gateway.config import StoreSettings
from gateway.errors import ModelError
from gateway.registry.archive import extract_archive
from gateway.registry.registry import Registry, RegistryIndex

from model_packages import manifest_dict, write_package, zip_folder

LIMIT = 1 << 20


def make_zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, members: dict[str, bytes], special: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in special or []:
            tf.addfile(info)
    return path


def package_members(tmp_path: Path) -> dict[str, bytes]:
    src = write_package(tmp_path / "src", manifest_dict())
    return {p.name: p.read_bytes() for p in src.iterdir()}


def only_dest(tmp_path: Path) -> set[str]:
    """What exists in tmp_path besides the inputs: nothing may land outside the extraction folder."""
    return {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("name", ["../evil.txt", "pkg/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt", "a\\..\\b"])
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_unsafe_member_names_are_refused(tmp_path: Path, name: str, kind: str) -> None:
    members = {**package_members(tmp_path), name: b"evil"}
    archive = (make_zip if kind == "zip" else make_tar)(tmp_path / f"a.{kind}", members)
    with pytest.raises(ModelError, match="not allowed"):
        extract_archive(archive, tmp_path / "out", LIMIT)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_zip_links_are_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", package_members(tmp_path), links={"weights.onnx": "/etc/passwd"})
    with pytest.raises(ModelError, match="links and special files are not allowed"):
        extract_archive(archive, tmp_path / "out", LIMIT)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])
def test_tar_links_and_special_files_are_refused(tmp_path: Path, kind: bytes) -> None:
    info = tarfile.TarInfo("model.onnx2")
    info.type = kind
    info.linkname = "/etc/passwd"
    archive = make_tar(tmp_path / "a.tar.gz", package_members(tmp_path), special=[info])
    with pytest.raises(ModelError, match="links and special files are not allowed"):
        extract_archive(archive, tmp_path / "out", LIMIT)


def test_an_archive_over_the_limit_is_refused(tmp_path: Path) -> None:
    members = package_members(tmp_path)
    archive = make_zip(tmp_path / "a.zip", members)
    with pytest.raises(ModelError, match="exceeds the limit of 100 bytes"):
        extract_archive(archive, tmp_path / "out", 100)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_content_expanding_over_the_limit_is_refused(tmp_path: Path, kind: str) -> None:
    members = {**package_members(tmp_path), "padding.bin": bytes(4 * LIMIT)}  # compresses to a few kB
    archive = (make_zip if kind == "zip" else make_tar)(tmp_path / f"a.{kind}", members)
    assert archive.stat().st_size < LIMIT
    with pytest.raises(ModelError, match="archive content exceeds the limit"):
        extract_archive(archive, tmp_path / "out", LIMIT)


def test_a_member_given_twice_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model.yaml", "a")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("model.yaml", "b")
    with pytest.raises(ModelError, match="given twice"):
        extract_archive(archive, tmp_path / "out", LIMIT)


def test_no_manifest_at_the_top_or_in_one_folder(tmp_path: Path) -> None:
    members = package_members(tmp_path)
    archive = make_zip(tmp_path / "a.zip", {f"a/{k}": v for k, v in members.items()} | {"b/x": b"x"})
    with pytest.raises(ModelError, match=r"no model\.yaml at the top of the archive or in its one top-level folder"):
        extract_archive(archive, tmp_path / "out", LIMIT)
    nested = make_zip(tmp_path / "b.zip", {f"a/b/{k}": v for k, v in members.items()})
    with pytest.raises(ModelError, match=r"no model\.yaml"):
        extract_archive(nested, tmp_path / "out2", LIMIT)


def test_not_an_archive(tmp_path: Path) -> None:
    fake = tmp_path / "a.zip"
    fake.write_bytes(b"PK but not really a zip file")
    with pytest.raises(ModelError, match="not a readable archive"):
        extract_archive(fake, tmp_path / "out", LIMIT)
    gz = tmp_path / "a.tgz"
    gz.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ModelError, match="not a readable archive"):
        extract_archive(gz, tmp_path / "out2", LIMIT)
    with pytest.raises(ModelError, match="not a model archive"):
        extract_archive(tmp_path / "a.rar", tmp_path / "out3", LIMIT)


def test_macos_resource_forks_are_ignored(tmp_path: Path) -> None:
    members = package_members(tmp_path)
    archive = make_zip(tmp_path / "a.zip", {f"pkg/{k}": v for k, v in members.items()} | {"__MACOSX/pkg/._x": b"x"})
    root = extract_archive(archive, tmp_path / "out", LIMIT)
    assert root == tmp_path / "out" / "pkg"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pkg"]


def test_the_registry_refuses_an_unsafe_archive_and_leaves_nothing(tmp_path: Path) -> None:
    index = RegistryIndex(StoreSettings(data_dir=tmp_path / "data"))
    try:
        registry = Registry(index, max_archive_bytes=LIMIT)
        archive = make_zip(tmp_path / "a.zip", {**package_members(tmp_path), "../../evil.txt": b"evil"})
        with pytest.raises(ModelError, match=r"'\.\.' is not allowed"):
            registry.register(archive)
        big = zip_folder(write_package(tmp_path / "big", manifest_dict()), tmp_path / "big.zip")
        with pytest.raises(ModelError, match="exceeds the limit"):
            Registry(index, max_archive_bytes=100).register(big)
        assert registry.list() == [] and list(registry.staging.iterdir()) == []
        assert not (tmp_path / "data" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    finally:
        index.close()
