"""The mining flow: every stage of `miner.pipeline` as a Prefect task. Wiring only; the logic lives in `miner/`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from miner.artifacts import artifact_key, change_markdown, published_manifest, report_link, summary_rows
from miner.config import MineConfig
from miner.distributed import ShardRunner
from miner.errors import GateFailed, disk_full_as_input_error
from miner.export import run_report_folder
from miner.report import write_report
from miner.run import mine


def prefect_stages() -> Callable[..., Any]:
    """A stage runner that runs each stage as a Prefect task, in this process."""
    tasks: dict[str, Any] = {}

    def run(name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name not in tasks:
            # Tables and models stay in this process: no input hashing, no result persistence.
            tasks[name] = task(
                disk_full_as_input_error(function), name=name, cache_policy=NO_CACHE, persist_result=False
            )
        return tasks[name](*args, **kwargs)

    return run


def prefect_shards() -> ShardRunner:
    """A shard runner that submits each shard as a task to the flow's task runner (the Dask cluster)."""
    tasks: dict[str, Any] = {}

    def run(name: str, function: Callable[..., Any], items: list[tuple[Any, ...]]) -> list[Any]:
        if name not in tasks:
            # Shards carry paths and return counts: nothing large crosses the network.
            tasks[name] = task(function, name=name, cache_policy=NO_CACHE, persist_result=False)
        futures = [tasks[name].submit(*item) for item in items]
        return [future.result() for future in futures]

    return run


@flow(name="mine-hard-negatives", validate_parameters=False)
def mine_flow(config: MineConfig) -> Any:
    """ingest -> BM25 + dense candidates -> teacher scores -> positive-aware filter -> sample -> export.

    Then the run's report and its artifacts. A run that missed a quality gate ends Failed, with the reason as
    the state's message (its outputs kept aside by `mine`).
    """
    previous = published_manifest(config.out)  # read before this run replaces it
    shards = prefect_shards() if config.dask else None
    try:
        manifest = mine(config, run=prefect_stages(), shards=shards, logger=get_run_logger())
    except GateFailed as failed:
        publish_artifacts(failed.manifest, previous)
        return Failed(message=str(failed), data=failed)
    publish_artifacts(manifest, previous)
    return manifest


def publish_artifacts(manifest: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """The summary table, the report link and the change against the previous run, under keys of the
    deployment's name (the flow's outside a deployment), so the UI lists them run after run."""
    from prefect import runtime

    name = runtime.deployment.name or runtime.flow_run.flow_name
    out = Path(manifest["config"]["out"])
    report = write_report(Path(manifest["written_to"]), run_report_folder(out, manifest["run_id"]))
    create_table_artifact(
        summary_rows(manifest),
        key=artifact_key(name, "summary"),
        description=f"Run {manifest['run_id']}: counts, coverage, scores, false-negative estimate, gates",
    )
    create_link_artifact(
        report_link(report),
        link_text=f"report of run {manifest['run_id']}",
        key=artifact_key(name, "report"),
        description=str(report),
    )
    create_markdown_artifact(
        change_markdown(manifest, previous),
        key=artifact_key(name, "change"),
        description="change against the previous run published to the same output folder",
    )


def _server_deaf_to_ctrl_c() -> Any:
    """A temporary Prefect API server that the terminal's Ctrl-C does not stop.

    Ctrl-C signals the whole process group. A server stopped with the run would leave the flow, which reports
    its interruption to the server on the way out, retrying each report for a minute.
    """
    import signal

    from prefect.server.api.server import SubprocessASGIServer

    class Server(SubprocessASGIServer):
        _instances: ClassVar[dict[int | None, SubprocessASGIServer]] = {}  # apart from those Prefect starts

        def _run_uvicorn_command(self) -> Any:
            # A blocked signal stays blocked in the child across fork and exec; uvicorn's handlers do not unblock
            # it. SIGTERM is left alone: `stop` ends the server with it.
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                return super()._run_uvicorn_command()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    return Server()


@contextlib.contextmanager
def one_api_for_all_workers() -> Iterator[None]:
    """Dask workers are other processes: without a configured Prefect API each would start its own temporary
    server on one SQLite file. Start one here and point this process and the workers it spawns at it. Without
    Dask too, so that the server outlives a Ctrl-C of the run."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        yield
        return
    server = _server_deaf_to_ctrl_c()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")))
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def run_mine_flow(config: MineConfig, return_state: bool = False) -> Any:
    """The flow, on a Dask cluster when the config names one (an address, or a number of local workers); with
    `return_state`, its final state rather than its result."""
    if not config.dask:
        with one_api_for_all_workers():
            return mine_flow(config, return_state=return_state)
    from prefect_dask import DaskTaskRunner

    if config.dask_address is not None:
        runner = DaskTaskRunner(address=config.dask_address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1})
    with one_api_for_all_workers():
        return mine_flow.with_options(task_runner=runner)(config, return_state=return_state)


@flow(name="scheduled-mining")
def mine_flow_from_settings(settings: dict[str, Any]) -> Any:
    """Entry point of `miner schedule` deployments: their parameters are JSON, so the config arrives as a dict.

    Through `run_mine_flow`, so that a config naming a Dask cluster gets its task runner here too. A mining run
    that missed a gate fails this run too, with the same one-line message (not Prefect's summary of a failed
    subflow)."""
    config = MineConfig.model_validate(settings)
    if config.dask_address is not None:
        from miner.distributed import check_scheduler_reachable

        # As `miner mine` does: an unreachable scheduler is one line in the run's log, not a connection retry loop.
        check_scheduler_reachable(config.dask_address)
    state = run_mine_flow(config, return_state=True)
    if state.is_failed():
        return Failed(message=state.message)
    return state.result()
