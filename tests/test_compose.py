"""docker-compose.yml, Dockerfile and .env.example agree with each other and with the project.

These checks read the files (PyYAML, a dependency of Prefect), in seconds and without Docker, and catch the
mistakes that would only show once `docker-compose up` ran: a misspelt service or volume, a URL to the wrong
port, database credentials that differ between PostgreSQL and Prefect, a variable without a default, a secret
with one, a port open beyond loopback, a root user. tests/test_stack.py runs the stack itself.
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
# ${VAR}, ${VAR:-default}, ${VAR-default} or ${VAR:?message}; `$${...}` is an escaped literal left to the container.
_VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")
# Read by docker-compose itself, not by the file.
_COMPOSE_OWN = {"COMPOSE_PROJECT_NAME"}


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
    """A compose value as `docker-compose` would see it with no .env file (or with `env`); a required variable
    (`:?`) that `env` lacks reads as `<NAME>`."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if env and name in env:
            return env[name]
        if match["op"] and match["op"].endswith("?"):
            return f"<{name}>"
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
    required = set()
    for match in _VARIABLE.finditer(compose_text):
        if match["op"] and match["op"].endswith("?"):
            required.add(match["name"])
        else:
            used.setdefault(match["name"], set()).add(match["default"])
    for name, defaults in used.items():
        assert name in env_example, f"${{{name}}} is not documented in .env.example"
        # .env.example shows the value that applies when the variable is unset.
        assert {default for default in defaults if default is not None} <= {env_example[name]}, name
    for name in required:
        # Listed, so that `cp .env.example .env` gives the line to fill, but with no usable value.
        assert env_example.get(name) == "", f"{name} must be in .env.example with an empty value"
    assert not required & set(used), f"required in one place, defaulted in another: {required & set(used)}"
    documented = set(env_example) - _COMPOSE_OWN
    assert documented <= set(used) | required, f"documented but unused: {documented - set(used) - required}"


def test_built_services_use_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    built = {name: service["build"] for name, service in services.items() if "build" in service}
    assert {named(services, "prefect", "worker", "start"), named(services, "dask", "scheduler")} <= set(built)
    for name, build in built.items():
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"{name} builds from missing {dockerfile}"


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def arguments(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(argument.split("=", 1) for keyword, argument in instructions if keyword == "ARG" and "=" in argument)


def test_dockerfile_installs_from_the_lock_and_runs_a_project_script() -> None:
    instructions = dockerfile_instructions()
    args = arguments(instructions)
    bases = [argument.split()[0] for keyword, argument in instructions if keyword == "FROM"]
    # Parametrised, so that docker/build-images.sh can pass a base made without a registry.
    assert set(bases) == {"${BASE_IMAGE}"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    python = re.search(r"python:(\d+\.\d+)", args["BASE_IMAGE"])
    assert python and f">={python[1]}" in pyproject["project"]["requires-python"]

    installs = [re.search(r"pip install ([^&;]*)", argument) for keyword, argument in instructions if keyword == "RUN"]
    dependencies, project = [match[1].split() for match in installs if match]
    assert dependencies[dependencies.index("-c") + 1] == "requirements.lock"
    assert dependencies[dependencies.index("-r") + 1] == "dependencies.txt"  # pyproject's dependencies
    assert project[-1] == "/src" and "--no-deps" in project  # the project itself, on top
    # torch is pinned to its CPU build, which only the PyTorch CPU index serves.
    assert "torch==2.13.0+cpu" in (ROOT / "requirements.lock").read_text(encoding="utf-8").split()
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(argument for keyword, argument in instructions if keyword == "RUN")
    assert "--extra-index-url $TORCH_INDEX" in runs and "--no-index --find-links /wheelhouse" in runs

    for keyword, argument in instructions:
        if keyword == "COPY" and not argument.startswith("--from"):
            for source in argument.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY of missing {source}"

    command = next(argument for keyword, argument in reversed(instructions) if keyword == "CMD")
    assert yaml.safe_load(command)[0] in pyproject["project"]["scripts"]


def test_images_run_as_a_user_other_than_root() -> None:
    for path in (ROOT / "Dockerfile", ROOT / "docker" / "postgres" / "Dockerfile"):
        users = [argument.strip() for keyword, argument in dockerfile_instructions(path) if keyword == "USER"]
        assert users and users[-1] not in {"root", "0"}, path


def test_secrets_have_no_default(compose_text: str, services: dict[str, dict[str, Any]]) -> None:
    """Compose stops with the message unless the password and the API's auth string are set."""
    secrets = [m for m in _VARIABLE.finditer(compose_text) if re.search("PASSWORD|AUTH_STRING", m["name"])]
    assert {m["name"] for m in secrets} == {"POSTGRES_PASSWORD", "PREFECT_API_AUTH_STRING"}
    for match in secrets:
        assert match["op"] == ":?" and f"set {match['name']} in .env" in match["default"], match[0]
    server = named(services, "prefect", "server", "start")
    assert environment(services[server])["PREFECT_SERVER_API_AUTH_STRING"] == "<PREFECT_API_AUTH_STRING>"
    clients = [name for name, service in services.items() if "PREFECT_API_URL" in environment(service)]
    assert named(services, "prefect", "worker", "start") in clients
    assert len([name for name in clients if command_of(services[name])[:2] == ["dask", "worker"]]) == 2
    for name in clients:
        assert environment(services[name])["PREFECT_API_AUTH_STRING"] == "<PREFECT_API_AUTH_STRING>", name


def test_database_and_dask_scheduler_stay_on_the_compose_network(services: dict[str, dict[str, Any]]) -> None:
    postgres = next(name for name, service in services.items() if "postgres" in service.get("image", ""))
    assert not services[postgres].get("ports")
    scheduler = named(services, "dask", "scheduler")
    port = option(command_of(services[scheduler]), "--port")
    published = [resolve(entry) for entry in services[scheduler].get("ports", [])]
    assert not [entry for entry in published if entry.split(":")[-1] == port]
    # The dashboard has no login: loopback even when BIND_ADDRESS opens the Prefect port.
    assert all(resolve(entry, {"BIND_ADDRESS": "0.0.0.0"}).startswith("127.0.0.1:") for entry in published)


def test_published_ports_bind_to_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    published = [resolve(entry) for service in services.values() for entry in service.get("ports", [])]
    assert published
    assert all(entry.startswith("127.0.0.1:") for entry in published), published
