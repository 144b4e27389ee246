"""`miner schedule` against a real `prefect server start` (SQLite, loopback) and a real process worker."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import read_artifacts, run_cli

POOL = "hardneg-miner"
FLOW = "scheduled-mining"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen[bytes], first: int = signal.SIGTERM) -> None:
    """Ask the process group to stop, then kill it: Prefect's server and worker have children of their own."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)


def _env(tmp: Path, **updates: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MINER_CACHE_DIR": str(tmp / "cache"),
        **updates,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` on a free loopback port with its own home and SQLite file; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = _env(
        home,
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_UI_ENABLED="false",
    )
    log = (home / "server.log").open("wb")
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).json() is True:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)
        log.close()


@contextlib.contextmanager
def _client(url: str) -> Iterator[Any]:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def _deployment(url: str, name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    with _client(url) as client:
        try:
            return client.read_deployment_by_name(f"{FLOW}/{name}")
        except ObjectNotFound:
            return None


def _scheduled_runs(url: str, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with _client(url) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=50,
        )


def _wait_for_scheduled_runs(url: str, deployment_id: Any) -> list[Any]:
    # The server's scheduler visits new deployments every few seconds.
    deadline = time.monotonic() + 60
    while not (runs := _scheduled_runs(url, deployment_id)) and time.monotonic() < deadline:
        time.sleep(1)
    return runs


def _config(tmp_path: Path, data: Path, **sections: dict[str, Any]) -> Path:
    lines = [f'data = "{data}"', 'out = "out"']
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = tmp_path / "mine.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_schedule_registers_plans_and_a_worker_runs_it(server: str, tiny_beir: Path, tmp_path: Path) -> None:
    # BM25 off: the run's Java start-up would add nothing to what this test checks.
    config = _config(tmp_path, tiny_beir, retrieval={"bm25": False}, sample={"num_negatives": 3})
    env = _env(tmp_path, PREFECT_API_URL=server, PREFECT_HOME=str(tmp_path / "prefect-home"))
    # As a user would: the API URL from the environment, in a fresh process.
    command = ["schedule", "--config", str(config), "--name", "nightly", "--cron", "0 2 * * *"]
    created = subprocess.run(
        [sys.executable, "-m", "miner.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    assert f"{FLOW}/nightly" in created.stdout

    deployment = _deployment(server, "nightly")
    assert deployment is not None and deployment.work_pool_name == POOL
    assert deployment.parameters["settings"]["out"] == str(tmp_path / "out")
    worker_log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
        env=env | {"PREFECT_WORKER_QUERY_SECONDS": "1"},
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        planned = _wait_for_scheduled_runs(server, deployment.id)
        assert planned, "the server planned no runs for the cron schedule"
        starts = [run.expected_start_time.astimezone(datetime.UTC) for run in planned]
        assert all((start.hour, start.minute) == (2, 0) for start in starts), starts

        _, listing, _ = run_cli("schedule", "list", "--api", server)
        row = next(line for line in listing.splitlines() if line.startswith("nightly "))
        assert "cron 0 2 * * * (UTC)" in row and " no " in row
        assert min(starts).strftime("%Y-%m-%d %H:%M:%S") in row

        # Trigger a run now, as the UI's "Quick run" does; the worker picks it up and runs it in a new process.
        from prefect.client.schemas.objects import StateType

        with _client(server) as client:
            run = client.create_flow_run_from_deployment(deployment.id)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with _client(server) as client:
                state = client.read_flow_run(run.id).state
            if state is not None and state.is_final():
                break
            time.sleep(1)
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert state is not None and state.type == StateType.COMPLETED, f"{state}\n{log[-3000:]}"
        with _client(server) as client:
            # Keyed by the deployment's name, though the mining flow is a subflow of the deployment's flow.
            (summary,) = read_artifacts(client, "nightly-summary")
    finally:
        _stop(worker, first=signal.SIGINT)  # a process worker shuts down cleanly on SIGINT
        worker_log.close()

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["sample"]["negatives"] > 0
    assert manifest["config"]["data"] == str(tiny_beir.resolve())
    assert manifest["config"]["sample"]["num_negatives"] == 3
    assert json.loads(summary.data)[0]["value"] == manifest["run_id"]


def test_pause_resume_delete(server: str, tiny_beir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_beir)
    code, _, stderr = run_cli("schedule", "--config", config, "--name", "hourly", "--interval", "3600", "--api", server)
    assert code == 0, stderr
    deployment = _deployment(server, "hourly")
    assert _wait_for_scheduled_runs(server, deployment.id)

    assert run_cli("schedule", "--api", server, "pause", "hourly")[0] == 0
    assert _deployment(server, "hourly").paused
    # Pausing drops the planned runs, so nothing starts while paused.
    assert _scheduled_runs(server, deployment.id) == []
    _, listing, _ = run_cli("schedule", "list", "--api", server)
    assert " yes " in next(line for line in listing.splitlines() if line.startswith("hourly "))

    assert run_cli("schedule", "resume", "hourly", "--api", server)[0] == 0
    assert not _deployment(server, "hourly").paused

    assert run_cli("schedule", "delete", "hourly", "--api", server)[0] == 0
    assert _deployment(server, "hourly") is None
    code, _, stderr = run_cli("schedule", "delete", "hourly", "--api", server)
    assert code == 2 and "hourly" in _one_error_line(stderr)


def test_taken_name_is_refused_unless_replaced(server: str, tiny_beir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_beir)
    base = ("schedule", "--config", config, "--name", "weekly", "--api", server)
    assert run_cli(*base, "--cron", "0 3 * * 0")[0] == 0

    code, _, stderr = run_cli(*base, "--cron", "0 4 * * 0")
    assert code == 2 and "weekly" in _one_error_line(stderr)
    kept = _deployment(server, "weekly")
    assert [entry.schedule.cron for entry in kept.schedules] == ["0 3 * * 0"]

    code, _, stderr = run_cli(*base, "--interval", "7200", "--timezone", "Europe/Paris", "--replace", "--paused")
    assert code == 0, stderr
    replaced = _deployment(server, "weekly")
    assert replaced.id == kept.id and replaced.paused
    assert [entry.schedule.interval for entry in replaced.schedules] == [datetime.timedelta(hours=2)]
    assert replaced.schedules[0].schedule.timezone == "Europe/Paris"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (("--cron", "0 2 * *"), "0 2 * *"),
        (("--cron", "0 25 * * *"), "0 25 * * *"),
        (("--cron", "0 2 * * *", "--timezone", "Mars/Olympus"), "Mars/Olympus"),
        (("--interval", "0"), "--interval"),
        (("--cron", "0 2 * * *", "--interval", "60"), "--cron/--interval"),
        ((), "--cron/--interval"),
        (("--cron", "0 2 * * *", "--pool", "my/pool"), "--pool"),
        (("--cron", "0 2 * * *", "--name", "night/ly"), "night/ly"),
    ],
)
def test_bad_schedule_is_one_line_and_registers_nothing(
    server: str, tiny_beir: Path, tmp_path: Path, options: tuple[str, ...], named: str
) -> None:
    config = _config(tmp_path, tiny_beir)
    code, _, stderr = run_cli("schedule", "--config", config, "--name", "broken", "--api", server, *options)
    assert code == 2 and named in _one_error_line(stderr)
    assert _deployment(server, "broken") is None


def test_invalid_config_is_refused_before_registering(server: str, tiny_beir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_beir, sample={"num_negatives": 0})
    code, _, stderr = run_cli(
        "schedule", "--config", config, "--name", "badconfig", "--cron", "0 2 * * *", "--api", server
    )
    line = _one_error_line(stderr)
    assert code == 2 and str(config) in line and "sample.num_negatives" in line
    assert _deployment(server, "badconfig") is None


def test_unreachable_api_is_one_line_naming_it(tiny_beir: Path, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{_free_port()}/api"
    config = _config(tmp_path, tiny_beir)
    code, _, stderr = run_cli(
        "schedule", "--config", config, "--name", "nightly", "--cron", "0 2 * * *", "--api", closed
    )
    assert code == 2 and closed in _one_error_line(stderr)
    code, _, stderr = run_cli("schedule", "list", "--api", closed)
    assert code == 2 and closed in _one_error_line(stderr)


def test_no_api_configured_is_refused() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Without a server Prefect would start a temporary one that forgets the schedule on exit.
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        code, _, stderr = run_cli("schedule", "list")
    assert code == 2 and "PREFECT_API_URL" in _one_error_line(stderr)
