"""Settings: defaults, the YAML file, GATEWAY_* environment variables, explicit overrides, and their order."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pydantic
import pytest
import yaml

from gateway.config import Settings, get_settings, hash_token

SAMPLE = Path(__file__).resolve().parents[1] / "docs" / "gateway.sample.yaml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No GATEWAY_* variable from the caller's environment, and a fresh working directory."""
    for name in os.environ:
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_yaml(
        tmp_path / "gateway.yaml",
        """
log_level: debug
dicom:
  ae_title: FROM_FILE
  port: 2222
  max_associations: 4
  allowed_callers:
    - ae_title: PACS
      host: 10.0.0.5
http:
  port: 9090
store:
  data_dir: /srv/gateway
  min_free_bytes: 0
ingest:
  quiet_period_s: 2.5
""",
    )


def test_defaults() -> None:
    settings = get_settings()
    assert settings.store.data_dir == Path("./gateway-data")
    assert settings.store.database_url is None
    assert settings.store.resolved_database_url == f"sqlite:///{Path('gateway-data/index.sqlite3').resolve()}"
    assert settings.store.min_free_bytes == 1 << 30
    assert settings.dicom.port == 11112
    assert settings.dicom.ae_title == "GATEWAY"
    assert settings.dicom.max_associations == 16
    assert settings.dicom.allowed_callers == [] and settings.dicom.tls is None
    assert not settings.dicom.require_called_ae_title
    assert settings.http.port == 8080
    assert settings.http.host == "127.0.0.1" and settings.http.is_loopback
    assert settings.http.tokens == []
    assert settings.ingest.quiet_period_s == 10.0
    assert settings.ingest.stow_max_bytes == 8 << 30
    assert settings.log_level == "INFO"
    assert settings.model_dump() == Settings().model_dump(), "without a file: the plain defaults"


def test_values_from_the_yaml_file(config: Path) -> None:
    settings = get_settings(config)
    assert settings.log_level == "DEBUG"
    assert settings.dicom.ae_title == "FROM_FILE" and settings.dicom.port == 2222
    assert settings.dicom.max_associations == 4
    assert [(c.ae_title, c.host) for c in settings.dicom.allowed_callers] == [("PACS", "10.0.0.5")]
    assert settings.http.port == 9090 and settings.http.host == "127.0.0.1", "unset keys keep their default"
    assert settings.store.data_dir == Path("/srv/gateway") and settings.store.min_free_bytes == 0
    assert settings.ingest.quiet_period_s == 2.5
    assert settings.ingest.completion_poll_s == 1.0


def test_environment_overrides_the_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DICOM__PORT", "11113")
    monkeypatch.setenv("GATEWAY_STORE__MIN_FREE_BYTES", "12345")
    monkeypatch.setenv("GATEWAY_LOG_LEVEL", "warning")
    settings = get_settings(config)
    assert settings.dicom.port == 11113
    assert settings.dicom.ae_title == "FROM_FILE", "the file's other keys of the section survive"
    assert settings.store.min_free_bytes == 12345 and settings.store.data_dir == Path("/srv/gateway")
    assert settings.log_level == "WARNING"


def test_environment_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DICOM__AE_TITLE", "FROM_ENV")
    monkeypatch.setenv(
        "GATEWAY_HTTP__TOKENS", f'[{{"name": "pacs", "sha256": "{hash_token("t")}", "scopes": ["write"]}}]'
    )
    settings = get_settings()
    assert settings.dicom.ae_title == "FROM_ENV" and settings.dicom.port == 11112
    assert [(t.name, t.scopes) for t in settings.http.tokens] == [("pacs", ["write"])]


def test_explicit_overrides_beat_environment_and_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DICOM__PORT", "11113")
    monkeypatch.setenv("GATEWAY_DICOM__MAX_ASSOCIATIONS", "8")
    settings = get_settings(config, dicom={"port": 1}, store={"data_dir": Path("/elsewhere")})
    assert settings.dicom.port == 1
    assert settings.dicom.ae_title == "FROM_FILE", "an override merges with the file's keys of its section"
    assert settings.dicom.max_associations == 8, "and with the environment's"
    assert [c.ae_title for c in settings.dicom.allowed_callers] == ["PACS"]
    assert settings.store.data_dir == Path("/elsewhere") and settings.store.min_free_bytes == 0
    assert settings.http.port == 9090


def test_explicit_top_level_value(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LOG_LEVEL", "WARNING")
    assert get_settings(config, log_level="error").log_level == "ERROR"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("bogus: 1\n", "bogus"),
        ("dicom:\n  prot: 104\n", "dicom.prot"),  # a misspelt key is an error, not a silent default
        ("http:\n  tokens:\n    - name: x\n      sha256: " + "a" * 64 + "\n      scope: [write]\n", "scope"),
        ("store:\n  data_dir: /x\n  min_free: 5\n", "store.min_free"),
    ],
    ids=["top-level", "dicom", "token", "store"],
)
def test_unknown_key_is_a_validation_error(tmp_path: Path, text: str, named: str) -> None:
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted") as excinfo:
        get_settings(path)
    assert named in str(excinfo.value)


def test_unknown_key_in_overrides_is_a_validation_error() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"dicom\.prot"):
        get_settings(dicom={"prot": 1})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("dicom:\n  port: 70000\n", "dicom.port"),
        ("dicom:\n  ae_title: THIS_AE_TITLE_IS_TOO_LONG\n", "dicom.ae_title"),
        ("dicom:\n  max_associations: 0\n", "dicom.max_associations"),
        ("http:\n  port: eighty\n", "http.port"),
        ("http:\n  host: 0.0.0.0\n", "http.tokens"),
        ("http:\n  tokens:\n    - name: x\n      sha256: not-a-hash\n", "sha256"),
        ("http:\n  tokens:\n    - name: x\n      sha256: " + "a" * 64 + "\n      scopes: [root]\n", "scopes"),
        ("ingest:\n  stow_max_bytes: 0\n", "ingest.stow_max_bytes"),
        ("log_level: verbose\n", "log_level"),
    ],
    ids=[
        "port",
        "ae-title",
        "max-associations",
        "http-port",
        "host-without-tokens",
        "token-hash",
        "token-scope",
        "stow-max-bytes",
        "log-level",
    ],
)
def test_invalid_value_is_a_validation_error_naming_it(tmp_path: Path, text: str, named: str) -> None:
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(pydantic.ValidationError) as excinfo:
        get_settings(path)
    assert named in str(excinfo.value)
    assert "validation error for Settings" in str(excinfo.value)


def test_invalid_environment_value_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_HTTP__HOST", "0.0.0.0")
    with pytest.raises(pydantic.ValidationError, match=r"http\.tokens"):
        get_settings()


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.yaml"):
        get_settings(tmp_path / "nowhere.yaml")
    with pytest.raises(FileNotFoundError):
        get_settings(tmp_path)  # a directory is not a settings file


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert get_settings(write_yaml(tmp_path / "empty.yaml", "")).model_dump() == get_settings().model_dump()


def test_sample_file_loads_and_shows_the_defaults() -> None:
    assert get_settings(SAMPLE).model_dump() == get_settings().model_dump()


def test_sample_file_documents_every_setting() -> None:
    sample = yaml.safe_load(SAMPLE.read_text(encoding="utf-8"))
    assert set(sample) == set(Settings.model_fields)
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, pydantic.BaseModel):
            assert set(sample[section]) == set(model.model_fields), f"section {section}"


def test_token_hash() -> None:
    assert hash_token("test") == hashlib.sha256(b"test").hexdigest()
    assert hash_token("test") == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
