"""A real PostgreSQL server for tests: Debian's binaries (package ``postgresql``) in a temporary folder.

:class:`PostgresServer` runs ``initdb`` and ``postgres`` in a fresh folder, listening on a free port of 127.0.0.1
with its Unix socket in that folder, trusting local connections, without fsync (nothing it holds outlives the
tests). Root cannot run PostgreSQL: as root, the folder is given to the ``postgres`` user and the binaries run
through ``runuser -u postgres --``; otherwise they run as the current user. Leaving the ``with`` block stops the
server (fast shutdown: open sessions are cut) and removes the folder; a server that failed to start leaves it,
with its log, for a look.

Each test gets its own database from :meth:`PostgresServer.create_database` (the ``postgres_url`` fixture of
``conftest.py``), so that tests neither see nor wait on each other's rows.
"""

from __future__ import annotations

import contextlib
import getpass
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import psycopg

from peers import PeerError, PeerProcess, free_port, log_tail

#: Where Debian installs each major version's server binaries.
BIN_GLOB = "/usr/lib/postgresql/*/bin"

_RUN_AS = "postgres"  # the account root runs the server as (Debian's package creates it)
_SUPERUSER = "postgres"  # the cluster's superuser role, whoever runs it
_INITDB_TIMEOUT_S = 120.0


def server_binaries() -> Path | None:
    """The folder of the newest installed PostgreSQL's ``initdb`` and ``postgres``, or ``None``."""
    found = [Path(p) for p in Path("/").glob(BIN_GLOB.lstrip("/")) if (Path(p) / "postgres").is_file()]
    found = [p for p in found if (p / "initdb").is_file() and p.parent.name.isdigit()]
    return max(found, key=lambda p: int(p.parent.name)) if found else None


def unavailable_reason() -> str | None:
    """Why a server cannot be started here (``None``: it can)."""
    if server_binaries() is None:
        return f"PostgreSQL server binaries not found in {BIN_GLOB} (make test installs Debian's postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_RUN_AS)
        except KeyError:
            return f"running as root and there is no {_RUN_AS!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


class PostgresServer(PeerProcess):
    """A throwaway PostgreSQL cluster on 127.0.0.1.

    Parameters
    ----------
    bin_dir
        The server binaries (default :func:`server_binaries`).
    """

    name = "postgres"

    def __init__(self, bin_dir: Path | None = None) -> None:
        bins = bin_dir or server_binaries()
        if bins is None:
            raise PeerError(unavailable_reason() or "no PostgreSQL binaries")
        self.bin_dir = bins
        # Under /tmp, not pytest's tmp_path: that one sits in a folder only root may enter.
        super().__init__(Path(tempfile.mkdtemp(prefix="gateway-pg-")))
        self.data_dir = self.tmpdir / "cluster"
        self.port = 0
        self._as_root = os.geteuid() == 0
        self._numbers = itertools.count(1)
        if self._as_root:
            account = pwd.getpwnam(_RUN_AS)
            os.chown(self.tmpdir, account.pw_uid, account.pw_gid)

    @property
    def user(self) -> str:
        """The operating-system account the server runs as."""
        return _RUN_AS if self._as_root else getpass.getuser()

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this server (psycopg 3 driver, TCP on 127.0.0.1, trusted)."""
        return f"postgresql+psycopg://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A psycopg connection to ``database``, in autocommit mode (``CREATE DATABASE`` needs it)."""
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=_SUPERUSER, dbname=database, autocommit=True, connect_timeout=5
        )

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (``test_<n>`` unless named) and return its SQLAlchemy URL."""
        name = name or f"test_{next(self._numbers)}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits and underscores only")
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # checked above
        return self.url(name)

    def start(self, timeout_s: float = 60.0) -> None:
        """Make the cluster (``initdb``), then start the server on a free port and wait until it takes queries."""
        if not self.data_dir.exists():
            self._initdb()
        self.port = free_port()
        super().start(timeout_s)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are cut, not waited for); the folder stays (see :meth:`__exit__`)."""
        if self.alive:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        super().stop()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _as_server_user(self, argv: Sequence[str]) -> list[str]:
        return ["runuser", "-u", _RUN_AS, "--", *argv] if self._as_root else list(argv)

    def _initdb(self) -> None:
        argv = [
            str(self.bin_dir / "initdb"),
            f"--pgdata={self.data_dir}",
            f"--username={_SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        log = self.tmpdir / "initdb.log"
        with log.open("wb") as out:
            done = subprocess.run(
                self._as_server_user(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                timeout=_INITDB_TIMEOUT_S,
                check=False,
            )
        if done.returncode != 0:
            raise PeerError(f"initdb failed ({done.returncode}); log {log}:\n{log_tail(log)}")

    def _command(self) -> Sequence[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.tmpdir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
        }
        options = [item for key, value in settings.items() for item in ("-c", f"{key}={value}")]
        return self._as_server_user([str(self.bin_dir / "postgres"), "-D", str(self.data_dir), *options])

    def _ready(self) -> bool:
        try:
            with self.connect() as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True
