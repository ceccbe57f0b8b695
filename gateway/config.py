"""Settings: one object, read from an optional YAML file and ``GATEWAY_*`` environment variables.

Precedence, highest first: values passed in code (the CLI's ``--data-dir``, ``--dicom-port``, ...),
environment variables (``GATEWAY_DICOM__PORT=11113``; nested keys joined by ``__``), the YAML file given with
``--config``, then the defaults below. ``docs/gateway.sample.yaml`` is a commented sample.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

Scope = Literal["read", "write", "admin"]


def hash_token(token: str) -> str:
    """Return the hex SHA-256 of a bearer token, the form in which tokens are kept in the config."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _Section(BaseModel):
    """A settings section: an unknown (e.g. misspelt) key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class AllowedCaller(_Section):
    """A calling AE title allowed to associate, optionally only from one host (IP address or name)."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str | None = None


class TLSSettings(_Section):
    """TLS for the DICOM listener (TLS 1.2 minimum); a CA bundle turns on mutual TLS."""

    certificate: Path
    private_key: Path
    ca_bundle: Path | None = None


class DicomSettings(_Section):
    """The DIMSE (C-ECHO / C-STORE) listener."""

    ae_title: str = Field(default="GATEWAY", min_length=1, max_length=16)
    host: str = "0.0.0.0"  # noqa: S104  (a DICOM node must be reachable by the PACS; see allowed_callers)
    port: int = Field(default=11112, ge=0, le=65535)
    max_associations: int = Field(default=16, ge=1)
    maximum_pdu_size: int = Field(default=262_144, ge=4096)
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    require_called_ae_title: bool = False
    tls: TLSSettings | None = None
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0


class TokenSettings(_Section):
    """One bearer token: a name for humans, the SHA-256 of the token, and its scopes."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["read"]))


class HttpSettings(_Section):
    """The HTTP server (DICOMweb and the JSON API)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tokens: list[TokenSettings] = Field(default_factory=list)
    # Host header names accepted besides localhost, 127.0.0.1 and [::1] (the names the PACS and users reach us by);
    # any other Host is refused, which stops DNS rebinding.
    allowed_hosts: list[str] = Field(default_factory=list)
    # Reading (QIDO/WADO, GET /api) without a token from loopback: None = open while http.tokens is empty.
    anonymous_read: bool | None = None
    header_timeout_s: float = Field(default=30.0, gt=0)  # a request's headers must arrive within this
    body_timeout_s: float = Field(default=60.0, gt=0)  # longest wait for the next chunk of a request body
    keep_alive_s: float = Field(default=5.0, gt=0)  # an idle keep-alive connection is closed after this
    max_connections: int = Field(default=256, ge=1)  # open HTTP connections; beyond it new ones get 503

    @property
    def is_loopback(self) -> bool:
        """Whether the server binds to the loopback interface only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @model_validator(mode="after")
    def _tokens_beyond_loopback(self) -> HttpSettings:
        if not self.is_loopback and not self.tokens:
            raise ValueError(
                f"http.host {self.host!r} is not loopback: configure http.tokens (see `gateway token`) "
                "so that every request is authenticated"
            )
        return self


class StoreSettings(_Section):
    """Where received instances and the index live."""

    data_dir: Path = Path("./gateway-data")
    database_url: str | None = None  # default: SQLite file in data_dir
    min_free_bytes: int = Field(default=1 << 30, ge=0)

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL of the index."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"


class IngestSettings(_Section):
    """Series completion and STOW-RS limits."""

    quiet_period_s: float = Field(default=10.0, ge=0)
    completion_poll_s: float = Field(default=1.0, gt=0)
    stow_max_bytes: int = Field(default=8 << 30, gt=0)
    # After a (re)start, a series left arriving by the previous run waits this long for its sender to re-send
    # what was not acknowledged, instead of completing at once on a partial series.
    resend_wait_s: float = Field(default=60.0, ge=0)
    # A Deflated data set is inflated up to max(inflate_floor_bytes, inflate_max_ratio x its wire size), and never
    # beyond inflate_max_bytes; a larger one is refused (0xA700 / STOW failure) before it costs the memory.
    inflate_max_ratio: float = Field(default=100.0, ge=1)
    inflate_floor_bytes: int = Field(default=16 << 20, gt=0)
    inflate_max_bytes: int = Field(default=512 << 20, gt=0)


class JobsSettings(_Section):
    """The workers that drive completed series through the stages."""

    workers: int = Field(default=4, ge=0)  # each takes a job through assembly, routing and inference
    poll_s: float = Field(default=1.0, gt=0)
    lease_s: float = Field(default=60.0, gt=0)  # a claimed job's lease; renewed while its worker lives
    shutdown_grace_s: float = Field(default=30.0, ge=0)  # SIGTERM: running stages may finish within this
    max_attempts: int = Field(default=3, ge=1)  # claims of one job (crashes, restarts) before it fails for good
    # Memory that jobs being assembled and inferred may take together (None: half of the machine's memory); a job
    # waits for its share (estimated from its series) before it is claimed, so concurrent arrivals cannot exhaust it.
    memory_budget_bytes: int | None = Field(default=None, gt=0)


class ModelsSettings(_Section):
    """The model registry: packages shipped with the gateway, where models run, upload limits."""

    register_shipped: bool = True  # register the packages in shipped_dir, disabled (default: the repository's models/)
    shipped_dir: Path | None = None
    device: str = "auto"  # auto (first CUDA device, else CPU), cpu, cuda or cuda:N
    batching: bool = True  # forward passes of up to batch_size inputs, across jobs; off: one at a time
    max_upload_bytes: int = Field(default=1 << 30, gt=0)  # largest model archive accepted (upload or register)
    keep_nifti: bool = False  # also write each job's results as NIfTI under data_dir/results (seconds per large job)
    # Loaded model versions per device are kept within this many bytes, least recently used unloaded first
    # (None: no limit but the versions in use); versions no longer active are unloaded whatever the budget.
    memory_budget_bytes: int | None = Field(default=None, gt=0)
    # Model code (dry runs, reading a MONAI bundle's config) runs in a child process with these limits.
    sandbox_timeout_s: float = Field(default=300.0, gt=0)
    sandbox_memory_bytes: int = Field(default=8 << 30, gt=0)


_DESTINATION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

#: The kinds of result object a destination may be sent: Segmentation, TID 1500 SR, Parametric Map, Grayscale
#: Softcopy Presentation State (outlines), Key Object Selection (key images), burned-in Secondary Capture key images.
OutputKind = Literal["seg", "sr", "pm", "gsps", "ko", "sc"]
#: What a destination gets unless its ``send`` says otherwise: every kind but burned-in key images.
DEFAULT_SEND: tuple[OutputKind, ...] = ("seg", "sr", "pm", "gsps", "ko")


def _default_send() -> list[OutputKind]:
    return list(DEFAULT_SEND)


class ClientTLSSettings(_Section):
    """TLS for an outgoing connection (TLS 1.2 minimum): whom to trust, and optionally our client certificate."""

    ca_bundle: Path | None = None  # default: the system's trusted certificate authorities
    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="after")
    def _certificate_with_key(self) -> ClientTLSSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (a client certificate needs its key)")
        return self


#: The options of the Basic Application Level Confidentiality Profile (PS3.15 Table E.1-1), as settings name them.
DeidentifyOption = Literal[
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]


class DeidentifySettings(_Section):
    """A research destination's copies are de-identified (PS3.15 Annex E): the profile and its options.

    Only the options the de-identifier can honour are taken (:data:`gateway.export.deidentify.HONOURED`):
    ``retain_longitudinal_modified_dates``, ``retain_longitudinal_full_dates`` (not both) and ``retain_uids``. The
    others are refused here, never ignored, and the message says why for each: Retain Patient Characteristics,
    Device Identity and Institution Identity need their columns of Table E.1-1, which no library the gateway can
    install carries (dicom-anonymizer's table has the Basic Profile column only; idiscore's has them, but needs
    Python 3.12 and pins older releases of pydicom, numpy or Pillow), and a tag list of our own would go stale
    with the standard; Retain Safe Private needs a maintained list of safe private attributes (PS3.15 E.3.10,
    Table E.3.10-1), which none carries; the clean options need free-text and graphics cleaning, which the
    profile's libraries do not do.
    """

    profile: Literal["basic"] = "basic"
    options: list[DeidentifyOption] = Field(default_factory=list)
    # Only the jobs one of these models ran on (their inputs and outputs): "every case model X ran on".
    # None: every job routed here.
    models: list[str] | None = Field(default=None, min_length=1)

    @field_validator("options")
    @classmethod
    def _honoured(cls, options: list[str]) -> list[str]:
        honoured = ("retain_longitudinal_modified_dates", "retain_longitudinal_full_dates", "retain_uids")
        column = "its column of Table E.1-1 is in no library the gateway can install (dicom-anonymizer: Basic only)"
        cleaning = "needs cleaning of free text or graphics, which the profile's libraries do not do"
        reasons = {
            "retain_patient_characteristics": column,
            "retain_device_identity": column,
            "retain_institution_identity": column,
            "retain_safe_private": "no library the gateway can install keeps a list of safe private attributes "
            "(PS3.15 Table E.3.10-1)",
            "clean_descriptors": cleaning,
            "clean_structured_content": cleaning,
            "clean_graphics": cleaning,
        }
        refused = [option for option in dict.fromkeys(options) if option not in honoured]
        if refused:
            why = "; ".join(f"{option}: {reasons[option]}" for option in refused)
            raise ValueError(
                f"option(s) {refused} of PS3.15 Table E.1-1 cannot be honoured by the de-identifier "
                f"(dicognito with the dicom-anonymizer table): {why}; supported: {list(honoured)}"
            )
        if {"retain_longitudinal_modified_dates", "retain_longitudinal_full_dates"} <= set(options):
            raise ValueError("retain_longitudinal_modified_dates and retain_longitudinal_full_dates exclude each other")
        return list(dict.fromkeys(options))


class DimseDestination(_Section):
    """A DICOM node the gateway sends to with C-STORE."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: ClientTLSSettings | None = None
    send: list[OutputKind] = Field(default_factory=_default_send, min_length=1)  # the kinds of result it gets
    deidentify: DeidentifySettings | None = None  # a research destination: de-identified inputs and outputs


class StowDestination(_Section):
    """A DICOMweb server the gateway sends to with STOW-RS (``stow_url``: the URL POSTed to, e.g. ``.../studies``)."""

    stow_url: str = Field(pattern=r"^https?://[^\s/]+")
    token: SecretStr | None = None  # sent as "Authorization: Bearer <token>"
    tls: ClientTLSSettings | None = None
    send: list[OutputKind] = Field(default_factory=_default_send, min_length=1)  # the kinds of result it gets
    deidentify: DeidentifySettings | None = None  # a research destination: de-identified inputs and outputs


class ExportSettings(_Section):
    """Where results go, and how failed deliveries are retried (:mod:`gateway.export`)."""

    destinations: dict[str, DimseDestination | StowDestination] = Field(default_factory=dict)
    return_to_sender: dict[str, str] = Field(default_factory=dict)  # calling AE title -> destination name
    default: list[str] = Field(default_factory=list)  # destinations of every result (and of STOW-RS input)
    # Retries are sized for real PACS downtime: exponential backoff capped at backoff_max_s, and a delivery is
    # given up (dead) once give_up_after_s have passed since its first attempt; max_attempts, when set, also caps
    # the count. A dead delivery is resent by itself once its destination answers a check again.
    give_up_after_s: float = Field(default=86400.0, gt=0)
    max_attempts: int | None = Field(default=None, ge=1)
    backoff_initial_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)
    check_interval_s: float = Field(default=60.0, gt=0)  # how often destinations with dead deliveries are checked
    # Results of a C-STORE caller that return_to_sender does not map: "default" sends them to `default`; "drop"
    # sends them nowhere; "hold" keeps them for an operator. Either way a job with results and no destination is
    # flagged undelivered (logged at WARNING, shown in the UI, counted in the metrics).
    unmapped: Literal["default", "drop", "hold"] = "default"
    workers: int = Field(default=2, ge=0)
    poll_s: float = Field(default=1.0, gt=0)
    calling_ae_title: str = Field(default="GATEWAY", min_length=1, max_length=16)
    timeout_s: float = Field(default=60.0, gt=0)  # connect, association, response and HTTP timeouts
    batch_size: int = Field(default=64, ge=1)  # deliveries sent over one association or in one STOW-RS request
    # A claim of deliveries is this process's for lease_s, renewed while it lives; another export process takes
    # back the claims of a process that is gone (its lease lapsed, or it was this host's and its pid is gone).
    lease_s: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _names_exist(self) -> ExportSettings:
        bad = [name for name in self.destinations if not re.match(_DESTINATION_NAME, name)]
        if bad:
            raise ValueError(f"destination names must match {_DESTINATION_NAME}: {', '.join(map(repr, bad))}")
        named = [*self.default, *self.return_to_sender.values()]
        unknown = sorted({name for name in named if name not in self.destinations})
        if unknown:
            raise ValueError(f"unknown destination(s) {', '.join(map(repr, unknown))}: not in export.destinations")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must not be below backoff_initial_s")
        return self


class AuditSyslogSettings(_Section):
    """A syslog audit repository (RFC 5424 messages over UDP, or over TLS framed per RFC 5425)."""

    host: str = Field(min_length=1)
    port: int = Field(default=6514, ge=1, le=65535)
    transport: Literal["udp", "tls"] = "tls"
    tls: ClientTLSSettings | None = None  # whom to trust, and our client certificate (TLS only)


class AuditSettings(_Section):
    """The audit trail: DICOM audit messages (PS3.15 A.5, the IHE ATNA format) of what the gateway did."""

    enabled: bool = True
    file: Path | None = None  # the append-only audit file (None: audit/audit.log in the data folder)
    syslog: AuditSyslogSettings | None = None  # also send each message to this audit repository
    source_id: str = Field(default="GATEWAY", min_length=1, max_length=64)  # AuditSourceIdentification


Role = Literal["ingest", "worker", "export"]
ROLES: tuple[Role, ...] = ("ingest", "worker", "export")


class ClusterSettings(_Section):
    """What this process does among the processes that share one index and data folder (``gateway serve --role``).

    ``ingest`` runs the DICOM listener, the HTTP faces (DICOMweb, API, UI) and series completion; ``worker`` claims
    jobs and runs assembly, inference and encoding; ``export`` sends the results. Every role serves ``/healthz``
    and ``/metrics``. The default runs all three in one process, the embedded (SQLite) setup.
    """

    roles: list[Role] = Field(default_factory=lambda: list(ROLES), min_length=1)
    # worker: the model names this process runs (None: every model); a job whose series a model outside this
    # list applies to is left to another worker.
    models: list[str] | None = None
    heartbeat_s: float = Field(default=5.0, gt=0)  # how often this process reports itself in the workers table
    # PostgreSQL: wake idle processes with LISTEN/NOTIFY (jobs ready, deliveries queued, models changed); the polls
    # (jobs.poll_s, export.poll_s) stay as the fallback. SQLite wakes within the process only.
    notify: bool = True

    @field_validator("roles")
    @classmethod
    def _distinct(cls, roles: list[Role]) -> list[Role]:
        return [role for role in ROLES if role in roles]


class UiSettings(_Section):
    """The web UI at ``/ui`` (:mod:`gateway.ui`)."""

    # A DICOMweb viewer to open a study in, e.g. OHIF pointed at this gateway's DICOMweb:
    # "http://viewer.example:3000/viewer?StudyInstanceUIDs={study}" ({study}: the StudyInstanceUID). None: no link.
    viewer_url: str | None = None
    session_hours: float = Field(default=12.0, gt=0)  # how long a sign-in lasts


class RetentionSettings(_Section):
    """How long received instances and outputs are kept, and the disk watermarks that purge oldest-first.

    Ages count from the end of a series' last job (exported, skipped or failed); a series with an active job is
    never purged. ``*_days: null`` keeps that kind forever (the watermarks still apply to finished jobs).
    """

    instances_days: float | None = Field(default=7.0, gt=0)
    outputs_days: float | None = Field(default=30.0, gt=0)
    failed_days: float | None = Field(default=30.0, gt=0)  # failed jobs keep their inputs this long
    disk_high_watermark: float = Field(default=0.90, gt=0, le=1)  # fraction of the file system used
    disk_low_watermark: float = Field(default=0.80, gt=0, le=1)
    interval_s: float = Field(default=300.0, gt=0)  # how often the background purge runs in `gateway serve`

    @model_validator(mode="after")
    def _watermarks(self) -> RetentionSettings:
        if self.disk_low_watermark > self.disk_high_watermark:
            raise ValueError("retention.disk_low_watermark must not be above disk_high_watermark")
        return self


class Settings(BaseSettings):
    """All gateway settings; see the module docstring for where values come from."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid")

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    ui: UiSettings = Field(default_factory=UiSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def get_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Load the settings from ``config`` (YAML, optional), the environment and ``overrides``.

    Parameters
    ----------
    config
        Path of a YAML settings file; it must exist when given.
    overrides
        Top-level sections or values, e.g. ``dicom={"port": 11113}``; merged over the file and environment.

    Raises
    ------
    FileNotFoundError
        If ``config`` is given but does not exist.
    pydantic.ValidationError
        If a value is invalid; the message names the setting.
    """
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"config file not found: {config}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=config, title="Settings")

    return _FromFile(**overrides)
