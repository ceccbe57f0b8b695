"""The store's temporary folder is shared by every process on the data folder: a start removes only what a gone
process left there (real processes, real pids)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from gateway.store.files import ABANDONED_AFTER_S, clear_directory, new_temp_path, temp_prefix

NOW = 1_900_000_000.0


def _touch(folder: Path, name: str, *, age_s: float = 0.0) -> Path:
    path = folder / name
    path.write_bytes(b"partial")
    os.utime(path, (NOW - age_s, NOW - age_s))
    return path


def test_a_start_removes_what_gone_processes_left_and_nothing_else(tmp_path: Path) -> None:
    host = socket.gethostname()[:40]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = new_temp_path(tmp_path)
    assert mine.name.startswith(temp_prefix())
    kept = {
        mine,
        _touch(tmp_path, f"{os.getppid()}-abcd1234-{host}-live.part", age_s=10 * ABANDONED_AFTER_S),
        _touch(tmp_path, "4242-abcd1234-another-host-x.part", age_s=10),
        _touch(tmp_path, "tmpx1y2.part", age_s=10),  # an older gateway's file, or another program's: recent
    }
    removed = {
        _touch(tmp_path, f"{int(gone.stdout)}-abcd1234-{host}-dead.part"),
        _touch(tmp_path, f"{os.getpid()}-0earlier-{host}-restart.part"),  # this pid's earlier life (a container)
        _touch(tmp_path, "4242-abcd1234-another-host-y.part", age_s=2 * ABANDONED_AFTER_S),
        _touch(tmp_path, "tmpold.part", age_s=2 * ABANDONED_AFTER_S),
    }
    assert clear_directory(tmp_path, now=NOW) == len(removed)
    assert set(tmp_path.iterdir()) == kept
