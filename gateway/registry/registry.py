"""The model registry: packages registered with a dry run, kept side by side by version, one active per model.

A registered package lives at ``<data_dir>/models/<name>/<version>/``. It is staged in ``models/.staging`` (copied
from a folder or safely extracted from an archive), hashed, dry-run, flushed to disk and renamed into place, and only
then recorded in the index (:class:`gateway.store.index.ModelVersion`): a package is never seen half-written, and a
refused one leaves nothing behind. The index is the one source of truth and is read on every call, so a model
registered by ``gateway models register`` while the gateway runs serves its next job.

Versions: the newest registered version of a model becomes its active one, unless a version was chosen with
:meth:`Registry.enable` (it stays active until another is chosen or it is removed). ``enabled`` belongs to the
model: a disabled model keeps its versions but routing does not see it.

Shipped packages (the demonstration models in ``models/``, :meth:`Registry.register_shipped`) are registered
*disabled*: nothing speaks to a PACS until an operator enables it. A new version of a model keeps the model's
``enabled``, so a shipped model the operator enabled stays enabled across restarts and new shipped versions. A
removed version leaves a tombstone (:class:`gateway.store.index.RemovedModel`) that keeps the shipped package from
coming back at the next start; registering the package explicitly clears it.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

import gateway
from gateway.audit.trail import AuditTrail
from gateway.config import ModelsSettings, StoreSettings
from gateway.errors import GatewayError, ModelConflict, ModelError, NotFound
from gateway.registry.archive import extract_archive, is_archive, remove_tree
from gateway.registry.bundle_manifest import is_bundle, package_manifest
from gateway.registry.dryrun import DryRunReport, dry_run_in_child
from gateway.registry.manifest import MANIFEST_NAME, Manifest
from gateway.registry.sandbox import SandboxLimits
from gateway.store.files import fsync_dir
from gateway.store.index import ModelVersion, RemovedModel, make_engine, make_sessionmaker
from gateway.store.store import StoreIndex

__all__ = [
    "DryRun",
    "RegisteredModel",
    "Registry",
    "RegistryIndex",
    "StoreIndex",
    "parse_ref",
    "shipped_models_dir",
    "weights_sha256",
]

log = logging.getLogger(__name__)

#: ``(manifest, package folder) -> report``; raises :class:`ModelError` to refuse the package.
DryRun = Callable[[Manifest, Path], DryRunReport]

_CHUNK = 1 << 20
_STALE_STAGING_S = 3600.0


class _RemovedByOperator(Exception):
    """A shipped package whose ``name@version`` the operator removed: :meth:`Registry.register_shipped` skips it."""


class RegistryIndex:
    """The index alone, for commands that manage models while a gateway may be running (``gateway models``).

    Unlike :class:`~gateway.store.store.InstanceStore` it touches nothing on disk but the index (the store's
    temporary folder holds a running gateway's partial receptions).
    """

    def __init__(self, settings: StoreSettings) -> None:
        self.data_dir = settings.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
        self._engines: tuple[Engine, Engine] = (make_engine(url), make_engine(url, writer=True))
        self.sessions: sessionmaker[Session] = make_sessionmaker(self._engines[0])
        self.write_sessions: sessionmaker[Session] = make_sessionmaker(self._engines[1])

    @property
    def write_engine(self) -> Engine:
        """The engine that writes (and, on PostgreSQL, tells running gateways of a change: NOTIFY)."""
        return self._engines[1]

    def close(self) -> None:
        """Release the index's connections."""
        for engine in self._engines:
            engine.dispose()


@dataclass(frozen=True)
class RegisteredModel:
    """One registered model version.

    ``folder`` is the package in the registry (``model.yaml`` and the weights); ``sha256`` the weights' digest
    (:func:`weights_sha256`); ``active`` whether this is the version routing uses for ``name``; ``enabled``
    whether the model is enabled at all; ``dry_run`` the registration's :meth:`DryRunReport.as_dict` (empty when
    the registry ran none; with ``code_allowed_by``, who allowed its code, for a ``trust_code`` package);
    ``changed_at`` when the version was registered or its model last enabled (the inference runtime does not
    retry a failed load until it changes).
    """

    name: str
    version: str
    sha256: str
    folder: Path
    manifest: Manifest
    enabled: bool
    active: bool
    registered_at: float
    dry_run: dict[str, Any] = field(default_factory=dict)
    changed_at: float = 0.0

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def summary(self) -> dict[str, Any]:
        """The version as a list shows it (no manifest)."""
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "backend": self.manifest.backend,
            "description": self.manifest.description,
            "sha256": self.sha256,
            "enabled": self.enabled,
            "active": self.active,
            "registered_at": self.registered_at,
        }

    def as_dict(self) -> dict[str, Any]:
        """The version with its manifest and dry-run report, as JSON-ready data."""
        return {**self.summary(), "dry_run": self.dry_run, "manifest": self.manifest.model_dump(mode="json")}


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name`` or ``name@version`` into the name and the version (``None`` when not given).

    Raises
    ------
    ModelError
        If either part is empty.
    """
    name, at, version = ref.strip().partition("@")
    if not name or (at and not version):
        raise ModelError(f"not a model reference: {ref!r} (expected NAME or NAME@VERSION)")
    return name, version or None


def shipped_models_dir(settings: ModelsSettings) -> Path:
    """Where the shipped model packages are: ``settings.shipped_dir``, else the source tree's ``models/`` folder."""
    return settings.shipped_dir or Path(gateway.__file__).resolve().parent.parent / "models"


def _hash_file(path: Path, digest: Any) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)


def weights_sha256(folder: Path, manifest: Manifest) -> str:
    """The SHA-256 of a package's weights, in hex.

    For a weights file, the digest of its bytes. For a bundle folder, one digest over every file in it, in sorted
    order of their relative paths, each fed as its path (UTF-8), a NUL byte, and its bytes: renaming a file changes
    the digest too. A bare bundle's package folder is its bundle (``weights: "."``): an override ``model.yaml`` in
    it is the manifest, not weights, and is left out.

    Raises
    ------
    ModelError
        If the weights are missing, are a link, or are an empty folder.
    """
    path = folder / manifest.weights
    if path.is_symlink() or not path.exists():
        raise ModelError(f"{manifest.ref}: weights {manifest.weights!r} not found in the package (or a link)")
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
        return digest.hexdigest()
    manifest_file = folder / MANIFEST_NAME
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p != manifest_file),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise ModelError(f"{manifest.ref}: weights folder {manifest.weights!r} holds no files")
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\x00")
        _hash_file(file, digest)
    return digest.hexdigest()


def _check_plain(folder: Path, label: str) -> None:
    """Refuse a package holding links or special files (they could point anywhere)."""
    for path in folder.rglob("*"):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ModelError(f"{label}: {path.relative_to(folder)} is a link or special file, not a plain file")


def _flush_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (before it is renamed into place)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            fsync_dir(path)
    fsync_dir(folder)


def _record(row: ModelVersion, root: Path) -> RegisteredModel:
    return RegisteredModel(
        name=row.name,
        version=row.version,
        sha256=row.sha256,
        folder=root / row.name / row.version,
        manifest=Manifest.model_validate(row.manifest),
        enabled=bool(row.enabled),
        active=bool(row.active),
        registered_at=row.registered_at,
        dry_run=dict(row.dry_run or {}),
        changed_at=row.changed_at if row.changed_at is not None else row.registered_at,
    )


def _same_or_conflict(row: ModelVersion, manifest: Manifest, sha256: str) -> None:
    """Raise :class:`ModelConflict` unless ``row`` holds the same weights and manifest."""
    if row.sha256 != sha256:
        raise ModelConflict(
            f"{manifest.ref} is already registered with other weights (sha256 {row.sha256[:12]}..., this package "
            f"{sha256[:12]}...); give the new weights a new version"
        )
    if Manifest.model_validate(row.manifest) != manifest:
        raise ModelConflict(
            f"{manifest.ref} is already registered with the same weights but another model.yaml; "
            "give the changed manifest a new version"
        )


#: PostgreSQL advisory lock key held by a registration's transaction (gateway.store.migrations uses another).
_REGISTRATION_LOCK = 0x6761_7465_0002


def _serialise_registrations(session: Session) -> None:
    """Hold the index's registration lock until ``session``'s transaction ends: two processes registering at once
    (the shipped models at start, an upload) take turns, so one never moves the other's package folder away.
    SQLite's write transaction (``BEGIN IMMEDIATE``) already serialises them."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _REGISTRATION_LOCK})


class Registry:
    """Registered model packages, their versions and which of them routing sees.

    Parameters
    ----------
    store
        The instance store (or a :class:`RegistryIndex`): the data folder and the index.
    dry_run
        Run on every new package before it is recorded (default:
        :func:`gateway.registry.dryrun.dry_run_in_child` on the CPU, in a child process with the default
        :class:`~gateway.registry.sandbox.SandboxLimits`); ``None`` registers without one.
    max_archive_bytes
        The largest archive accepted, and the most its content may expand to.
    """

    def __init__(
        self, store: StoreIndex, dry_run: DryRun | None = dry_run_in_child, *, max_archive_bytes: int = 1 << 30
    ) -> None:
        self._store = store
        self._dry_run = dry_run
        self.max_archive_bytes = max_archive_bytes
        self.root = store.data_dir / "models"
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self._clear_stale_staging()
        #: Called after each committed change (a version registered, enabled, disabled or removed): the running
        #: gateway tells its processes (:meth:`gateway.runtime.Gateway.models_changed`). A failure is logged.
        self.on_change: Callable[[], None] | None = None
        #: The audit trail: a Security Alert (Software Configuration) for each version registered, enabled,
        #: disabled or removed through :meth:`register`, :meth:`enable`, :meth:`disable`, :meth:`remove`.
        self.audit: AuditTrail = AuditTrail.disabled()

    def _changed(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:
            log.exception("telling the other processes of a model change failed; they see it at their next job")

    @classmethod
    def from_settings(cls, store: StoreIndex, settings: ModelsSettings) -> Registry:
        """The registry as ``settings`` configure it: the archive limit, and the dry run's time and memory limits."""
        limits = SandboxLimits.from_settings(settings)
        dry_run = functools.partial(dry_run_in_child, limits=limits)
        return cls(store, dry_run, max_archive_bytes=settings.max_upload_bytes)

    # --- registration ---------------------------------------------------------------------------------------

    def register(self, path: Path, *, code_allowed_by: str | None = None, by: str | None = None) -> RegisteredModel:
        """Register the package in a folder or archive (``.zip``, ``.tar.gz``, ``.tgz``).

        A package is a folder with ``model.yaml`` and the weights it names, or a MONAI model-zoo bundle as it comes
        (``configs/metadata.json``, perhaps with an override ``model.yaml``): its manifest is then synthesised
        (:func:`gateway.registry.bundle_manifest.package_manifest`).

        A package whose manifest says ``trust_code: true`` (a MONAI bundle whose code is to run) is registered
        only with ``code_allowed_by``: who allows it, recorded with the version (``dry_run["code_allowed_by"]``).
        Only an admin may: the HTTP route passes it for an admin token, ``gateway models register --trust-code``
        for the operator. Without it such a package is refused before anything of it runs. ``by`` (a token's
        name, an operator) is who registered it, for the audit trail.

        Returns the version already registered when it has the same weights and manifest (registering is
        idempotent). A new model is enabled; a new version keeps its model's ``enabled``. Registering a version
        that was removed clears the record of its removal (:meth:`remove`).

        Raises
        ------
        ManifestError
            If ``model.yaml`` is missing (and the folder is no MONAI bundle), not YAML or breaks the schema, or a
            bare bundle's manifest cannot be synthesised (the message names each key or field).
        ModelConflict
            If ``name@version`` is already registered with other weights or another manifest.
        ModelError
            If the path is neither, the archive is unsafe or too large, the weights are missing, the package asks
            for ``trust_code`` without ``code_allowed_by``, or the dry run fails (the message says why).
        """
        record = self._register(Path(path), shipped=False, code_allowed_by=code_allowed_by)
        self.audit.model_changed(by, record.ref, "registered")
        return record

    def register_shipped(self, folder: Path) -> builtins.list[RegisteredModel]:
        """Register each package (subfolder or archive) of ``folder`` *disabled*; registered ones are left as they are.

        A new version of a model already registered keeps the model's ``enabled`` (an operator's choice stands); a
        ``name@version`` the operator removed is not registered again. A package that cannot be registered is
        logged and skipped; a missing ``folder`` registers nothing.

        Returns
        -------
        list[RegisteredModel]
            The shipped versions now registered (new or not), in the folder's order.
        """
        if not folder.is_dir():
            return []
        registered = []
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or not (
                (entry / MANIFEST_NAME).is_file() or is_bundle(entry) or is_archive(entry)
            ):
                continue
            try:
                registered.append(self._register(entry, shipped=True))
            except _RemovedByOperator as removed:
                log.info("shipped model %s not registered: the operator removed it (register it to restore)", removed)
            except (GatewayError, OSError) as exc:
                log.warning("shipped model package %s not registered: %s", entry.name, exc)
        return registered

    def _register(self, path: Path, *, shipped: bool, code_allowed_by: str | None = None) -> RegisteredModel:
        if path.is_dir():
            return self._register_folder(path, shipped, code_allowed_by)
        if path.is_file() and is_archive(path):
            return self._register_archive(path, shipped, code_allowed_by)
        raise ModelError(f"{path}: not a model package folder or archive (.zip, .tar.gz, .tgz)")

    def _register_folder(self, source: Path, shipped: bool, code_allowed_by: str | None) -> RegisteredModel:
        source = source.resolve()  # a bare bundle is named after its folder, even when given as "."
        manifest = package_manifest(source)
        _check_plain(source, str(source))
        existing = self._existing(manifest, source, shipped)
        if existing is not None:
            return existing
        staging = self._new_staging()
        try:
            shutil.copytree(source, staging / "package", symlinks=True)
            return self._install(staging / "package", manifest, shipped, code_allowed_by)
        finally:
            remove_tree(staging)

    def _register_archive(self, archive: Path, shipped: bool, code_allowed_by: str | None) -> RegisteredModel:
        staging = self._new_staging()
        try:
            root = extract_archive(archive, staging / "package", self.max_archive_bytes)
            # a bare bundle is named after the archive's top folder; at the archive's top its name is unknown
            manifest = package_manifest(root, root.name if root != staging / "package" else "")
            existing = self._existing(manifest, root, shipped)
            return existing or self._install(root, manifest, shipped, code_allowed_by)
        finally:
            remove_tree(staging)

    def _existing(self, manifest: Manifest, folder: Path, shipped: bool) -> RegisteredModel | None:
        """The registered version if ``manifest``'s name@version is registered with these weights; else ``None``.

        Raises :class:`_RemovedByOperator` for a ``shipped`` package the operator removed (before its dry run).
        """
        with self._store.sessions() as session:
            row = self._row(session, manifest.name, manifest.version)
            if row is None:
                if shipped and self._tombstone(session, manifest.name, manifest.version) is not None:
                    raise _RemovedByOperator(manifest.ref)
                return None
            _same_or_conflict(row, manifest, weights_sha256(folder, manifest))
            return _record(row, self.root)

    def _install(
        self, package: Path, manifest: Manifest, shipped: bool, code_allowed_by: str | None
    ) -> RegisteredModel:
        """Hash and dry-run the staged ``package``, then move it into place and record it.

        Under the index's write lock: a ``shipped`` package the operator removed meanwhile is not recorded; an
        explicit registration clears the version's tombstone.
        """
        if manifest.trust_code and not code_allowed_by:
            raise ModelError(
                f"{manifest.ref}: the manifest says trust_code: true (the bundle's code would run in the gateway); "
                "only an admin may register it: an admin token over HTTP, or `gateway models register --trust-code`"
            )
        _check_plain(package, manifest.ref)
        sha256 = weights_sha256(package, manifest)
        report = {} if self._dry_run is None else self._dry_run(manifest, package).as_dict()
        if manifest.trust_code:
            report["code_allowed_by"] = code_allowed_by
        _flush_tree(package)
        dest = self.root / manifest.name / manifest.version
        moved = False
        try:
            with self._store.write_sessions.begin() as session:
                _serialise_registrations(session)
                row = self._row(session, manifest.name, manifest.version)
                if row is not None:  # registered meanwhile by another process
                    _same_or_conflict(row, manifest, sha256)
                    return _record(row, self.root)
                tombstone = self._tombstone(session, manifest.name, manifest.version)
                if tombstone is not None:
                    if shipped:
                        raise _RemovedByOperator(manifest.ref)
                    session.delete(tombstone)
                self._move_into_place(package, dest)
                moved = True
                row = self._add(session, manifest, sha256, report, enabled_if_new=not shipped)
                record = _record(row, self.root)
        except BaseException:
            if moved:
                self._discard(dest)
            raise
        state = "enabled" if record.enabled else "disabled"
        log.info("registered model %s (sha256 %s, %s)", record.ref, sha256[:12], state)
        self._changed()
        return record

    def _add(
        self, session: Session, manifest: Manifest, sha256: str, report: dict[str, Any], *, enabled_if_new: bool
    ) -> ModelVersion:
        """Record a new version: it keeps the model's ``enabled`` (``enabled_if_new`` for a new model)."""
        rows = self._rows(session, manifest.name)
        pinned = any(r.active and r.pinned for r in rows)
        if not pinned:
            for r in rows:
                r.active = False
        now = time.time()
        row = ModelVersion(
            name=manifest.name,
            version=manifest.version,
            sha256=sha256,
            enabled=rows[0].enabled if rows else enabled_if_new,
            active=not pinned,
            pinned=False,
            registered_at=now,
            changed_at=now,
            manifest=manifest.model_dump(mode="json"),
            dry_run=report,
        )
        session.add(row)
        session.flush()
        return row

    def _move_into_place(self, package: Path, dest: Path) -> None:
        if dest.exists():  # no index row (checked under the write lock): left by an interrupted registration
            log.warning("replacing the unrecorded package folder left by an interrupted registration")
            self._discard(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        package.rename(dest)
        fsync_dir(dest.parent)

    # --- queries --------------------------------------------------------------------------------------------

    def list(self) -> builtins.list[RegisteredModel]:
        """Every registered version, by name, oldest version first."""
        with self._store.sessions() as session:
            rows = session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.id))
            return [_record(row, self.root) for row in rows]

    def get(self, ref: str) -> RegisteredModel:
        """The version ``name@version``, or the active version of ``name``.

        Raises
        ------
        NotFound
            If there is no such model or version.
        """
        name, version = parse_ref(ref)
        with self._store.sessions() as session:
            return _record(self._find(session, name, version), self.root)

    def versions(self, name: str) -> builtins.list[RegisteredModel]:
        """Every registered version of ``name``, oldest first (empty if there is none)."""
        with self._store.sessions() as session:
            return [_record(row, self.root) for row in self._rows(session, name)]

    def active(self) -> builtins.list[RegisteredModel]:
        """The enabled models, each at its active version: what routing sees. Read from the index on every call."""
        query = select(ModelVersion).where(ModelVersion.active, ModelVersion.enabled).order_by(ModelVersion.name)
        with self._store.sessions() as session:
            return [_record(row, self.root) for row in session.scalars(query)]

    # --- changes --------------------------------------------------------------------------------------------

    def enable(self, ref: str, *, by: str | None = None) -> RegisteredModel:
        """Enable the model; with ``name@version``, also make that version the active one (until another is chosen).

        Every version's ``changed_at`` moves on: a version whose load failed is tried again. ``by`` (a token's
        name, an operator) is who did it, for the audit trail.

        Raises
        ------
        NotFound
            If there is no such model or version.
        """
        name, version = parse_ref(ref)
        with self._store.write_sessions.begin() as session:
            target = self._find(session, name, version)
            now = time.time()
            for row in self._rows(session, name):
                row.enabled, row.changed_at = True, now
                if version is not None:
                    row.active = row.pinned = row.id == target.id
            session.flush()
            record = _record(target, self.root)
        log.info("enabled model %s", record.ref)
        self.audit.model_changed(by, record.ref, "enabled")
        self._changed()
        return record

    def disable(self, name: str, *, by: str | None = None) -> builtins.list[RegisteredModel]:
        """Disable the model ``name`` (all its versions stay registered); return its versions. ``by``: who did it,
        for the audit trail.

        Raises
        ------
        ModelError
            If a version is given (versions are chosen with :meth:`enable`).
        NotFound
            If there is no such model.
        """
        model, version = parse_ref(name)
        if version is not None:
            raise ModelError(f"disable takes a model name, not {name!r}; choose versions with enable")
        with self._store.write_sessions.begin() as session:
            rows = self._rows(session, model)
            if not rows:
                raise NotFound(f"no model {model!r}")
            for row in rows:
                row.enabled = False
            session.flush()
            records = [_record(row, self.root) for row in rows]
        log.info("disabled model %s", model)
        self.audit.model_changed(by, model, "disabled")
        self._changed()
        return records

    def remove(self, ref: str, *, by: str | None = None) -> RegisteredModel:
        """Remove the version ``name@version`` and its package; the newest remaining version becomes active if
        the removed one was. ``by``: who did it, for the audit trail.

        The removal is recorded (a tombstone, in the same transaction): :meth:`register_shipped` does not register
        that version again; :meth:`register` does, and clears the record.

        Raises
        ------
        ModelError
            If no version is given.
        NotFound
            If there is no such version.
        """
        name, version = parse_ref(ref)
        if version is None:
            raise ModelError(f"remove takes NAME@VERSION, not {ref!r}")
        with self._store.write_sessions.begin() as session:
            row = self._find(session, name, version)
            record = _record(row, self.root)
            session.delete(row)
            self._bury(session, record)
            session.flush()
            remaining = self._rows(session, name)
            if record.active and remaining:
                remaining[-1].active, remaining[-1].pinned = True, False
        self._discard(record.folder)
        log.info("removed model %s", record.ref)
        self.audit.model_changed(by, record.ref, "removed")
        self._changed()
        return record

    # --- helpers --------------------------------------------------------------------------------------------

    @staticmethod
    def _row(session: Session, name: str, version: str) -> ModelVersion | None:
        query = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
        return session.scalars(query).first()

    @staticmethod
    def _tombstone(session: Session, name: str, version: str) -> RemovedModel | None:
        return session.get(RemovedModel, (name, version))

    @classmethod
    def _bury(cls, session: Session, record: RegisteredModel) -> None:
        """Record (or refresh) the removal of ``record``'s version."""
        now = time.time()
        tombstone = cls._tombstone(session, record.name, record.version)
        if tombstone is None:
            session.add(RemovedModel(name=record.name, version=record.version, sha256=record.sha256, removed_at=now))
        else:
            tombstone.sha256, tombstone.removed_at = record.sha256, now

    @staticmethod
    def _rows(session: Session, name: str) -> Sequence[ModelVersion]:
        query = select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.id)
        return session.scalars(query).all()

    def _find(self, session: Session, name: str, version: str | None) -> ModelVersion:
        if version is not None:
            row = self._row(session, name, version)
            if row is None:
                raise NotFound(f"no model {name}@{version}")
            return row
        rows = self._rows(session, name)
        if not rows:
            raise NotFound(f"no model {name!r}")
        active = [r for r in rows if r.active]
        return active[0] if active else rows[-1]

    def _new_staging(self) -> Path:
        path = self.staging / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def _discard(self, folder: Path) -> None:
        """Remove a package folder: renamed into staging first, so no half-removed package is ever in place."""
        if not folder.exists():
            return
        trash = self.staging / f"removed-{uuid.uuid4().hex}"
        folder.rename(trash)
        fsync_dir(folder.parent)
        remove_tree(trash)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # the model's folder, once its last version is gone

    def _clear_stale_staging(self) -> None:
        cutoff = time.time() - _STALE_STAGING_S
        for entry in self.staging.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    remove_tree(entry)
