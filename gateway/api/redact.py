"""Reasons fit for an HTTP answer: no absolute paths of the server's files.

Reasons raised inside (a manifest that is not YAML, a model that does not load) name the files they concern, which
is what the log and the CLI want. A client is told the file's name but not where the server keeps it.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

_PART = r"[^\s'\"/:;,()\[\]{}<>]"
# An absolute POSIX path of two or more components, not inside a URL ("http://h/a/b") or a relative path ("a/b/c").
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.:/~-])/{_PART}+(?:/{_PART}*)+")


def without_paths(reason: str) -> str:
    """``reason`` with each absolute path replaced by its last component (``/srv/gw/tmp/x1/model.yaml`` ->
    ``model.yaml``)."""
    return _ABSOLUTE_PATH.sub(lambda match: PurePosixPath(match[0]).name, reason)
