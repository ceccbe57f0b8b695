"""The ``gateway`` command: argument parsing only; each command calls one function of a stage.

The jobs, studies and series commands are in :mod:`gateway.cli_jobs`; what every command shares (settings, the data
folder, errors, exit statuses) in :mod:`gateway.cli_common`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli_common import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_NOT_STARTED,
    ConfigOpt,
    DataDirOpt,
    DataFolder,
    fail,
    load_settings,
    run_then_exit_at_once,
)
from gateway.cli_jobs import jobs_app, series_app, studies_app

if TYPE_CHECKING:  # the settings (pydantic-settings) load with the commands that read them, not with `gateway volume`
    from gateway.config import Settings
    from gateway.registry.registry import RegisteredModel, Registry

app = typer.Typer(
    help="DICOM AI inference gateway.", epilog=EXIT_CODES_HELP, no_args_is_help=True, add_completion=False
)
synth_app = typer.Typer(help="Synthetic data for demos, tests and benchmarks.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")
models_app = typer.Typer(help="Model packages: register, list, show, enable, disable, remove.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")
app.add_typer(studies_app, name="studies")
app.add_typer(series_app, name="series")

_fail = fail


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Alembic's INFO lines on every start ("Context impl SQLiteImpl.") say nothing to an operator; the gateway logs
    # its own line when the index schema changes.
    logging.getLogger("alembic").setLevel(max(logging.getLogger().level, logging.WARNING))


@app.command()
def serve(
    config: ConfigOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where instances and the index live.")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM listener port (default 11112).")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port (default 8080).")] = None,
    ae_title: Annotated[str | None, typer.Option(help="The gateway's AE title (default GATEWAY).")] = None,
    role: Annotated[
        str | None,
        typer.Option(
            help="What this process runs, among processes sharing one index: all (default), or a comma-separated "
            "list of ingest (DICOM listener, DICOMweb, API, UI, completion), worker (assembly, inference, "
            "encoding) and export (sending results)."
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Where this process runs models: auto, cpu, cuda or cuda:N (models.device).")
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(help="Worker: the comma-separated model names this process runs (default: every model)."),
    ] = None,
) -> None:
    """Run the gateway: DICOM listener, DICOMweb and the JSON API, job workers and export (or some: --role)."""
    import uvicorn

    from gateway.admin_token import ensure_admin_token
    from gateway.api.app import create_app
    from gateway.api.limits import server_config
    from gateway.errors import ConfigError

    overrides: dict[str, dict[str, Any]] = {"dicom": {}, "http": {}, "cluster": {}, "models": {}}
    if dicom_port is not None:
        overrides["dicom"]["port"] = dicom_port
    if ae_title is not None:
        overrides["dicom"]["ae_title"] = ae_title
    if http_port is not None:
        overrides["http"]["port"] = http_port
    if role is not None:
        overrides["cluster"]["roles"] = _roles(role)
    if models is not None:
        overrides["cluster"]["models"] = [name.strip() for name in models.split(",") if name.strip()]
    if device is not None:
        overrides["models"]["device"] = device
    settings = load_settings(config, data_dir, **{k: v for k, v in overrides.items() if v})
    _check_ports_free(settings)
    DataFolder(settings).announce()
    _setup_logging(settings.log_level)
    try:
        app = create_app(settings)
        new_token = ensure_admin_token(settings)
    except ConfigError as exc:
        _fail(str(exc))
    if new_token is not None:
        _announce_admin_token(new_token, settings)
    server = uvicorn.Server(server_config(app, settings.http, log_level=settings.log_level.lower(), access_log=False))
    with suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C is how a foreground server is stopped
        server.run()
    if not server.started:
        raise typer.Exit(EXIT_NOT_STARTED)  # as uvicorn.run: the server did not start (the log says why)


def _roles(text: str) -> list[str]:
    """``--role``'s roles: ``all``, or a comma-separated list of ``ingest``, ``worker`` and ``export``."""
    from gateway.config import ROLES

    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(ROLES)
    unknown = [name for name in names if name not in ROLES]
    if unknown or not names:
        _fail(f"--role takes all, or a comma-separated list of {', '.join(ROLES)}; not {text!r}")
    return names


def _announce_admin_token(token: str, settings: Settings) -> None:
    """Print a data folder's new admin token, once, on stderr (never to the log)."""
    from gateway.admin_token import admin_token_path

    host = settings.http.host if settings.http.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
    url = f"http://{host}:{settings.http.port}/api/models"
    typer.echo(
        f"\nThis data folder's admin token (shown this once; only its hash is kept, in "
        f"{admin_token_path(settings.store.data_dir)}):\n\n    {token}\n\n"
        "Writing (STOW-RS) and managing models and jobs need it, also from this machine; send it as a header:\n"
        f"    curl -H 'Authorization: Bearer {token}' {url}\n"
        "`gateway token --reset-admin --data-dir DIR` replaces it; `gateway token --scope ...` makes tokens for "
        "http.tokens.\n",
        err=True,
    )


def _check_ports_free(settings: Settings) -> None:
    """Fail with a readable message, before anything starts, when a listening port is taken."""
    listeners = [("HTTP", settings.http.host, settings.http.port)]
    if "ingest" in settings.cluster.roles:  # only the ingest role runs the DICOM listener
        listeners.insert(0, ("DICOM", settings.dicom.host, settings.dicom.port))
    for what, host, port in listeners:
        if port == 0:
            continue
        try:
            with socket.create_server((host, port)):
                pass
        except OSError as exc:
            _fail(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}")


@app.command()
def echo(
    address: Annotated[str, typer.Argument(help="AET@HOST:PORT")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "GATEWAY-SCU",
) -> None:
    """Send a C-ECHO."""
    from gateway.export.scu import echo as do_echo

    peer = _peer(address)
    try:
        status = do_echo(peer, calling_ae)
    except (ConnectionError, OSError) as exc:
        _fail(str(exc), 1)
    if status != 0:
        _fail(f"C-ECHO answered status 0x{status:04X}", 1)
    typer.echo(f"C-ECHO to {peer.ae_title}@{peer.host}:{peer.port}: success")


def _peer(address: str) -> Any:
    from gateway.export.scu import Peer

    try:
        return Peer.parse(address)
    except ValueError as exc:
        _fail(str(exc))


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to send.")],
    to: Annotated[str, typer.Option("--to", help="Destination AET@HOST:PORT.")],
    associations: Annotated[int, typer.Option(min=1, max=64, help="Concurrent associations.")] = 4,
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "GATEWAY-SCU",
) -> None:
    """C-STORE files and folders to a DICOM node, as stored (no transcoding)."""
    from tqdm import tqdm

    from gateway.export.scu import SendReport, scan
    from gateway.export.scu import send as do_send
    from gateway.process import library_settings

    peer = _peer(address=to)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        _fail(f"no such file or folder: {', '.join(missing)}")
    report = SendReport()
    files = scan(paths, report)
    with library_settings(), tqdm(total=len(files), unit="file", disable=None) as bar:
        do_send(
            files,
            peer,
            associations=associations,
            calling_ae=calling_ae,
            on_progress=bar.update,
            report=report,
        )
    for path, reason in report.failed[:20]:
        typer.echo(f"failed: {path}: {reason}", err=True)
    typer.echo(f"{report.sent} sent, {len(report.failed)} failed, {len(report.skipped)} skipped (not DICOM)")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def token(
    name: Annotated[str, typer.Option(help="A name for the token's holder.")] = "client",
    scope: Annotated[list[str], typer.Option(help="read, write or admin; repeatable.")] = ["read"],  # noqa: B006
    reset_admin: Annotated[
        bool, typer.Option("--reset-admin", help="Replace the data folder's admin token and print the new one.")
    ] = False,
    config: ConfigOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="The data folder (with --reset-admin).")] = None,
) -> None:
    """Make a new bearer token and print the config entry that holds its hash (or, with --reset-admin, replace the
    data folder's admin token)."""
    if reset_admin:
        _reset_admin_token(config, data_dir)
        return
    from gateway.config import hash_token

    bad = [s for s in scope if s not in ("read", "write", "admin")]
    if bad:
        _fail(f"unknown scope(s): {', '.join(bad)}")
    value = secrets.token_urlsafe(32)
    typer.echo(f"token (give it to the client; it is not stored): {value}")
    typer.echo("config entry (http.tokens):")
    typer.echo(f"  - name: {name}\n    sha256: {hash_token(value)}\n    scopes: [{', '.join(scope)}]")


def _reset_admin_token(config: Path | None, data_dir: Path | None) -> None:
    from gateway.admin_token import admin_token_path, reset_admin_token

    settings = load_settings(config, data_dir)
    DataFolder(settings).announce()
    try:
        value = reset_admin_token(settings.store.data_dir)
    except OSError as exc:
        _fail(f"cannot write {admin_token_path(settings.store.data_dir)}: {exc.strerror or exc}", 1)
    typer.echo(f"admin token (shown this once; the previous one no longer works): {value}")
    typer.echo(
        f"its hash is in {admin_token_path(settings.store.data_dir)}; a running gateway takes it at the next request",
        err=True,
    )


@app.command()
def volume(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files and folders (searched recursively).")],
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="Where the NIfTI files and sidecars go.")],
) -> None:
    """Assemble series into volumes and write NIfTI (RAS+, like dcm2niix) with JSON sidecars."""
    # No BLAS work here: OpenBLAS need not start a thread per core when numpy loads (~40 ms on 2 cores).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from gateway.assemble.convert import convert

    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        _fail(f"no such file or folder: {', '.join(missing)}")
    report = convert(inputs, outdir)
    for item in report.written:
        v = item.volume
        shape = "x".join(str(n) for n in v.array.shape)
        spacing = "x".join(f"{s:.3g}" for s in v.spacing)
        flags = ", ".join(f.code + (" (resampled)" if f.resampled else "") for f in v.qc) or "-"
        typer.echo(
            f"{item.series_label:<32} {v.modality or '?':<4} {shape:<16} {spacing:<16} {flags}  -> {item.image.name}"
        )
    for label, refusal in report.refused:
        typer.echo(f"refused: {label}: {refusal.reason}", err=True)
    typer.echo(
        f"{len(report.written)} volume(s) written, {len(report.refused)} refused, "
        f"{len(report.skipped)} non-DICOM file(s) skipped"
    )
    if report.refused or not report.written:
        raise typer.Exit(1)


@synth_app.command("ct")
def synth_ct(
    outdir: Annotated[Path, typer.Argument(help="Folder to write the series into.")],
    slices: Annotated[int, typer.Option(min=1, max=2000, help="Number of slices.")] = 100,
    size: Annotated[int, typer.Option(min=32, max=1024, help="Rows and columns.")] = 512,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same series).")] = 0,
) -> None:
    """Write a synthetic thorax CT series (one file per slice)."""
    from gateway.synth.ct import write_synthetic_ct

    ct = write_synthetic_ct(outdir, slices, rows=size, columns=size, seed=seed)
    typer.echo(f"wrote {len(ct.sop_instance_uids)} slices to {outdir} ({len(ct.nodules)} nodules)")


def _data_settings(config: Path | None, data_dir: Path | None) -> Settings:
    return load_settings(config, data_dir)


def _register_shipped(registry: Registry, settings: Settings) -> list[RegisteredModel]:
    """Register the shipped packages (disabled) when ``models.register_shipped`` says so; those registered."""
    from gateway.registry.registry import shipped_models_dir

    if not settings.models.register_shipped:
        return []
    return registry.register_shipped(shipped_models_dir(settings.models))


@contextmanager
def _registry(
    config: Path | None, data_dir: Path | None, *, shipped: bool = False, folder: DataFolder | None = None
) -> Iterator[Registry]:
    """The registry over the configured index; model errors become one ``error:`` line that names the data folder
    (exit 1 or 2), or the folder is named on stderr once the commands' work is done.

    With ``shipped``, the shipped packages are registered first (disabled, as ``gateway serve`` does), so that an
    operator can list and enable them before the first start.
    """
    from gateway.audit.trail import AuditTrail
    from gateway.errors import ModelConflict, ModelError, NotFound
    from gateway.registry.registry import Registry, RegistryIndex
    from gateway.store.notify import MODELS, make_notifier

    settings = folder.settings if folder is not None else _data_settings(config, data_dir)
    folder = folder or DataFolder(settings)
    index = RegistryIndex(settings.store)
    audit = AuditTrail.from_settings(settings.audit, settings.store.data_dir)  # a change is recorded, as the API's
    try:
        registry = Registry.from_settings(index, settings.models)
        registry.audit = audit
        # Running gateways on the same PostgreSQL index hear of a change at once (LISTEN/NOTIFY); on SQLite there is
        # no one to tell: they read the registry at each job.
        notifier = make_notifier(index.write_engine, enabled=settings.cluster.notify)
        registry.on_change = lambda: notifier.publish(MODELS)
        if shipped:
            _register_shipped(registry, settings)
        yield registry
    except NotFound as exc:
        folder.not_found(str(exc))
    except ModelConflict as exc:
        folder.fail(str(exc), EXIT_FAILED)
    except ModelError as exc:
        folder.fail(str(exc), 2)
    else:
        folder.announce()
    finally:
        index.close()
        audit.close()


def _operator() -> str:
    """Who changes the registry from the command line, for the audit trail: the account running it."""
    import getpass

    try:
        return f"operator {getpass.getuser()} (gateway CLI)"
    except (KeyError, OSError):  # no name for the uid (a container's arbitrary user)
        return f"operator uid {os.getuid()} (gateway CLI)"


@models_app.command("register")
def models_register(
    path: Annotated[
        Path,
        typer.Argument(
            help="A package folder (model.yaml and weights, or a MONAI bundle as it comes: configs/metadata.json, "
            "perhaps with an override model.yaml), or a .zip / .tar.gz archive of one."
        ),
    ],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    trust_code: Annotated[
        bool,
        typer.Option(
            "--trust-code",
            help="Allow a package whose manifest says trust_code: true: its MONAI bundle's code will run in the "
            "gateway. Required for such a package; without it the package is refused.",
        ),
    ] = False,
) -> None:
    """Register a model package (validated, hashed and dry-run first); exit 2 if it is refused, 1 on a conflict."""
    import getpass

    if not path.exists():
        _fail(f"no such file or folder: {path}")
    allowed_by = None
    if trust_code:
        try:
            allowed_by = f"operator {getpass.getuser()!r} (gateway models register --trust-code)"
        except (OSError, KeyError):  # no user name for this uid
            allowed_by = "operator (gateway models register --trust-code)"
    with _registry(config, data_dir) as registry:
        model = registry.register(path, code_allowed_by=allowed_by, by=_operator())
    state = "active" if model.active else "registered (another version is active)"
    if not model.enabled:
        state += f", disabled (`gateway models enable {model.name}` to use it)"
    report = model.dry_run
    shapes = f"{report.get('input_shape')} -> {report.get('output_shape')}"
    dry_run = f"dry run on {report.get('device')}: {shapes} in {report.get('seconds')} s" if report else "no dry run"
    typer.echo(f"{model.ref}: {state}, sha256 {model.sha256[:12]}, {dry_run}")


@models_app.command("list")
def models_list(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """List every registered version (the shipped examples are registered, disabled, first)."""
    with _registry(config, data_dir, shipped=True) as registry:
        models = registry.list()
    typer.echo(f"{'NAME':<24} {'VERSION':<12} {'ACTIVE':<7} {'ENABLED':<8} {'BACKEND':<13} SHA256")
    for m in models:
        active, enabled = "yes" if m.active else "-", "yes" if m.enabled else "no"
        typer.echo(f"{m.name:<24} {m.version:<12} {active:<7} {enabled:<8} {m.manifest.backend:<13} {m.sha256[:12]}")


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME (its active version) or NAME@VERSION.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Show a version: manifest, weights digest, dry-run report (JSON)."""
    import json

    with _registry(config, data_dir, shipped=True) as registry:
        model = registry.get(ref)
    typer.echo(json.dumps({**model.as_dict(), "folder": str(model.folder)}, indent=2))


@models_app.command("enable")
def models_enable(
    ref: Annotated[str, typer.Argument(help="NAME, or NAME@VERSION to also make that version the active one.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Enable a model (and choose its active version); the shipped examples can be enabled before the first serve."""
    with _registry(config, data_dir, shipped=True) as registry:
        model = registry.enable(ref, by=_operator())
    typer.echo(f"{model.ref}: enabled, active")


@models_app.command("disable")
def models_disable(
    name: Annotated[str, typer.Argument(help="The model's NAME.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Disable a model: its versions stay registered, routing no longer sees it."""
    with _registry(config, data_dir, shipped=True) as registry:
        registry.disable(name, by=_operator())
    typer.echo(f"{name}: disabled")


@models_app.command("remove")
def models_remove(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Remove a version and its package (if it was active, the newest remaining version becomes active)."""
    with _registry(config, data_dir) as registry:
        model = registry.remove(ref, by=_operator())
    typer.echo(f"{model.ref}: removed")


def _readings(values: Mapping[str, float], units: Mapping[str, str]) -> str:
    """``volume 3.34 ml, long axis 21.3 mm, mean -12.3 [hnsf'U]``: each value rounded as a radiologist writes it."""
    from gateway.infer.measure import for_reading

    return ", ".join(
        f"{name.replace('_', ' ')} {for_reading(name, value)} {units.get(name, '')}".rstrip()
        for name, value in values.items()
    )


@app.command()
def run(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files and folders (searched recursively).")],
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="Where results go.")],
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="NAME or NAME@VERSION (repeatable; enabled or not); default: every enabled one, or the shipped "
            "examples when none is.",
        ),
    ] = None,
    write_volumes: Annotated[bool, typer.Option(help="Also write each source volume as NIfTI.")] = False,
    dicom: Annotated[
        bool, typer.Option(help="Write the DICOM outputs too (SEG, SR, outlines, key images; Parametric Maps).")
    ] = True,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default: the config's).")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Assemble, route, infer and encode on files, no network: NIfTI label maps / maps, JSON measurements, and the
    DICOM outputs (SEG + TID 1500 SR, Parametric Maps) the gateway would send."""
    from gateway.infer.lesions import lesion_name
    from gateway.infer.runtime import InferenceRuntime
    from gateway.offline import run_files

    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        _fail(f"no such file or folder: {', '.join(missing)}")
    settings = _data_settings(config, data_dir)
    folder = DataFolder(settings)
    with _registry(config, data_dir, folder=folder) as registry:
        models = _models_to_run(registry, model or [], _register_shipped(registry, settings), folder)
        runtime = InferenceRuntime(device or settings.models.device, batching=settings.models.batching)
        try:
            report = run_files(inputs, outdir, models, runtime, write_volumes=write_volumes, write_dicom=dicom)
        finally:
            runtime.close()
    for series in report.series:
        for refusal in series.refused:
            typer.echo(f"{series.label}: refused: {refusal.reason}", err=True)
        if series.outcome is None:
            continue
        for decision in series.outcome.decisions:
            typer.echo(
                f"{series.label:<32} {decision.model:<28} {'run' if decision.run else 'not run: ' + decision.reason}"
            )
        for failure in series.outcome.failures:
            typer.echo(f"{series.label:<32} {failure.model:<28} FAILED: {failure.reason}", err=True)
        for result in series.outcome.results:
            for m in result.measurements:
                typer.echo(f"{'':<32} {m.name:<28} {_readings(m.values, m.units)}")
            for found in result.lesions.values():
                for lesion in found.lesions:
                    name = lesion_name(found.name, lesion.number)
                    typer.echo(f"{'':<32} {name:<28} {_readings(lesion.values, lesion.units)}")
    typer.echo(
        f"{len(report.series)} series, {report.results} model result(s) written to {outdir}, "
        f"{len(report.skipped)} non-DICOM file(s) skipped"
    )
    if report.failed or not report.results:
        raise typer.Exit(1)


def _models_to_run(
    registry: Registry, refs: list[str], shipped: list[RegisteredModel], folder: DataFolder
) -> list[RegisteredModel]:
    """What ``gateway run`` runs: the models named (enabled or not), else the enabled ones, else the shipped examples
    (said on stderr; nothing is enabled in the data folder). The data folder is named once they are known."""
    chosen = [registry.get(ref) for ref in refs] or registry.active()
    if not chosen and not shipped:
        folder.fail(
            "no model to run: enable one with `gateway models enable NAME`, register one with "
            "`gateway models register PATH`, or name one with --model"
        )
    folder.announce()
    if chosen:
        return chosen
    examples = ", ".join(m.ref for m in shipped)
    typer.echo(
        f"no model enabled: running the shipped examples (demonstrations trained or built on phantoms): {examples}",
        err=True,
    )
    return shipped


@app.command()
def purge(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what a purge would free; change nothing.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Apply retention once (as `gateway serve` does in the background): received instances, outputs, and the
    disk watermarks; finishes a purge a crash interrupted. Safe beside a running gateway."""
    from gateway.audit.trail import AuditTrail
    from gateway.registry.registry import RegistryIndex
    from gateway.store.retention import Retention

    settings = _data_settings(config, data_dir)
    folder = DataFolder(settings)
    folder.require_index()
    folder.announce()
    index = RegistryIndex(settings.store)  # the index alone: a running gateway's temporary files are left alone
    audit = AuditTrail.from_settings(settings.audit, settings.store.data_dir)  # each study purged: Study Deleted
    try:
        retention = Retention(index, settings.retention, settings.store.min_free_bytes, audit=audit)
        report = retention.run(dry_run=dry_run)
    finally:
        index.close()
        audit.close()
    if report.disk is not None:
        disk = report.disk
        typer.echo(
            f"disk: {100 * disk.used_fraction:.1f}% used, {disk.free_bytes} bytes free (purge above "
            f"{100 * disk.high_watermark:g}% down to {100 * disk.low_watermark:g}%)"
        )
    typer.echo(report.summary())
    if report.starved:
        typer.echo("the disk is above the watermark and nothing more may be purged", err=True)


def main() -> None:
    """Console-script entry point."""
    if sys.argv[1:2] == ["volume"]:  # it leaves nothing running and closes what it writes: skip the teardown
        run_then_exit_at_once(app)
    app()
