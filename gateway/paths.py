"""Files named on a command line: files as given, folders searched recursively."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path


def walk_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Yield each file in ``paths``, and every file under each folder (sorted); missing paths yield nothing."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
