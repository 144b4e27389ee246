"""The library entry point: one mining run, from a config to a finished output folder.

`mine(config)` runs every stage in this process, with no server to start: what a script, a notebook or a
benchmark calls. The Prefect flow (`flows/mine.py`) calls the same function with a stage runner that makes
each stage a task, so both mine and write exactly the same way.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miner import card, export, formats
from miner.atomic import write_json_atomic
from miner.config import MineConfig
from miner.distributed import ShardRunner
from miner.errors import GateFailed, disk_full_as_input_error
from miner.gates import check_gates, failed_reasons
from miner.guards import check_resources
from miner.ingest import Ingested, ingest
from miner.lock import output_lock
from miner.manifest import build_manifest, check_output_writable
from miner.pipeline import (
    Scored,
    Selected,
    StageRunner,
    batch_context,
    resolve_models,
    run_directly,
    score_candidates,
    select_negatives,
)
from miner.resume import StageStore, resumable, run_key, work_dir

log = logging.getLogger(__name__)


def timed(run: StageRunner, timings: dict[str, float]) -> StageRunner:
    """A stage runner that adds up each stage's wall time in `timings`."""

    def run_timed(name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return run(name, function, *args, **kwargs)
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - started

    return run_timed


@disk_full_as_input_error
def ingest_from_config(config: MineConfig) -> Ingested:
    return ingest(
        config.data,
        split=config.split,
        corpus=config.corpus,
        queries=config.queries,
        min_relevance=config.min_relevance,
        skip_unknown=config.skip_unknown,
        spill=work_dir(config.out),
    )


def write_outputs(
    data: Ingested,
    scored: Scored,
    chosen: Selected,
    config: MineConfig,
    timings: dict[str, float],
    resumed: list[str],
) -> dict[str, Any]:
    """Write the training files, then the manifest last: a folder with a manifest is complete.

    The quality gates are checked on the manifest before anything is written: a run that misses one is written
    to its kept-aside folder (`export.rejected_folder`) instead of OUT, which keeps the last good run untouched.
    """
    out = config.out
    scratch = work_dir(out)
    negatives = export.training_rows(chosen.selected, data.queries, data.corpus)
    batching = batch_context(negatives, data, scored.embeddings, config)
    outputs, export_counts, batch_counts = formats.build_exports(
        negatives, config.formats, config.sample.num_negatives, batching
    )
    counts = {"ingest": data.counts, **scored.counts, **chosen.counts, "export": export_counts}
    if batch_counts:
        counts["batches"] = batch_counts
    manifest = build_manifest(
        config=config,
        models=scored.models,
        inputs=data.input_hashes,
        counts=counts,
        scores=export.score_statistics(negatives),
        timings=timings,
        resumed=resumed,
        files=[*outputs, card.CARD_FILE, export.MANIFEST_FILE],
        teacher=scored.teacher,
        choice=chosen.choice,
        precision=scored.precision,
    )
    manifest["gates"] = check_gates(config.require, manifest)
    if failed_reasons(manifest["gates"]):
        destination = export.rejected_folder(out, manifest["run_id"])
        destination.mkdir(parents=True, exist_ok=True)
    else:
        destination = out
        out.mkdir(parents=True, exist_ok=True)
        # Without its manifest the folder reads as unfinished while its files are replaced one by one.
        (out / export.MANIFEST_FILE).unlink(missing_ok=True)
        # A report drawn from the run being replaced would show its numbers beside this run's files.
        shutil.rmtree(out / export.REPORT_DIR, ignore_errors=True)
        formats.remove_unchosen(out, config.formats)
    manifest["written_to"] = str(destination)
    formats.write_exports(outputs, destination, scratch=scratch)
    # The card summarises the manifest, so it is built from it; the manifest still comes last.
    card.write_card(manifest, destination, scratch=scratch)
    write_json_atomic(manifest, destination / export.MANIFEST_FILE, scratch=scratch)
    return manifest


def mine(
    config: MineConfig,
    run: StageRunner = run_directly,
    shards: ShardRunner | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> dict[str, Any]:
    """ingest -> BM25 + dense candidates -> teacher scores -> positive-aware filter -> sample -> export.

    Returns the manifest it wrote; raises `GateFailed` (the outputs written aside) when the run missed a
    quality gate. `run` decides how each stage runs (directly, or as a Prefect task);
    `shards`, when given, runs the sharded stages (encoding, cross-encoder scoring) on workers.
    """
    timings: dict[str, float] = {}
    # In-process stages may overlap; Prefect tasks keep their order (a task's run context lives in its thread).
    overlap = run is run_directly and shards is None
    run = timed(run, timings)
    check_output_writable(config.out)
    resolve_models(config)  # a model that is not there, or not a cross-encoder, is refused before any work
    with output_lock(config.out):
        data = run("ingest", ingest_from_config, config)
        logger.info(
            "ingested %s", ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in data.counts.items())
        )
        run("guard", check_resources, data, config)
        store = StageStore(config.out, run_key(config, data.input_hashes))
        resumed: list[str] = []
        stage = resumable(run, store, resumed, skip=frozenset({"export"}))
        scored = score_candidates(data, config, stage, shards, vectors_dir=store.folder, concurrent_bm25=overlap)
        chosen = select_negatives(scored, data, config, stage)
        manifest = stage("export", write_outputs, data, scored, chosen, config, timings, resumed)
        store.finish()
    failed = failed_reasons(manifest["gates"])
    if failed:
        raise GateFailed(failed, Path(manifest["written_to"]), config.out, manifest)
    sample_counts = chosen.counts["sample"]
    logger.info(
        "wrote %s: %s negatives for %s (query, positive) pairs",
        config.out,
        sample_counts["negatives"],
        sample_counts["pairs"],
    )
    return manifest
