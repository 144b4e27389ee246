"""docker-compose.yml's stack, run for real: images built without a registry, `docker-compose up`, a scheduled
mining deployment triggered through the stack's authenticated API, sharded over its two Dask workers.

Needs root (debootstrap), a running Docker engine and docker-compose 1.29.2; `.ci/run` installs and starts them.
Deselected by default (pyproject's addopts); run it with `pytest -m stack tests/test_stack.py`. The commands are
docs/compose.md's; the stack runs as its own compose project, on free ports, with secrets made for the test, so a
team stack on the same machine is left alone. Times of each step are printed at the end (`-s` shows them).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "hardneg-miner-stacktest"
SERVICES = ["postgres", "prefect-server", "worker", "dask-scheduler", "dask-worker-1", "dask-worker-2"]
# Cold builds take minutes (debootstrap, the wheelhouse, a 3 GB venv); the stack's first start runs Prefect's
# database migrations.
BUILD_TIMEOUT_S = 40 * 60
HEALTHY_TIMEOUT_S = 6 * 60
RUN_TIMEOUT_S = 15 * 60
TIMES: dict[str, float] = {}
_STATUS = "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"


def team_install(start: str) -> str:
    """The line of the README's team install that starts with `start`, without its comment, and with
    `.venv/bin/` meaning this interpreter's folder (CI's .venv, or whichever venv runs the test)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(part for part in text.split("```bash\n")[1:] if part.startswith("cp .env.example .env"))
    lines = [line for line in block.split("```")[0].splitlines() if line.startswith(start)]
    assert len(lines) == 1, (start, lines)
    return re.sub(r"\s+# .*$", "", lines[0]).replace(".venv/bin/", f"{Path(sys.executable).parent}/")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def other_address() -> str:
    """An address of this host that is not loopback (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: connecting a UDP socket only picks the route
        address = probe.getsockname()[0]
    assert not address.startswith("127."), address
    return address


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


class Stack:
    """`docker-compose` on this project with one env file, outside of the developer's own `.env`."""

    def __init__(self, env_file: Path, values: dict[str, str]) -> None:
        self.env_file = env_file
        self.values = values

    def environment(self) -> dict[str, str]:
        # The env file decides, not whatever the developer's shell exports.
        return {k: v for k, v in os.environ.items() if k not in self.values}

    def options(self) -> list[str]:
        return ["-f", str(ROOT / "docker-compose.yml"), "--env-file", str(self.env_file), "-p", PROJECT]

    def shell(self, line: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
        """A README line in bash, where `docker-compose` means this stack's."""
        preamble = f'docker-compose() {{ command docker-compose {shlex.join(self.options())} "$@"; }}\n'
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", preamble + line],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        command = ["docker-compose", *self.options(), *args]
        result = subprocess.run(
            command, cwd=ROOT, env=self.environment(), capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
        return result

    def exec(self, service: str, *command: str) -> str:
        return self.compose("exec", "-T", service, *command).stdout

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self) -> dict[str, str]:
        states = {}
        for service in SERVICES:
            container = self.container(service)
            inspect = subprocess.run(
                ["docker", "inspect", "-f", _STATUS, container], capture_output=True, text=True, check=False
            )
            states[service] = inspect.stdout.strip() if container else "absent"
        return states

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.values['PREFECT_PORT']}/api"

    def client_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        auth = self.values["PREFECT_API_AUTH_STRING"]
        return env | {"PREFECT_API_URL": self.api, "PREFECT_API_AUTH_STRING": auth} | extra


def env_file_from_example(path: Path, updates: dict[str, str]) -> Path:
    """.env.example with `updates` applied, as `cp .env.example .env` and an editor would make it."""
    lines = []
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        name = line.partition("=")[0].strip()
        if line.strip() and not line.lstrip().startswith("#") and name in updates:
            line = f"{name}={updates[name]}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:
    if shutil.which("docker-compose") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.fail("needs docker-compose and a running Docker engine: .ci/run installs and starts them")
    folder = tmp_path_factory.mktemp("stack")
    port = free_port()
    values = {
        "COMPOSE_PROJECT_NAME": PROJECT,
        # What .env.example tells a user to run, made here in Python.
        "POSTGRES_PASSWORD": secrets.token_hex(24),
        "PREFECT_API_AUTH_STRING": f"admin:{secrets.token_hex(24)}",
        "PREFECT_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://localhost:{port}/api",
        "DASK_DASHBOARD_PORT": str(free_port()),
    }
    stack = Stack(env_file_from_example(folder / ".env", values), values)

    started = time.monotonic()
    build = subprocess.run(["bash", "-c", team_install("docker/build-images.sh")], cwd=ROOT, timeout=BUILD_TIMEOUT_S)
    assert build.returncode == 0
    TIMES["image build"] = time.monotonic() - started

    started = time.monotonic()
    up = stack.shell(team_install("docker-compose up -d"), ROOT, stack.environment())
    assert up.returncode == 0, up.stderr
    try:
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        while True:
            states = stack.health()
            if all(state == "running healthy" for state in states.values()):
                break
            assert time.monotonic() < deadline, f"not healthy in {HEALTHY_TIMEOUT_S} s: {states}"
            assert not [s for s, state in states.items() if state.startswith(("exited", "restarting"))], states
            time.sleep(3)
        TIMES["stack start (up -d until every service is healthy)"] = time.monotonic() - started
        yield stack
    finally:
        if sys.exc_info()[0] is not None or request.session.testsfailed:
            print(stack.compose("logs", "--no-color", "--tail", "60", check=False).stdout, file=sys.stderr)
        started = time.monotonic()
        stack.shell(team_install("docker-compose down -v"), ROOT, stack.environment())
        TIMES["down -v"] = time.monotonic() - started
        volumes = subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True, text=True).stdout.split()
        assert not [volume for volume in volumes if volume.startswith(PROJECT)], volumes
        # Past pytest's capture, so that CI's log shows them.
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            for step, seconds in TIMES.items():
                print(f"\n[stack] {step}: {seconds:.0f} s", end="")
            print()


def test_compose_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    """No default password: `config` (and so `up`) stops with the message naming the secret to set."""
    for secret in ("POSTGRES_PASSWORD", "PREFECT_API_AUTH_STRING"):
        values = {"POSTGRES_PASSWORD": "x" * 48, "PREFECT_API_AUTH_STRING": "admin:" + "x" * 48}
        env_file = env_file_from_example(tmp_path / f"without-{secret}.env", values | {secret: ""})
        env = {k: v for k, v in os.environ.items() if k not in values}
        result = subprocess.run(
            ["docker-compose", "--env-file", str(env_file), "config"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"set {secret} in .env" in result.stderr, result.stderr


def test_api_needs_the_auth_string(stack: Stack) -> None:
    assert httpx.get(f"{stack.api}/health").json() is True  # open, for health checks
    assert httpx.post(f"{stack.api}/flows/filter", json={}).status_code == 401
    wrong = httpx.post(f"{stack.api}/flows/filter", json={}, auth=("admin", "wrong"))
    assert wrong.status_code == 401
    user, _, password = stack.values["PREFECT_API_AUTH_STRING"].partition(":")
    assert httpx.post(f"{stack.api}/flows/filter", json={}, auth=(user, password)).status_code == 200


def test_published_ports_answer_on_loopback_only(stack: Stack) -> None:
    address = other_address()
    for port in (int(stack.values["PREFECT_PORT"]), int(stack.values["DASK_DASHBOARD_PORT"])):
        assert answers("127.0.0.1", port), port
        assert not answers(address, port), (address, port)
    published = {service: stack.compose("port", service, port, check=False) for service, port in [
        ("postgres", "5432"), ("dask-scheduler", "8786")
    ]}  # fmt: skip
    for service, result in published.items():
        assert not result.stdout.strip(), (service, result.stdout)


def test_no_container_runs_as_root(stack: Stack) -> None:
    for service in SERVICES:
        assert stack.exec(service, "id", "-u").strip() != "0", service


def test_schedule_refuses_a_missing_auth_string(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "team.toml"
    config.write_text('data = "/data/cranfield"\nout = "/runs/nightly"\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "miner.cli", "schedule", "--config", str(config), "--cron", "0 2 * * *", "--name", "x"],
        env=stack.client_env(PREFECT_API_AUTH_STRING=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: PREFECT_API_AUTH_STRING:"), result.stderr


def test_scheduled_run_mines_on_both_dask_workers(stack: Stack, tmp_path: Path) -> None:
    # The README's commands: the data into the data volume, a config with the containers' paths, the schedule
    # registered from this host through the published, authenticated API, a run triggered and watched.
    env = stack.client_env()
    for line, cwd in [
        (team_install("docker cp data/cranfield"), ROOT),
        (team_install("printf "), tmp_path),
        (team_install(".venv/bin/miner schedule"), tmp_path),
    ]:
        result = stack.shell(line, cwd, env)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    assert "dask_address" in (tmp_path / "team.toml").read_text(encoding="utf-8")

    started = time.monotonic()
    triggered = stack.shell(
        team_install(".venv/bin/prefect deployment run"), tmp_path, env | {"COLUMNS": "200"}, timeout=RUN_TIMEOUT_S
    )
    TIMES["scheduled run (trigger until Completed)"] = time.monotonic() - started
    assert triggered.returncode == 0, triggered.stdout + triggered.stderr
    flow_run = re.findall(r"UUID: ([0-9a-f-]{36})", triggered.stdout)[0]

    # The outputs, in the runs volume.
    manifest = json.loads(stack.exec("worker", "cat", "/runs/nightly/manifest.json"))
    count = "import pyarrow.parquet as pq; print(pq.read_metadata('/runs/nightly/negatives.parquet').num_rows)"
    rows = stack.exec("worker", "python", "-c", count)
    assert int(rows) == manifest["counts"]["export"]["negatives.parquet"] > 0

    # The run, in PostgreSQL: the scheduled flow and its mining subflow, both completed.
    user, database = stack.values.get("POSTGRES_USER", "prefect"), stack.values.get("POSTGRES_DB", "prefect")
    query = (
        "select f.name, r.state_type from flow_run r join flow f on f.id = r.flow_id "
        f"where r.id = '{flow_run}' "
        f"or r.parent_task_run_id in (select id from task_run where flow_run_id = '{flow_run}') "
        "order by f.name"
    )
    recorded = stack.exec("postgres", "psql", "-U", user, "-d", database, "-tA", "-F", " ", "-c", query).split("\n")
    assert [line for line in recorded if line] == ["mine-hard-negatives COMPLETED", "scheduled-mining COMPLETED"]

    # Encoding shards ran on both Dask workers: Prefect logs each task run where it runs, here in the worker's
    # container (Dask's own keys name only prefect-dask's wrapper, not the task).
    for service in ("dask-worker-1", "dask-worker-2"):
        log = stack.compose("logs", "--no-color", service).stdout
        finished = re.findall(r"Task run '(encode-(?:document|query))-\w+' - Finished in state Completed", log)
        assert finished, (service, log[-3000:])


def test_a_scheduled_run_that_misses_a_gate_fails_and_keeps_the_last_good_outputs(stack: Stack, tmp_path: Path) -> None:
    # After the run above: the same OUT, a gate no run can meet. Its caches are warm, so the run is quick.
    env = stack.client_env()
    before = json.loads(stack.exec("worker", "cat", "/runs/nightly/manifest.json"))
    (tmp_path / "gate.toml").write_text(
        'data = "/data/cranfield"\nout = "/runs/nightly"\nrequire = ["pairs>=1000000000"]\n', encoding="utf-8"
    )
    registered = stack.shell(
        '.venv/bin/miner schedule --config gate.toml --cron "0 3 * * *" --name gate-check'.replace(
            ".venv/bin/", f"{Path(sys.executable).parent}/"
        ),
        tmp_path,
        env,
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    started = time.monotonic()
    prefect = f"{Path(sys.executable).parent}/prefect"
    triggered = stack.shell(
        f"{prefect} deployment run scheduled-mining/gate-check --watch", tmp_path, env | {"COLUMNS": "200"},
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    TIMES["scheduled run that misses a gate (warm caches)"] = time.monotonic() - started
    flow_run = re.findall(r"UUID: ([0-9a-f-]{36})", triggered.stdout)[0]

    # Failed in PostgreSQL, with the gate's one line as the state's message.
    user, database = stack.values.get("POSTGRES_USER", "prefect"), stack.values.get("POSTGRES_DB", "prefect")
    query = f"select r.state_type, r.state_name from flow_run r where r.id = '{flow_run}'"
    recorded = stack.exec("postgres", "psql", "-U", user, "-d", database, "-tA", "-F", "|", "-c", query).strip()
    assert recorded.split("|")[0] == "FAILED", recorded
    message = "select s.message from flow_run_state s where s.flow_run_id = '{}' order by s.timestamp desc limit 1"
    said = stack.exec("postgres", "psql", "-U", user, "-d", database, "-tA", "-c", message.format(flow_run)).strip()
    assert said.startswith("quality gate failed: pairs is ") and "not >= 1e+09" in said, said
    assert len(said.splitlines()) == 1, said

    # OUT still holds the last good run; this run's files went aside.
    after = json.loads(stack.exec("worker", "cat", "/runs/nightly/manifest.json"))
    assert after["run_id"] == before["run_id"]
    aside = stack.exec("worker", "ls", "/runs/nightly.rejected").split()
    assert len(aside) == 1 and aside[0] != before["run_id"], aside
