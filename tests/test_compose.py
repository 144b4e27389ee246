"""docker-compose.yml, Dockerfile and .env.example agree with each other and with the project.

No Docker engine runs here: these checks read the files (PyYAML, a dependency of Prefect) and catch the
mistakes that would only show once `docker compose up` ran: a misspelt service or volume, a URL to the wrong
port, database credentials that differ between PostgreSQL and Prefect, a variable without a default.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from miner.schedule import DEFAULT_POOL

ROOT = Path(__file__).resolve().parent.parent
# ${VAR}, ${VAR:-default} or ${VAR-default}; `$${...}` is an escaped literal left to the container.
_VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def resolve(value: Any, env: dict[str, str] | None = None) -> str:
    """A compose value as `docker compose` would see it with no .env file (or with `env`)."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if env and name in env:
            return env[name]
        return default if default is not None else ""

    return _VARIABLE.sub(substitute, str(value)).replace("$$", "$")


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return [resolve(part) for part in (shlex.split(command) if isinstance(command, str) else command)]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: resolve(value) for key, value in env.items()}


def named(services: dict[str, dict[str, Any]], *words: str) -> str:
    """The one service whose command starts with `words` (e.g. `prefect server start`)."""
    matches = [name for name, service in services.items() if command_of(service)[: len(words)] == list(words)]
    assert len(matches) == 1, (words, matches)
    return matches[0]


def test_every_dependency_is_a_service(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_named_volumes_are_declared_and_used(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    used = set()
    for service in services.values():
        for mount in service.get("volumes", []):
            source = mount["source"] if isinstance(mount, dict) else str(mount).split(":")[0]
            if not source.startswith((".", "/", "~")):  # a bind mount names a path, a volume a name
                used.add(source)
    declared = set(compose.get("volumes") or {})
    assert used == declared, f"used but not declared: {used - declared}; declared but unused: {declared - used}"
    assert {"miner-data", "miner-cache", "miner-runs"} <= used


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_prefect_server_is_published_and_the_worker_points_at_it(services: dict[str, dict[str, Any]]) -> None:
    server = named(services, "prefect", "server", "start")
    port = option(command_of(services[server]), "--port")
    assert port == "4200"
    published = [resolve(entry).split(":")[-1] for entry in services[server].get("ports", [])]
    assert port in published

    worker = named(services, "prefect", "worker", "start")
    api = urlsplit(environment(services[worker])["PREFECT_API_URL"])
    assert (api.hostname, str(api.port), api.path) == (server, port, "/api")
    pool = option(command_of(services[worker]), "--pool")
    assert pool == DEFAULT_POOL, "the worker must serve the pool `miner schedule` registers to by default"
    assert f"localhost:{port}/api/health" in " ".join(services[server]["healthcheck"]["test"])


def test_dask_workers_reach_the_scheduler(services: dict[str, dict[str, Any]]) -> None:
    scheduler = named(services, "dask", "scheduler")
    port = option(command_of(services[scheduler]), "--port")
    workers = [name for name, service in services.items() if command_of(service)[:2] == ["dask", "worker"]]
    assert len(workers) == 2
    for name in workers:
        address = urlsplit(command_of(services[name])[2])
        assert (address.scheme, address.hostname, str(address.port)) == ("tcp", scheduler, port), name
        assert scheduler in services[name].get("depends_on", {}), name


def test_prefect_database_is_the_postgres_service(services: dict[str, dict[str, Any]]) -> None:
    postgres = next(name for name, service in services.items() if "postgres" in service.get("image", ""))
    server = named(services, "prefect", "server", "start")
    raw_url = services[server]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    url = urlsplit(resolve(raw_url))
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port) == (postgres, 5432)
    database = environment(services[postgres])
    assert (url.username, url.password, url.path.lstrip("/")) == (
        database["POSTGRES_USER"],
        database["POSTGRES_PASSWORD"],
        database["POSTGRES_DB"],
    )
    # The same variables, not just equal defaults: changing one in .env changes both sides.
    changed = {"POSTGRES_USER": "u1", "POSTGRES_PASSWORD": "p1", "POSTGRES_DB": "d1"}
    url = urlsplit(resolve(raw_url, changed))
    postgres_env = {key: resolve(value, changed) for key, value in services[postgres]["environment"].items()}
    assert (url.username, url.password, url.path.lstrip("/")) == tuple(postgres_env[key] for key in changed)
    assert postgres in services[server]["depends_on"]


def test_variables_have_defaults_and_are_documented(compose_text: str, env_example: dict[str, str]) -> None:
    used: dict[str, set[str]] = {}
    for match in _VARIABLE.finditer(compose_text):
        used.setdefault(match["name"], set()).add(match["default"])
    for name, defaults in used.items():
        assert name in env_example, f"${{{name}}} is not documented in .env.example"
        # .env.example shows the value that applies when the variable is unset.
        assert {default for default in defaults if default is not None} <= {env_example[name]}, name
    assert set(env_example) <= set(used), f"documented but unused: {set(env_example) - set(used)}"


def test_built_services_use_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    built = {name: service["build"] for name, service in services.items() if "build" in service}
    assert {named(services, "prefect", "worker", "start"), named(services, "dask", "scheduler")} <= set(built)
    for name, build in built.items():
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"{name} builds from missing {dockerfile}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_installs_from_the_lock_and_runs_a_project_script() -> None:
    instructions = dockerfile_instructions()
    base = next(argument for keyword, argument in instructions if keyword == "FROM")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    python = re.search(r"python:(\d+\.\d+)", base)
    assert python and f">={python[1]}" in pyproject["project"]["requires-python"]

    runs = " ".join(argument for keyword, argument in instructions if keyword == "RUN")
    install = re.search(r"pip install ([^&]*)", runs)
    assert install, "no pip install in the Dockerfile"
    words = install[1].split()
    assert words[words.index("-c") + 1] == "requirements.lock"
    assert "." in words  # the project itself, not only its dependencies
    # torch is pinned to its CPU build, which only the PyTorch CPU index serves.
    assert "torch==2.13.0+cpu" in (ROOT / "requirements.lock").read_text(encoding="utf-8").split()
    assert words[words.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"

    for keyword, argument in instructions:
        if keyword == "COPY":
            for source in argument.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY of missing {source}"

    command = next(argument for keyword, argument in reversed(instructions) if keyword == "CMD")
    assert yaml.safe_load(command)[0] in pyproject["project"]["scripts"]


def test_published_ports_bind_to_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    published = [resolve(entry) for service in services.values() for entry in service.get("ports", [])]
    assert published
    assert all(entry.startswith("127.0.0.1:") for entry in published), published
