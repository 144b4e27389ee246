"""The mining flow: every stage of `miner.pipeline` as a Prefect task. Wiring only; the logic lives in `miner/`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from miner import export
from miner.config import MineConfig
from miner.errors import disk_full_as_input_error
from miner.guards import check_resources
from miner.ingest import Ingested, ingest
from miner.lock import output_lock
from miner.manifest import build_manifest, check_output_writable
from miner.pipeline import Scored, Selected, score_candidates, select_negatives
from miner.resume import StageStore, resumable, run_key, work_dir


def prefect_stages(timings: dict[str, float]) -> Callable[..., Any]:
    """A stage runner that runs each stage as a Prefect task and adds up its wall time."""
    tasks: dict[str, Any] = {}

    def run(name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name not in tasks:
            # Tables and models stay in this process: no input hashing, no result persistence.
            tasks[name] = task(
                disk_full_as_input_error(function), name=name, cache_policy=NO_CACHE, persist_result=False
            )
        started = time.perf_counter()
        result = tasks[name](*args, **kwargs)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
        return result

    return run


def ingest_from_config(config: MineConfig) -> Ingested:
    return ingest(
        config.data,
        split=config.split,
        corpus=config.corpus,
        queries=config.queries,
        min_relevance=config.min_relevance,
        skip_unknown=config.skip_unknown,
    )


def write_outputs(
    data: Ingested,
    scored: Scored,
    chosen: Selected,
    config: MineConfig,
    timings: dict[str, float],
    resumed: list[str],
) -> dict[str, Any]:
    """Write the training files, then the manifest last: a folder with a manifest is complete."""
    out = config.out
    scratch = work_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    # Without its manifest the folder reads as unfinished while its files are replaced one by one.
    (out / export.MANIFEST_FILE).unlink(missing_ok=True)
    negatives = export.training_rows(chosen.selected, data.queries, data.corpus)
    ntuples, incomplete = export.ntuples(negatives, config.sample.num_negatives)
    outputs = {
        export.NEGATIVES_FILE: negatives,
        export.TRIPLETS_FILE: export.triplets(negatives),
        export.NTUPLES_FILE: ntuples,
    }
    for name, table in outputs.items():
        export.write_parquet_atomic(table, out / name, scratch=scratch)
    counts = {
        "ingest": data.counts,
        **scored.counts,
        **chosen.counts,
        "export": {
            **{name: table.num_rows for name, table in outputs.items()},
            "ntuples_incomplete_pairs_left_out": incomplete,
        },
    }
    manifest = build_manifest(
        config=config,
        models=scored.models,
        inputs=data.input_hashes,
        counts=counts,
        scores=export.score_statistics(negatives),
        timings=timings,
        resumed=resumed,
        files=[*outputs, export.MANIFEST_FILE],
        teacher=scored.teacher,
    )
    export.write_json_atomic(manifest, out / export.MANIFEST_FILE, scratch=scratch)
    return manifest


@flow(name="mine-hard-negatives", validate_parameters=False)
def mine_flow(config: MineConfig) -> dict[str, Any]:
    """ingest -> BM25 + dense candidates -> teacher scores -> positive-aware filter -> sample -> export."""
    log = get_run_logger()
    timings: dict[str, float] = {}
    task_run = prefect_stages(timings)
    check_output_writable(config.out)
    with output_lock(config.out):
        data = task_run("ingest", ingest_from_config, config)
        log.info("ingested %s", data.counts)
        task_run("guard", check_resources, data, config)
        store = StageStore(config.out, run_key(config, data.input_hashes))
        resumed: list[str] = []
        run = resumable(task_run, store, resumed, skip=frozenset({"export"}))
        scored = score_candidates(data, config, run)
        chosen = select_negatives(scored, data, config, run)
        manifest = run("export", write_outputs, data, scored, chosen, config, timings, resumed)
        store.finish()
    sample_counts = chosen.counts["sample"]
    log.info(
        "wrote %s: %s negatives for %s (query, positive) pairs",
        config.out,
        sample_counts["negatives"],
        sample_counts["pairs"],
    )
    return manifest
