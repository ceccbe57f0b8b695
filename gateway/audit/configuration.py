"""Configuration changes in the audit trail: what changed in a process's settings since its last start.

The settings are read at start (a YAML file, ``GATEWAY_*`` variables, command-line flags), so a change takes effect
when a process starts. Each start compares its settings, section by section, with what the same process (this
host, these roles, this HTTP port) recorded at its previous start in ``audit/settings-*.json`` of the data folder,
and sends one Security Alert per changed section naming the keys that changed, never their values: a token's hash,
a password in a URL or a host name stay out of the trail. ``http`` (tokens, allowed callers and hosts) is a
Security Configuration change, ``dicom`` and ``export`` (peers, destinations) a Network Configuration change, the
rest Software Configuration (PS3.15 A.5.3.11, DCM CID 403).

The first start of a process records its settings and sends nothing: there is nothing to compare with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from gateway.audit import messages as m
from gateway.audit.trail import AuditTrail
from gateway.config import Settings
from gateway.store.files import fsync_dir, host_name

__all__ = ["record_configuration"]

log = logging.getLogger(__name__)

_ALERTS = {"http": m.SECURITY_CONFIGURATION, "dicom": m.NETWORK_CONFIGURATION, "export": m.NETWORK_CONFIGURATION}


def _fingerprints(settings: Settings) -> dict[str, dict[str, str]]:
    """Each section's keys, each with the SHA-256 of its value as JSON (secrets as pydantic masks them)."""
    dumped = settings.model_dump(mode="json")
    sections: dict[str, dict[str, str]] = {}
    for section, value in dumped.items():
        items = value if isinstance(value, dict) else {"": value}
        sections[section] = {
            key: hashlib.sha256(json.dumps(item, sort_keys=True).encode("utf-8")).hexdigest()
            for key, item in items.items()
        }
    return sections


def _record_path(settings: Settings) -> Path:
    roles = "-".join(settings.cluster.roles)
    host = re.sub(r"[^A-Za-z0-9._-]", "_", host_name())
    return settings.store.data_dir / "audit" / f"settings-{host}-{roles}-{settings.http.port}.json"


def _changes(before: dict[str, Any], after: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """Per section, the keys added, removed or whose value changed."""
    changed: dict[str, list[str]] = {}
    for section in sorted(set(before) | set(after)):
        old, new = before.get(section) or {}, after.get(section) or {}
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if keys:
            changed[section] = keys
    return changed


def record_configuration(trail: AuditTrail, settings: Settings) -> dict[str, list[str]]:
    """Send a Security Alert for each section of ``settings`` that changed since this process's last start, then
    record them; return what changed (section -> keys). A record that cannot be read counts as none (a warning)."""
    path = _record_path(settings)
    now = _fingerprints(settings)
    before: dict[str, Any] | None = None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
        before = loaded if isinstance(loaded, dict) else None
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        log.warning("the record of this process's previous settings could not be read; recorded anew")
    changed = {} if before is None else _changes(before, now)
    for section, keys in changed.items():
        what = f"configuration changed since the last start: {section}: {', '.join(k or section for k in keys)}"
        trail.security_alert(
            None, what, subject=f"configuration:{section}", alert=_ALERTS.get(section, m.SOFTWARE_CONFIGURATION)
        )
    _write(path, now)
    return changed


def _write(path: Path, fingerprints: dict[str, dict[str, str]]) -> None:
    """Write the record whole (a temporary file renamed over it), readable by the gateway's account only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(fingerprints, out, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    part.replace(path)
    fsync_dir(path.parent)
