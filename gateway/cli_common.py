"""What every ``gateway`` command shares: settings loading, the data folder it works on, errors and exit codes.

A command that uses a data folder takes it from ``--data-dir``, else ``GATEWAY_DATA_DIR`` (or its long form
``GATEWAY_STORE__DATA_DIR``), else ``store.data_dir`` of the ``--config`` file, else ``./gateway-data``; and it
says which folder it used: ``data folder: /srv/gw`` as its first line on stderr, or in its error (``no job 8 in
/srv/gw``). A command that reads what a gateway stored refuses a folder with no index instead of creating one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:  # pydantic-settings loads with the first command that reads settings (not `gateway volume`)
    from gateway.config import Settings
    from gateway.registry.registry import RegistryIndex

#: Exit statuses of every command (the top-level ``--help`` lists them).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_STARTED = 0, 1, 2, 3

EXIT_CODES_HELP = (
    "Exit status: 0 done; 1 the command failed or found nothing to do (no such job, model or series, a state that "
    "does not allow the change, a failed send); 2 bad usage or input (an unknown option, invalid settings, a missing "
    "file, a folder with no index); 3 the server did not start (serve).\n\n"
    "Data folder: --data-dir, else GATEWAY_DATA_DIR (or GATEWAY_STORE__DATA_DIR), else store.data_dir in --config, "
    "else ./gateway-data. Each command that uses one names it on its first line (stderr) or in its error."
)

#: The short environment variable for the data folder (``GATEWAY_STORE__DATA_DIR`` is the settings' own name).
DATA_DIR_ENV = "GATEWAY_DATA_DIR"
_NESTED_DATA_DIR_ENV = "GATEWAY_STORE__DATA_DIR"

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", envvar="GATEWAY_CONFIG", help="YAML settings file (default: GATEWAY_CONFIG).")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="Where instances, models and the index live (default: GATEWAY_DATA_DIR, --config's)."),
]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_then_exit_at_once(command: Callable[[], object]) -> NoReturn:
    """Run ``command`` (a Typer app) and end the process with its exit status, skipping the interpreter's teardown.

    Only for a command that leaves nothing behind it: no thread or child process running, every file it wrote
    closed (``gateway volume``). Then nothing is lost: the files are in the kernel's page cache as after a normal
    exit (neither syncs them to disk; dcm2niix does not either), and stdout and stderr are flushed here. What is
    skipped is the work of freeing the process's memory object by object (a volume-sized array, every module),
    about 0.1 s for a CT series, which the kernel does at once when the process ends. An exception other than
    ``SystemExit`` propagates and the process ends the ordinary way.
    """
    try:
        command()
        code = EXIT_OK
    except SystemExit as exc:  # what Typer raises on every exit
        code = _exit_status(exc.code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the reader went away (a closed pipe): as Python's own exit reports it
        code = code or 120
    os._exit(code)


def _exit_status(code: object) -> int:
    """The process exit status of ``SystemExit(code)``, as the interpreter computes it (a message is printed)."""
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILED


def load_settings(config: Path | None, data_dir: Path | None = None, **overrides: object) -> Settings:
    """The settings of ``config`` and the environment, with ``data_dir`` (or ``GATEWAY_DATA_DIR``) and
    ``overrides`` on top; an invalid file or value ends the command with a readable error (exit 2)."""
    from pydantic import ValidationError

    from gateway.config import get_settings

    data_dir = data_dir if data_dir is not None else _data_dir_from_env()
    if data_dir is not None:
        store = overrides.get("store")
        overrides["store"] = {**(store if isinstance(store, dict) else {}), "data_dir": data_dir}
    if config is not None and config.is_file():
        _check_yaml(config)
    try:
        return get_settings(config, **overrides)
    except FileNotFoundError as exc:
        fail(str(exc))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        fail(f"invalid settings: {problems}")


def _data_dir_from_env() -> Path | None:
    """``GATEWAY_DATA_DIR``, checked against ``GATEWAY_STORE__DATA_DIR`` when both are set."""
    short, nested = os.environ.get(DATA_DIR_ENV), os.environ.get(_NESTED_DATA_DIR_ENV)
    if not short:
        return None
    if nested and Path(nested).resolve() != Path(short).resolve():
        fail(f"{DATA_DIR_ENV}={short} and {_NESTED_DATA_DIR_ENV}={nested} name different folders; set one")
    return Path(short)


def _check_yaml(config: Path) -> None:
    """Fail with a readable message unless ``config`` is a YAML mapping (the settings loader would raise)."""
    import yaml

    try:
        content = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read config file {config}: {exc}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        fail(f"config file {config} is not valid YAML: {getattr(exc, 'problem', None) or exc}{where}")
    if content is not None and not isinstance(content, dict):
        fail(f"config file {config} must hold a mapping of sections (dicom:, http:, store:, ingest:)")


class DataFolder:
    """The data folder a command works on: named once on stderr, or in the command's error.

    Parameters
    ----------
    settings
        The command's settings (``store.data_dir``, ``store.database_url``).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.store.data_dir.resolve()
        self._named = False

    @property
    def index_url(self) -> str | None:
        """The index's database URL (password hidden) when it is not the folder's own SQLite file."""
        from sqlalchemy.engine import make_url

        url = self.settings.store.database_url
        return None if url is None else make_url(url).render_as_string(hide_password=True)

    def announce(self) -> None:
        """Say which folder this is (``data folder: ...`` on stderr), once."""
        if not self._named:
            index = f" (index {self.index_url})" if self.index_url else ""
            typer.echo(f"data folder: {self.path}{index}", err=True)
            self._named = True

    def fail(self, message: str, code: int = EXIT_FAILED) -> NoReturn:
        """End with ``error: message``, naming the folder unless it was named already."""
        fail(message if self._named else f"{message} (data folder {self.path})", code)

    def not_found(self, message: str) -> NoReturn:
        """End with ``error: no job 8 in /srv/gw`` (exit 1)."""
        fail(message if self._named else f"{message} in {self.path}", EXIT_FAILED)

    def has_index(self) -> bool:
        """Whether the folder holds an index (always assumed for an index in a database server)."""
        from sqlalchemy.engine import make_url

        url = make_url(self.settings.store.resolved_database_url)
        if not url.drivername.startswith("sqlite"):
            return True
        return url.database is not None and Path(url.database).is_file()

    def require_index(self) -> None:
        """End the command (exit 2) when the folder holds no index: nothing was received there."""
        if not self.has_index():
            hint = "is it the folder `gateway serve` uses? Give it with --data-dir, GATEWAY_DATA_DIR or --config"
            what = "no data folder" if not self.path.is_dir() else "no index"
            fail(f"{what} at {self.path}: nothing was received there ({hint})", EXIT_USAGE)


@contextmanager
def opened_index(folder: DataFolder) -> Iterator[RegistryIndex]:
    """The index of an existing data folder alone (a running gateway's files are left alone); closed after."""
    from gateway.registry.registry import RegistryIndex

    folder.require_index()
    index = RegistryIndex(folder.settings.store)
    try:
        yield index
    finally:
        index.close()
