"""deploy/compose.yaml and deploy/Dockerfile agree with the code they ship.

No Docker needed: the files are parsed and checked against pyproject.toml and `Settings`.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from nhi.infra.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

OUR_SERVICES = ("migrate", "worker", "api")


# ---- parsing helpers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict) and found, "compose.yaml defines no services"
    return found


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuations joined."""
    joined: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    result = []
    for line in joined:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def _args(args: str) -> list[str]:
    """Exec-form (JSON array) or shell-form arguments as a list."""
    if args.startswith("["):
        parsed = json.loads(args)
        assert isinstance(parsed, list)
        return [str(a) for a in parsed]
    return shlex.split(args)


def _env(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) for item in env]
        return {p[0]: (p[1] if len(p) == 2 else None) for p in pairs}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return {name: (spec or {"condition": "service_started"}) for name, spec in deps.items()}


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set in the environment: the default."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


def _ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(published, target) pairs from short ("8000:8000") or long syntax."""
    pairs = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            pairs.append((int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {port!r} is not published to the host"
        pairs.append((int(parts[-2]), int(parts[-1])))
    return pairs


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _default_cmd(instructions: list[tuple[str, str]]) -> list[str]:
    cmds = [args for kw, args in instructions if kw == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    return _args(cmds[-1])  # only the last CMD counts


# ---- our image --------------------------------------------------------------------------------
def test_files_exist() -> None:
    assert COMPOSE.is_file()
    assert DOCKERFILE.is_file()


def test_our_services_share_one_image_built_from_the_repo(
    services: dict[str, dict[str, Any]],
) -> None:
    builders = {name for name, svc in services.items() if "build" in svc}
    assert set(OUR_SERVICES) <= builders, f"not built from our Dockerfile: {set(OUR_SERVICES)}"
    images = {services[name].get("image") for name in builders}
    assert len(images) == 1 and None not in images, f"one image name for all builds: {images}"
    for name in builders:
        build = services[name]["build"]
        if isinstance(build, str):
            build = {"context": build}
        context = (COMPOSE.parent / build.get("context", ".")).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repository root"
        dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
        assert dockerfile == DOCKERFILE.resolve(), f"{name}: builds {dockerfile}"
        assert dockerfile.is_file()


def test_dockerfile_copies_every_package_and_the_worker(
    instructions: list[tuple[str, str]],
) -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    wanted = {pkg.split(".")[0] for pkg in setuptools["packages"]}
    wanted |= {f"{mod}.py" for mod in setuptools.get("py-modules", [])}
    assert "worker.py" in wanted

    copied: set[str] = set()
    for keyword, args in instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        argv = [a for a in _args(args) if not a.startswith("--")]
        assert len(argv) >= 2, f"{keyword} {args}: needs a source and a destination"
        for source in argv[:-1]:
            name = source.removeprefix("./").rstrip("/")
            assert (ROOT / name).exists(), f"Dockerfile copies {source}, missing from the repo"
            copied.add(name)
    missing = wanted - copied
    assert not missing, f"Dockerfile does not copy {sorted(missing)}"


def test_dockerfile_installs_the_project_without_extras_and_runs_unprivileged(
    instructions: list[tuple[str, str]],
) -> None:
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert froms and froms[0].split()[0].startswith("python:3.11"), froms
    runs = [args for kw, args in instructions if kw == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert any("." in shlex.split(r.replace("&&", " ")) for r in installs), (
        "no `pip install .` of the project"
    )
    for run in installs:
        assert not re.search(r"\[(dev|test)", run), f"dev/test extras installed: {run}"
        assert " -e " not in f" {run} ", f"editable install in the image: {run}"
    users = [args for kw, args in instructions if kw == "USER"]
    assert users, "Dockerfile never leaves root"
    assert users[-1].split(":")[0] not in ("root", "0")


# ---- configuration ----------------------------------------------------------------------------
def test_every_nhi_variable_is_a_settings_field(services: dict[str, dict[str, Any]]) -> None:
    unknown = {
        f"{name}: {var}"
        for name, svc in services.items()
        for var in _env(svc)
        if var.startswith("NHI_") and var.removeprefix("NHI_").lower() not in Settings.model_fields
    }
    assert not unknown, f"NHI_* variables Settings ignores: {sorted(unknown)}"


def test_our_services_get_valid_settings(services: dict[str, dict[str, Any]]) -> None:
    for name in OUR_SERVICES:
        env = _env(services[name])
        assert {"NHI_DATABASE_URL", "NHI_TEMPORAL_ADDRESS"} <= env.keys(), name
        values = {
            var.removeprefix("NHI_").lower(): _interpolate(value)
            for var, value in env.items()
            if var.startswith("NHI_") and value is not None
        }
        Settings(_env_file=None, **values)  # raises if any value is invalid


def test_database_url_points_at_the_compose_postgres(services: dict[str, dict[str, Any]]) -> None:
    pg_env = {k: _interpolate(v or "") for k, v in _env(services["postgresql"]).items()}
    for name in OUR_SERVICES:
        raw = _env(services[name])["NHI_DATABASE_URL"]
        assert raw is not None
        url = make_url(_interpolate(raw))
        assert url.drivername == "postgresql+psycopg", name
        assert url.host in services, f"{name}: database host {url.host} is not a service"
        assert url.database == pg_env.get("POSTGRES_DB"), name
        assert url.username == pg_env.get("POSTGRES_USER", "postgres"), name
        assert url.password == pg_env.get("POSTGRES_PASSWORD"), name


def test_temporal_persists_to_the_compose_postgres(services: dict[str, dict[str, Any]]) -> None:
    temporal = {k: _interpolate(v or "") for k, v in _env(services["temporal"]).items()}
    pg_env = {k: _interpolate(v or "") for k, v in _env(services["postgresql"]).items()}
    assert services["temporal"]["image"].startswith("temporalio/auto-setup")
    assert temporal["DB"] == "postgres12"
    assert temporal["POSTGRES_SEEDS"] in services
    assert temporal["POSTGRES_USER"] == pg_env["POSTGRES_USER"]
    assert temporal["POSTGRES_PWD"] == pg_env["POSTGRES_PASSWORD"]
    for name in OUR_SERVICES:
        address = _env(services[name])["NHI_TEMPORAL_ADDRESS"]
        assert address is not None
        host, _, port = address.rpartition(":")
        assert host == "temporal" and port == "7233", f"{name}: {address}"


# ---- ordering and commands --------------------------------------------------------------------
def test_depends_on_names_existing_services(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for dep, spec in _depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name, f"{name} depends on itself"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s healthcheck"


def test_api_and_worker_wait_for_migrations(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "worker"):
        spec = _depends_on(services[name]).get("migrate")
        assert spec is not None, f"{name} does not depend on migrate"
        assert spec.get("condition") == "service_completed_successfully", name


def test_commands(services: dict[str, dict[str, Any]]) -> None:
    worker = _command(services["worker"])
    assert worker[:1] in (["python"], ["python3"]) and "worker.py" in worker, worker
    assert (ROOT / "worker.py").is_file()
    assert _command(services["migrate"])[-2:] == ["nhi", "migrate"]
    # A one-shot that restarts would loop on a failed migration and never complete.
    assert services["migrate"].get("restart", "no") in ("no", "on-failure")


def test_api_port_matches_settings_and_command(
    services: dict[str, dict[str, Any]], instructions: list[tuple[str, str]]
) -> None:
    api_port = Settings.model_fields["api_port"].default
    assert api_port == 8000
    for argv in (_default_cmd(instructions), _command(services["api"])):
        if not argv:
            continue  # the api service may rely on the image's CMD
        assert argv[0] == "uvicorn" and "api.app:app" in argv, argv
        assert _option(argv, "--port") == str(api_port), argv
        assert _option(argv, "--host") == "0.0.0.0", argv  # reachable from outside the container
    assert (api_port, api_port) in _ports(services["api"])
    exposed = [p for kw, args in instructions if kw == "EXPOSE" for p in args.split()]
    if exposed:
        assert f"{api_port}" in {p.split("/")[0] for p in exposed}


def test_health_checks_probe_readyz_on_each_process_port(
    services: dict[str, dict[str, Any]], instructions: list[tuple[str, str]]
) -> None:
    worker_env = _env(services["worker"])
    worker_port = int(_interpolate(worker_env.get("NHI_WORKER_HTTP_PORT") or "0"))
    assert worker_port, "the worker's health and metrics server is off in compose"
    assert worker_env.get("NHI_WORKER_HTTP_HOST") == "0.0.0.0"
    api_port = Settings.model_fields["api_port"].default
    for name, port in (("api", api_port), ("worker", worker_port)):
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in probe, (name, probe)
    exposed = {p.split("/")[0] for kw, args in instructions if kw == "EXPOSE" for p in args.split()}
    assert {str(api_port), str(worker_port)} <= exposed
