"""Configuration changes reach the audit trail: a process's settings, section by section, against what the same
process recorded at its previous start (a Security Alert per changed section, naming keys, never values)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

from gateway.audit.configuration import record_configuration
from gateway.audit.sinks import FileSink
from gateway.audit.trail import AuditTrail
from gateway.config import DimseDestination, ExportSettings, HttpSettings, TokenSettings, hash_token
from gateway.runtime import Gateway

from audit_peers import validated
from conftest import make_settings
from peers import GATEWAY_SCRIPT

SECRET_HOST = "pacs-7.example.org"
MODELS = Path(__file__).resolve().parents[2] / "models"


def alerts(path: Path) -> list[tuple[str, str]]:
    """(alert type code, alert description) of each Security Alert in the audit file, every message validated."""
    found = []
    for line in path.read_bytes().splitlines() if path.exists() else []:
        root: Any = validated(line)
        ident = root.find("EventIdentification")
        if ident.find("EventID").get("csd-code") == "110113":
            found.append((ident.find("EventTypeCode").get("csd-code"), ident.find("EventOutcomeDescription").text))
    return found


def test_a_change_is_an_alert_naming_its_keys_and_nothing_else(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    trail = AuditTrail("GW", [FileSink(log)])
    before = make_settings(tmp_path / "data")
    assert record_configuration(trail, before) == {}, "the first start records, there is nothing to compare"
    assert alerts(log) == []
    (record,) = (tmp_path / "data" / "audit").glob("settings-*.json")
    assert stat.S_IMODE(os.stat(record).st_mode) == 0o600

    assert record_configuration(trail, before) == {}, "unchanged settings: no alert"
    destinations = {"pacs": DimseDestination(ae_title="PACS", host=SECRET_HOST, port=104)}
    token = TokenSettings(name="ops", sha256=hash_token("a-new-token"))
    after = make_settings(
        tmp_path / "data",
        export=ExportSettings(destinations=destinations, default=["pacs"]),
        http=before.http.model_copy(update={"tokens": [token]}),
    )
    changed = record_configuration(trail, after)
    assert changed == {"export": ["default", "destinations"], "http": ["tokens"]}
    found = dict(alerts(log))
    assert set(found) == {"110128", "110129"}, "network configuration (export), security configuration (http)"
    assert "export: default, destinations" in found["110128"] and "http: tokens" in found["110129"]
    text = log.read_text()
    assert SECRET_HOST not in text and hash_token("a-new-token") not in text, "keys are named, values never"
    trail.close()


def test_each_process_compares_with_its_own_last_start(tmp_path: Path) -> None:
    trail = AuditTrail("GW", [FileSink(tmp_path / "audit.log")])
    ingest = make_settings(tmp_path / "data", cluster={"roles": ["ingest", "export"]})
    worker = make_settings(tmp_path / "data", cluster={"roles": ["worker"]}, http=HttpSettings(port=18081))
    assert record_configuration(trail, ingest) == {}
    assert record_configuration(trail, worker) == {}, "another process's first start: nothing to compare"
    assert record_configuration(trail, ingest) == {}, "each keeps its own record"
    assert len(list((tmp_path / "data" / "audit").glob("settings-*.json"))) == 2
    trail.close()


def test_a_gateway_restarted_with_changed_settings_audits_the_change(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Gateway(make_settings(data), dimse=False)
    first.start()
    first.stop()
    destinations = {"archive": DimseDestination(ae_title="ARCHIVE", host="127.0.0.1", port=11119)}
    second = Gateway(make_settings(data, export=ExportSettings(destinations=destinations)), dimse=False)
    second.start()
    second.stop()
    found = alerts(data / "audit" / "audit.log")
    assert [code for code, _ in found] == ["110128"], found
    assert "export: destinations" in found[0][1]


def test_model_commands_and_purges_from_the_cli_are_audited_with_the_operator(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store:\n  data_dir: {data}\n  min_free_bytes: 0\nmodels:\n  register_shipped: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    for args in (["models", "register", str(MODELS / "ct-tissue")], ["models", "disable", "ct-tissue"]):
        done = subprocess.run(
            [str(GATEWAY_SCRIPT), *args, "--config", str(config)], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, done.stderr
    found = alerts(data / "audit" / "audit.log")
    assert [code for code, _ in found] == ["110131", "110131"], found
    assert "registered" in found[0][1] and "disabled" in found[1][1]
    assert b"(gateway CLI)" in (data / "audit" / "audit.log").read_bytes(), "the operator who ran it"
