"""docker/: what can be checked of the images, the compose file and the systemd unit without a container engine.

No image is built here (these machines have no container engine, registry, ``hadolint`` or ``docker compose``). So
this reads the files and holds them to the gateway itself: every ``COPY`` source is in the build context, the images
install through the Makefile's recipes (the ones CI runs), their ports, volume and health check are the settings'
defaults, the compose services agree with each other and with the settings, and every ``gateway serve`` option used
is one the CLI accepts. One test rehearses a container without one: ``gateway serve`` with the image's environment
and the compose settings, asked by the image's own ``HEALTHCHECK`` command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from gateway.api.auth import anonymous_read_allowed
from gateway.config import ROLES, Settings, get_settings, hash_token
from gateway.registry.registry import shipped_models_dir

from peers import PeerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
GATEWAY_SCRIPT = Path(sys.executable).with_name("gateway")
GATEWAY_SERVICES = ("gateway", "worker-gpu", "worker-cpu")
_SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET", "KEY")


# --- reading the files ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined; ``stage`` counts FROMs from 0 (-1: before the first)."""

    keyword: str
    args: str
    stage: int


def dockerfile(name: str) -> list[Instruction]:
    """The instructions of ``docker/NAME``: comments and blank lines dropped, ``\\`` continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in (DOCKER / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{name} ends inside a continued line"
    found, stage = [], -1
    for text in logical:
        keyword, _, args = text.partition(" ")
        stage += keyword.upper() == "FROM"
        found.append(Instruction(keyword.upper(), args.strip(), stage))
    return found


def instructions(name: str, keyword: str, stage: int | None = None) -> list[Instruction]:
    """The ``keyword`` instructions of ``name`` (of one stage, if given)."""
    return [i for i in dockerfile(name) if i.keyword == keyword and (stage is None or i.stage == stage)]


def final_stage(name: str) -> int:
    return max(i.stage for i in dockerfile(name))


def without_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """``--flag=value`` options (COPY --from=build) and the remaining words."""
    flags, words = {}, []
    for word in shlex.split(args):
        if word.startswith("--"):
            key, _, value = word[2:].partition("=")
            flags[key] = value
        else:
            words.append(word)
    return flags, words


def arg_defaults(name: str, stage: int) -> dict[str, str]:
    """``ARG NAME=default`` of one stage."""
    found = {}
    for arg in instructions(name, "ARG", stage):
        key, _, value = arg.args.partition("=")
        found[key] = value
    return found


def image_env(name: str) -> dict[str, str]:
    """The final stage's ``ENV`` (``KEY=value`` pairs)."""
    env: dict[str, str] = {}
    for item in instructions(name, "ENV", final_stage(name)):
        for word in shlex.split(item.args):
            key, sep, value = word.partition("=")
            assert sep, f"{name}: ENV {item.args!r}: write KEY=value"
            env[key] = value
    return env


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """``.dockerignore``'s patterns in order: (negated, regex), with Docker's meaning of ``*``, ``**`` and ``?``."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, _glob(line.lstrip("!").strip("/"))))
    return patterns


def _glob(pattern: str) -> re.Pattern[str]:
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex + r"\Z")


def in_context(path: str, patterns: Sequence[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether ``path`` (relative to the root) reaches the build context: the last pattern matching it or a folder
    above it decides, as in Docker."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return not excluded


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.\-/$()]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def makefile_variables() -> set[str]:
    return set(re.findall(r"^([A-Z_]+)\s*[?:]?=", (ROOT / "Makefile").read_text(), re.M))


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def service_dockerfile(name: str) -> str:
    """The Dockerfile (its name in docker/) a compose service is built from."""
    build = service(name)["build"]
    assert (DOCKER / build["context"]).resolve() == ROOT, f"{name}: the build context must be the repository root"
    path = (ROOT / build["dockerfile"]).resolve()
    assert path.parent == DOCKER, f"{name}: {build['dockerfile']} is not in docker/"
    return path.name


def mounts(name: str) -> dict[str, str]:
    """A service's volumes: container path -> source (a named volume or a path)."""
    found = {}
    for entry in service(name).get("volumes", []):
        source, target, *_ = entry.split(":")
        found[target] = source
    return found


def published(name: str) -> dict[int, str]:
    """A service's ports: container port -> the host side (``[ADDRESS:]PORT``)."""
    found = {}
    for entry in service(name).get("ports", []):
        host, _, container = str(entry).rpartition(":")
        found[int(container)] = host
    return found


def systemd_unit() -> dict[str, dict[str, str]]:
    """``docker/gateway.service``: section -> key -> value (each key once)."""
    sections: dict[str, dict[str, str]] = {}
    section = ""
    for raw in (DOCKER / "gateway.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            sections.setdefault(section, {})
            continue
        assert section, f"{line!r} is outside a section"
        key, _, value = line.partition("=")
        assert key not in sections[section], f"{key} twice in [{section}]"
        sections[section][key] = value
    return sections


@pytest.fixture(scope="module")
def defaults() -> Settings:
    """The gateway's defaults: ``Settings()`` without any ``GATEWAY_*`` variable of this environment."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
            patch.delenv(key)
        return Settings()


@pytest.fixture(scope="module")
def serve_options() -> set[str]:
    """The options ``gateway serve --help`` lists."""
    done = subprocess.run(
        [str(GATEWAY_SCRIPT), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
    )
    assert done.returncode == 0, done.stderr
    options = set(re.findall(r"^[\W]*(--[a-z][a-z0-9-]*)", done.stdout, re.M))
    assert {"--config", "--role", "--help"} <= options, done.stdout
    return options


# --- the images ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_is_in_the_build_context(name: str) -> None:
    patterns = dockerignore()
    copies = [i for i in dockerfile(name) if i.keyword in ("COPY", "ADD")]
    assert copies
    sources = []
    for copy in copies:
        flags, words = without_flags(copy.args)
        if "from" in flags:  # from another stage, not the context
            continue
        sources += words[:-1]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"{name}: COPY {source}: no such file or folder in the repository"
        assert in_context(source, patterns), f"{name}: COPY {source}: .dockerignore leaves it out of the context"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in file.parts or file.suffix == ".pyc":
                assert not in_context(relative, patterns), f"{relative} would reach the build context"
            else:
                assert in_context(relative, patterns), f"{name}: .dockerignore leaves {relative} out of COPY {source}"
    # The shipped models (models.register_shipped) are found beside the gateway package, so the image needs them.
    assert shipped_models_dir(Settings.model_fields["models"].default_factory()).relative_to(ROOT).name in sources


def test_the_build_context_holds_no_data_environment_or_tests() -> None:
    patterns = dockerignore()
    for path in (".venv/bin/python", "gateway-data/index.sqlite3", "tests/conftest.py", "docker/.env", ".git/config"):
        assert not in_context(path, patterns), f"{path} would reach the build context"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_are_multi_stage_and_run_as_a_fixed_user_that_is_not_root(name: str) -> None:
    stages = instructions(name, "FROM")
    assert len(stages) >= 2, f"{name} is not multi-stage"
    users = instructions(name, "USER")
    assert users, f"{name} runs as root"
    last = users[-1]
    assert last.stage == final_stage(name), f"{name}: USER is not in the final stage"
    uid = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults(name, last.stage)[m.group(1)], last.args).split(":")[0]
    assert uid.isdigit(), f"{name}: USER {last.args}: a numeric uid (what Kubernetes' runAsNonRoot can check)"
    assert int(uid) != 0


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_expose_the_default_ports_and_keep_the_data_folder_on_the_volume(name: str, defaults: Settings) -> None:
    exposed = {port for e in instructions(name, "EXPOSE") for port in e.args.split()}
    assert {str(defaults.dicom.port), str(defaults.http.port)} <= exposed
    env = image_env(name)
    data_dir = env["GATEWAY_STORE__DATA_DIR"]
    volumes = [v for e in instructions(name, "VOLUME") for v in json.loads(e.args)]
    assert data_dir in volumes, f"{name}: the data folder {data_dir} is not a VOLUME"
    # Everything the process writes is on the volume, so that the root file system can be read-only.
    for key in ("TMPDIR", "XDG_CACHE_HOME", "HOME"):
        assert Path(env[key]).is_relative_to(data_dir), f"{name}: {key}={env[key]} is not on the volume"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_bake_in_no_secret(name: str) -> None:
    for item in instructions(name, "ENV") + instructions(name, "ARG"):
        for word in shlex.split(item.args):
            key = word.partition("=")[0].upper()
            assert not any(w in key for w in _SECRET_WORDS), f"{name}: {item.keyword} {key} looks like a secret"
    runs = " ".join(i.args for i in instructions(name, "RUN"))
    assert "pip.conf" not in runs or "type=secret" in runs, f"{name}: pip's configuration must come as a build secret"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_asks_healthz_on_the_default_port_and_may_without_a_token(name: str, defaults: Settings) -> None:
    (check,) = instructions(name, "HEALTHCHECK", final_stage(name))
    command = json.loads(check.args.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{defaults.http.port}/healthz" in command[2]
    # The image's settings let its own loopback client read without a token, also once http.tokens are configured
    # (which http.host 0.0.0.0 requires); without GATEWAY_HTTP__ANONYMOUS_READ the check would get 401.
    env = image_env(name)
    token = {"name": "ops", "sha256": hash_token("x"), "scopes": ["read"]}
    assert env["GATEWAY_HTTP__HOST"] == "0.0.0.0"
    http = {"host": env["GATEWAY_HTTP__HOST"], "tokens": [token]}
    with_image = get_settings(http={**http, "anonymous_read": env["GATEWAY_HTTP__ANONYMOUS_READ"]})
    assert anonymous_read_allowed(with_image.http)
    assert not anonymous_read_allowed(get_settings(http=http).http)


def shell_commands(run: Instruction) -> Iterator[list[str]]:
    """The simple commands of a shell-form RUN (its ``--mount`` options dropped), split at ``&&``, ``||`` and ``;``."""
    text = re.sub(r"^(\s*--\S+)+", "", run.args)
    for command in re.split(r"&&|\|\||;", text):
        if command.strip():
            yield shlex.split(command)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_python_packages_are_installed_only_through_make_targets(name: str) -> None:
    targets, variables = makefile_targets(), makefile_variables()
    makes = []
    for run in instructions(name, "RUN"):
        for words in shell_commands(run):
            program = Path(words[0]).name
            assert program not in ("pip", "pip3") and words[1:3] != ["-m", "pip"], f"{name}: {words}: pip, not make"
            if program != "make":
                continue
            goals = [w for w in words[1:] if not w.startswith(("-", "$")) and "=" not in w]
            assert goals and set(goals) <= targets, f"{name}: {words}: no such target"
            # NAME=value, or ${ARG:+NAME=$ARG} (only when the build argument is given)
            overrides = [re.match(r"(?:\$\{\w+:\+)?(\w+)=", w) for w in words[1:] if "=" in w]
            assert all(overrides), f"{name}: {words}: an argument of make that is not NAME=value"
            assert {m.group(1) for m in overrides if m} <= variables, f"{name}: {words}: not a Makefile variable"
            makes += goals
    assert makes, f"{name} installs nothing through make"
    # The virtual environment the recipe makes (VENV) is the one on the image's PATH.
    venv = re.search(r"^VENV\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert venv is not None
    workdir = instructions(name, "WORKDIR", 0)[-1].args
    assert f"{workdir}/{venv.group(1)}/bin" in image_env(name)["PATH"].split(":")


def make_dry_run(folder: Path, target: str, done: Sequence[str] = ()) -> list[str]:
    """The commands ``make TARGET`` would run in a fresh checkout, with the ``.venv`` stamps in ``done`` made."""
    folder.mkdir(exist_ok=True)
    shutil.copy(ROOT / "Makefile", folder / "Makefile")
    (folder / "pyproject.toml").write_text("")
    os.utime(folder / "pyproject.toml", (1_000_000_000, 1_000_000_000))
    (folder / ".venv").mkdir(exist_ok=True)
    for n, stamp in enumerate(done, start=1):
        (folder / ".venv" / stamp).touch()
        os.utime(folder / ".venv" / stamp, (1_000_000_000 + n, 1_000_000_000 + n))
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(folder), target, "PYTHON=python3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_images_install_what_ci_installs(tmp_path: Path) -> None:
    fresh = make_dry_run(tmp_path / "venv", "venv")  # the venv, torch at the pinned release, the project
    assert any("install -q 'torch==" in line for line in fresh)
    ci = make_dry_run(tmp_path / "ci", ".venv/.installed-test")  # what make test installs
    image = make_dry_run(tmp_path / "image", "install-runtime")
    assert ci[: len(fresh)] == fresh
    assert image[: len(fresh)] == fresh
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for line in image[len(fresh) :]:
        for extra in re.findall(r"-e '\.\[([\w,]+)\]'", line):
            assert set(extra.split(",")) <= set(extras)
            assert not {"test", "lint", "bench"} & set(extra.split(",")), "the image installs test tools"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_gpu_image_swaps_in_cuda_builds_with_install_gpus_own_lines(tmp_path: Path) -> None:
    gpu_server = make_dry_run(tmp_path / "a", "install-gpu", [".created", ".installed", ".installed-test"])
    gpu_image = make_dry_run(tmp_path / "b", "install-runtime-gpu", [".created", ".installed", ".installed-runtime"])
    assert gpu_image == gpu_server
    assert any("onnxruntime-gpu" in line for line in gpu_image)


# --- compose --------------------------------------------------------------------------------------------------------


def test_compose_publishes_the_gateways_default_ports(defaults: Settings) -> None:
    ports = published("gateway")
    assert set(ports) == {defaults.dicom.port, defaults.http.port}
    assert ports[defaults.http.port].startswith("127.0.0.1:"), "HTTP is published on the host's loopback only"
    for name in ("gateway", "worker-gpu", "worker-cpu"):
        assert service_dockerfile(name) in DOCKERFILES
    assert not published("worker-gpu") and not published("worker-cpu") and not published("postgres")


def test_compose_volumes_are_named_declared_and_the_data_folder_is_shared(defaults: Settings) -> None:
    declared = set(compose()["volumes"])
    used: set[str] = set()
    for name in compose()["services"]:
        for target, source in mounts(name).items():
            if source.startswith((".", "/")):
                assert (DOCKER / source).is_file(), f"{name}: mounts {source}, which is not in docker/"
            else:
                used.add(source)
                assert source in declared, f"{name}: volume {source} is not declared"
            assert target.startswith("/")
    assert used == declared, "a declared volume is used by no service"
    data = {mounts(name)[image_env(service_dockerfile(name))["GATEWAY_STORE__DATA_DIR"]] for name in GATEWAY_SERVICES}
    assert len(data) == 1, "the gateway processes must share one data folder"


def test_compose_health_checks() -> None:
    for name in GATEWAY_SERVICES:  # the image's HEALTHCHECK (/healthz) applies unless a service replaces it
        check = service(name).get("healthcheck")
        assert check is None or any("/healthz" in str(part) for part in check["test"])
    test = service("postgres")["healthcheck"]["test"]
    assert "pg_isready" in test
    assert service("gateway")["depends_on"]["postgres"]["condition"] == "service_healthy"


def compose_settings_file() -> Path:
    """The settings file the gateway services mount, found through their ``--config`` and the mount."""
    command = service("gateway")["command"]
    config = command[command.index("--config") + 1]
    source = mounts("gateway")[config]
    assert all(mounts(name).get(config) == source for name in GATEWAY_SERVICES)
    return DOCKER / source


def test_compose_database_url_is_the_postgres_service() -> None:
    url = make_url(yaml.safe_load(compose_settings_file().read_text())["store"]["database_url"])
    env = service("postgres")["environment"]
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "postgres"
    assert url.username == env["POSTGRES_USER"]
    assert url.database == env["POSTGRES_DB"]
    assert url.port in (None, 5432)
    assert url.password is None, "the password comes from PGPASSWORD, not the URL"
    assert "--port" in service("postgres")["healthcheck"]["test"]
    healthcheck = service("postgres")["healthcheck"]["test"]
    assert healthcheck[healthcheck.index("--port") + 1] == str(url.port or 5432)
    # No secret in the file: the password is asked of docker/.env (compose fails with the message when unset).
    for name, spec in compose()["services"].items():
        for key, value in (spec.get("environment") or {}).items():
            if any(w in key.upper() for w in _SECRET_WORDS):
                assert re.fullmatch(r"\$\{\w+:\?.+\}", str(value)), f"{name}: {key} is a literal"
    assert service("gateway")["environment"]["PGPASSWORD"] == env["POSTGRES_PASSWORD"]


def test_the_gpu_worker_reserves_a_gpu() -> None:
    worker = service("worker-gpu")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    assert service_dockerfile("worker-gpu") == "Dockerfile.cuda"
    command = worker["command"]
    assert command[command.index("--role") + 1] == "worker"
    assert re.fullmatch(r"cuda(:\d+)?", command[command.index("--device") + 1])


def serve_commands() -> Iterator[tuple[str, list[str]]]:
    for name in GATEWAY_SERVICES:
        yield f"compose {name}", [str(w) for w in service(name)["command"]]
    yield "gateway.service", shlex.split(systemd_unit()["Service"]["ExecStart"])


def test_every_serve_invocation_uses_options_the_cli_accepts(serve_options: set[str]) -> None:
    for where, command in serve_commands():
        assert Path(command[0]).name == "gateway" and command[1] == "serve", f"{where}: {command}"
        options = [w for w in command[2:] if w.startswith("-")]
        assert options
        for option in options:
            assert option.split("=")[0] in serve_options, f"{where}: gateway serve has no {option}"
        if "--role" in command:
            roles = command[command.index("--role") + 1].split(",")
            assert set(roles) <= set(ROLES), f"{where}: --role {roles}"
        if "--device" in command:
            assert re.fullmatch(r"auto|cpu|cuda(:\d+)?", command[command.index("--device") + 1])


def test_the_systemd_unit_keeps_config_and_data_where_it_may() -> None:
    unit = systemd_unit()["Service"]
    command = shlex.split(unit["ExecStart"])
    assert Path(command[0]).is_absolute()
    config, data = Path(command[command.index("--config") + 1]), Path(command[command.index("--data-dir") + 1])
    assert config.parent == Path("/etc") / unit["ConfigurationDirectory"]
    assert data == Path("/var/lib") / unit["StateDirectory"]
    assert unit["User"] not in ("root", "0")
    assert unit["ProtectSystem"] == "strict" and unit["NoNewPrivileges"] == "yes"


def image_settings(env: Mapping[str, str], config: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("GATEWAY_"):
            monkeypatch.setenv(key, value)
    return get_settings(config)


def with_token(source: Path, folder: Path, **store: object) -> Path:
    """A copy of a compose settings file with one read token, as docs/deployment.md asks before the first start."""
    settings = yaml.safe_load(source.read_text())
    settings["http"]["tokens"] = [{"name": "ops", "sha256": hash_token("a-token"), "scopes": ["read"]}]
    settings["store"].update(store)
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_the_compose_settings_load_with_the_images_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = image_env("Dockerfile")
    with pytest.raises(ValueError, match=r"http\.tokens"):  # as shipped: the gateway asks for a token first
        image_settings(env, compose_settings_file(), monkeypatch)
    settings = image_settings(env, with_token(compose_settings_file(), tmp_path), monkeypatch)
    assert settings.http.host == "0.0.0.0" and anonymous_read_allowed(settings.http)
    assert settings.store.data_dir == Path(env["GATEWAY_STORE__DATA_DIR"])
    # Return to sender: Orthanc's AE title maps to a destination that is the orthanc service's DICOM port.
    orthanc = json.loads((DOCKER / "orthanc.json").read_text())
    destination = settings.export.destinations[settings.export.return_to_sender[orthanc["DicomAet"]]]
    assert (destination.ae_title, destination.host, destination.port) == (
        orthanc["DicomAet"],
        "orthanc",
        orthanc["DicomPort"],
    )
    # ... and Orthanc's modality "gateway" is the gateway service's listener.
    aet, host, port = orthanc["DicomModalities"]["gateway"]
    assert (aet, host, port) == (settings.dicom.ae_title, "gateway", settings.dicom.port)


def test_orthanc_routes_to_the_gateway_modality_it_knows() -> None:
    orthanc = json.loads((DOCKER / "orthanc.json").read_text())
    targets = mounts("orthanc")
    for script in orthanc["LuaScripts"]:
        assert script in targets, f"Orthanc loads {script}, which compose does not mount"
        lua = (DOCKER / targets[script]).read_text()
        for modality in re.findall(r"/modalities/(\w+)/store", lua):
            assert modality in orthanc["DicomModalities"]
    config_mounts = [t for t in targets if t.startswith("/etc/orthanc/") and t.endswith(".json")]
    assert config_mounts and all(targets[t] == "./orthanc.json" for t in config_mounts)


# --- a container rehearsed without one ------------------------------------------------------------------------


class ContainerRehearsal(PeerProcess):
    """The compose ``gateway`` service's command as the image would run it: the image's ``GATEWAY_*`` environment
    with ``/data`` moved to a temporary folder, the compose settings (SQLite instead of the postgres service), free
    ports in place of the defaults."""

    name = "gateway-container"

    def __init__(self, tmpdir: Path, data_dir: Path, config: Path) -> None:
        super().__init__(tmpdir)
        self.http_port, self.dicom_port = free_port(), free_port()
        image = image_env("Dockerfile")
        volume = image["GATEWAY_STORE__DATA_DIR"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        for key, value in image.items():
            if key.startswith("GATEWAY_") or key in ("TMPDIR", "XDG_CACHE_HOME"):
                self.env[key] = value.replace(volume, str(data_dir), 1) if value.startswith(volume) else value
        self.env["GATEWAY_STORE__MIN_FREE_BYTES"] = "0"  # this machine's free disk space is not under test
        self.env["GATEWAY_MODELS__REGISTER_SHIPPED"] = "false"  # nor are the shipped models' dry runs
        command = [str(w) for w in service("gateway")["command"]]
        command[command.index("--config") + 1] = str(config)
        self.command = [str(GATEWAY_SCRIPT), *command[1:], "--http-port", str(self.http_port)]
        self.command += ["--dicom-port", str(self.dicom_port)]

    def _command(self) -> Sequence[str]:
        return self.command

    def _env(self) -> Mapping[str, str]:
        return self.env

    def _ready(self) -> bool:
        try:
            httpx.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2)
        except httpx.TransportError:
            return False
        return True


def run_healthcheck(port: int, defaults: Settings) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, aimed at ``port`` instead of the default one."""
    (check,) = instructions("Dockerfile", "HEALTHCHECK")
    program, flag, code = json.loads(check.args.split(" CMD ", 1)[1])
    assert program == "python"  # the virtual environment's, first on the image's PATH
    code = code.replace(f":{defaults.http.port}/", f":{port}/")
    return subprocess.run([sys.executable, flag, code], capture_output=True, text=True, timeout=30)


def test_a_rehearsed_container_passes_its_healthcheck_and_logs_a_working_admin_token(
    tmp_path: Path, defaults: Settings
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = with_token(compose_settings_file(), tmp_path, database_url=None)
    with ContainerRehearsal(tmp_path, data_dir, config) as container:
        check = run_healthcheck(container.http_port, defaults)
        assert check.returncode == 0, check.stderr
        assert run_healthcheck(free_port(), defaults).returncode != 0  # nothing listening: unhealthy
        # docs/deployment.md: `docker compose logs gateway | grep -A2 "admin token"` shows it.
        lines = container.log_path.read_text().splitlines()
        (at,) = [n for n, line in enumerate(lines) if "admin token" in line and "shown this once" in line]
        (token,) = [w for line in lines[at + 1 : at + 3] for w in line.split() if len(w) >= 40]
        headers = {"Authorization": f"Bearer {token}"}
        answer = httpx.get(f"http://127.0.0.1:{container.http_port}/api/workers", headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
