"""Scheduled mining: Prefect deployments of the mining flow, run by a worker of a process work pool.

A schedule is a deployment of `flows.mine.mine_flow_from_settings` whose parameters are the validated config
(as JSON). The Prefect server creates the scheduled runs; `prefect worker start --pool POOL` executes them,
each in a fresh process that imports the installed flow by its module path, so no code is uploaded anywhere.
"""

from __future__ import annotations

import contextlib
import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from miner.config import MineConfig, load_config
from miner.errors import InputError

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

DEFAULT_POOL = "hardneg-miner"
# Seconds to wait for the API's health answer: a server that does not answer this fast is not running.
HEALTH_TIMEOUT_S = 5.0
# Deployment names end up in URLs and in `flow/deployment` references; keep them to safe characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Deployments read per request: the API refuses more than 200.
_PAGE = 200
_API_FIX = "start one with `prefect server start` and pass its API URL with --api or PREFECT_API_URL"


@dataclass(frozen=True)
class ScheduleRow:
    """One scheduled deployment as `miner schedule list` shows it."""

    name: str
    schedule: str
    paused: bool
    next_run: datetime.datetime | None
    out: str
    pool: str


def parse_schedule(cron: str | None, interval: int | None, timezone: str | None) -> CronSchedule | IntervalSchedule:
    """--cron or --interval (and --timezone) -> a Prefect schedule, refused here when it cannot parse."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    if (cron is None) == (interval is None):
        raise InputError(
            "--cron/--interval", "give exactly one of them", "e.g. --cron '0 2 * * *' or --interval 3600 (seconds)"
        )
    if interval is not None and interval < 1:
        raise InputError("--interval", f"{interval} is not a number of seconds above 0", "e.g. --interval 3600")
    try:
        if cron is not None:
            return CronSchedule(cron=cron, timezone=timezone)
        return IntervalSchedule(interval=datetime.timedelta(seconds=interval or 0), timezone=timezone)
    except ValidationError as error:
        field = str(error.errors()[0]["loc"][0])
        if field == "timezone":
            raise InputError(
                "--timezone", f"'{timezone}' is not a time zone", "use an IANA name such as UTC or Europe/Paris"
            ) from None
        raise InputError(
            "--cron",
            f"'{cron}' is not a cron expression",
            "write five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *' for 02:00 daily",
        ) from None


def check_name(name: str, option: str = "--name") -> str:
    if not _NAME.fullmatch(name):
        raise InputError(
            option, f"'{name}' is not a usable name", "use letters, digits, '.', '_' and '-', e.g. nightly"
        )
    return name


def api_url(api: str | None) -> str:
    """The API to talk to: --api, else Prefect's PREFECT_API_URL (environment or profile)."""
    from prefect.settings import PREFECT_API_URL

    url = api or PREFECT_API_URL.value()
    if not url:
        # Without a URL Prefect would start a temporary server that forgets the schedule when this command ends.
        raise InputError("PREFECT_API_URL", "not set, so there is no Prefect server to keep the schedule", _API_FIX)
    return url.rstrip("/")


def check_reachable(url: str) -> None:
    """Ask the API's health endpoint once, briefly, so an unreachable server is one line and not a long retry."""
    import httpx

    try:
        response = httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S)
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise InputError(url, f"no Prefect server answers ({type(error).__name__})", _API_FIX) from None
    try:
        healthy = response.is_success and response.json() is True
    except ValueError:
        healthy = False
    if not healthy:
        raise InputError(
            url,
            f"not a Prefect API (GET /health gave HTTP {response.status_code})",
            "give the API URL, which ends in /api, e.g. http://127.0.0.1:4200/api",
        )
    check_authorised(url)


def check_authorised(url: str) -> None:
    """One authenticated request: a server with PREFECT_SERVER_API_AUTH_STRING answers 401 to a missing or wrong
    auth string, which Prefect's client would otherwise report as a traceback on its first call."""
    import base64

    import httpx
    from prefect.settings import PREFECT_API_AUTH_STRING

    auth = PREFECT_API_AUTH_STRING.value()
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        # Health is open to all; the version needs the auth string when the server has one.
        response = httpx.get(f"{url}/admin/version", headers=headers, timeout=HEALTH_TIMEOUT_S)
    except httpx.HTTPError as error:
        raise InputError(url, f"no Prefect server answers ({type(error).__name__})", _API_FIX) from None
    if response.status_code == 401:
        raise InputError(
            "PREFECT_API_AUTH_STRING",
            f"the Prefect API at {url} refused it (HTTP 401): " + ("wrong" if auth else "not set"),
            "set it to the server's `user:password`, e.g. the PREFECT_API_AUTH_STRING of the stack's .env",
        )


@contextlib.contextmanager
def prefect_client(api: str | None) -> Iterator[SyncPrefectClient]:
    """A client of a reachable Prefect API; every Prefect call inside (deployments too) goes to that API."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = api_url(api)
    check_reachable(url)
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def _flow_name() -> str:
    from flows.mine import mine_flow_from_settings

    return mine_flow_from_settings.name


def _find(client: SyncPrefectClient, name: str) -> DeploymentResponse | None:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(f"{_flow_name()}/{name}")
    except ObjectNotFound:
        return None


def _existing(client: SyncPrefectClient, name: str) -> DeploymentResponse:
    deployment = _find(client, name)
    if deployment is None:
        raise InputError(name, "no schedule with this name", "see `miner schedule list` for the names")
    return deployment


def _ensure_pool(client: SyncPrefectClient, pool: str) -> None:
    """A process work pool: each run is a local process of whichever machine runs the worker."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        # Two `miner schedule` commands may race to create it; either one creating it is fine.
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))


def scheduled_settings(config_file: Path) -> tuple[MineConfig, dict[str, Any]]:
    """The validated config and the JSON a deployment stores for it.

    Only what the file sets is stored (paths already absolute): unset settings, such as the cache folder, take
    the defaults of the machine that runs the flow.
    """
    config = load_config(config_file, {"show_progress": False})  # a worker's log is no terminal
    return config, config.model_dump(mode="json", exclude_unset=True)


def create(
    config_file: Path,
    name: str,
    schedule: CronSchedule | IntervalSchedule,
    *,
    paused: bool = False,
    replace: bool = False,
    pool: str = DEFAULT_POOL,
    api: str | None = None,
) -> str:
    """Register (or with `replace`, update) the deployment; returns its full name. Validates everything first."""
    from prefect.deployments.runner import DeploymentApplyError, EntrypointType

    from flows.mine import mine_flow_from_settings

    check_name(name)
    check_name(pool, "--pool")
    config, settings = scheduled_settings(config_file)
    with prefect_client(api) as client:
        if not replace and _find(client, name) is not None:
            raise InputError(
                name,
                "a schedule with this name exists",
                "choose another --name, add --replace to update it, or `miner schedule delete` it first",
            )
        _ensure_pool(client, pool)
        deployment = mine_flow_from_settings.to_deployment(
            name=name,
            schedule=schedule,
            paused=paused,
            parameters={"settings": settings},
            work_pool_name=pool,
            # The flow is imported from the installed package, wherever the worker runs.
            entrypoint_type=EntrypointType.MODULE_PATH,
            description=f"hardneg-miner: mine {config.data} into {config.out}",
            tags=["hardneg-miner"],
        )
        try:
            deployment.apply()
        except DeploymentApplyError as error:
            raise InputError(name, f"the Prefect API refused the schedule ({error})", "see the server's log") from None
    return f"{_flow_name()}/{name}"


def describe(schedule: Any) -> str:
    """'cron 0 2 * * * (UTC)' or 'every 3600 s (UTC)' for a client-side schedule object."""
    timezone = getattr(schedule, "timezone", None) or "UTC"
    if getattr(schedule, "cron", None):
        return f"cron {schedule.cron} ({timezone})"
    if getattr(schedule, "interval", None):
        return f"every {int(schedule.interval.total_seconds())} s ({timezone})"
    return type(schedule).__name__


def _next_run(client: SyncPrefectClient, deployment_id: Any) -> datetime.datetime | None:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=1,
    )
    return runs[0].expected_start_time if runs else None


def _deployments(client: SyncPrefectClient) -> list[DeploymentResponse]:
    """Every deployment of the scheduled flow, by name."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import DeploymentSort

    flow_filter = FlowFilter(name=FlowFilterName(any_=[_flow_name()]))
    found: list[DeploymentResponse] = []
    while True:
        page = client.read_deployments(
            flow_filter=flow_filter, sort=DeploymentSort.NAME_ASC, limit=_PAGE, offset=len(found)
        )
        found.extend(page)
        if len(page) < _PAGE:
            return found


def list_schedules(api: str | None = None) -> list[ScheduleRow]:
    rows = []
    with prefect_client(api) as client:
        for deployment in _deployments(client):
            schedules = ", ".join(describe(entry.schedule) for entry in deployment.schedules) or "none"
            settings = deployment.parameters.get("settings") or {}
            rows.append(
                ScheduleRow(
                    name=deployment.name,
                    schedule=schedules,
                    paused=bool(deployment.paused),
                    next_run=_next_run(client, deployment.id),
                    out=str(settings.get("out", "?")),
                    pool=deployment.work_pool_name or "-",
                )
            )
    return rows


def format_schedules(rows: list[ScheduleRow]) -> str:
    if not rows:
        return "no schedules; create one with `miner schedule --config FILE --name NAME --cron '0 2 * * *'`"
    header = ("name", "schedule", "paused", "next run (UTC)", "work pool", "out")
    table = [
        (
            row.name,
            row.schedule,
            "yes" if row.paused else "no",
            row.next_run.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if row.next_run else "-",
            row.pool,
            row.out,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *table]
    )


def set_paused(name: str, paused: bool, api: str | None = None) -> None:
    """Pausing stops new runs being scheduled (the server drops the ones already planned); resuming plans again."""
    with prefect_client(api) as client:
        deployment = _existing(client, name)
        if paused:
            client.pause_deployment(deployment.id)
        else:
            client.resume_deployment(deployment.id)


def delete(name: str, api: str | None = None) -> None:
    """Remove the deployment; its past runs stay in Prefect's history."""
    with prefect_client(api) as client:
        client.delete_deployment(_existing(client, name).id)
