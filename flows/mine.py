"""The mining flow: each stage of `miner` as a Prefect task. Wiring only; the logic lives in `miner/`."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from miner import candidates, export, sample, score
from miner.config import MineConfig
from miner.filter import filter_counts, positive_aware_filter
from miner.ingest import Ingested, ingest
from miner.manifest import build_manifest, check_output_writable
from miner.models import Embeddings, ModelRef, embed_table, load_cross_encoder, load_embedding_model, resolve_model

T = TypeVar("T")

# Tables and models stay in this process: no input hashing, no result persistence.
stage = task(cache_policy=NO_CACHE, persist_result=False)


def _threads(config: MineConfig) -> int:
    return config.threads or os.cpu_count() or 1


@stage(name="ingest")
def ingest_stage(config: MineConfig) -> Ingested:
    check_output_writable(config.out)
    return ingest(
        config.data,
        split=config.split,
        corpus=config.corpus,
        queries=config.queries,
        min_relevance=config.min_relevance,
        skip_unknown=config.skip_unknown,
    )


@stage(name="bm25-candidates")
def bm25_stage(data: Ingested, config: MineConfig) -> pa.Table:
    with tempfile.TemporaryDirectory(prefix="miner-bm25-") as workdir:
        index_dir = Path(workdir) / "index"
        candidates.build_bm25_index(data.corpus, index_dir, threads=_threads(config))
        return candidates.bm25_search(
            index_dir,
            data.queries,
            k=config.retrieval.bm25_k,
            threads=_threads(config),
            k1=config.retrieval.bm25_k1,
            b=config.retrieval.bm25_b,
        )


@stage(name="embed")
def embed_stage(
    data: Ingested, model_ref: ModelRef, config: MineConfig, doc_ids: pa.Array | None = None
) -> tuple[Embeddings, Embeddings]:
    """Query and document embeddings; `doc_ids` limits the documents (when only the teacher needs them)."""
    import torch

    torch.set_num_threads(_threads(config))
    model = load_embedding_model(model_ref)
    corpus = data.corpus if doc_ids is None else data.corpus.filter(pc.is_in(data.corpus["doc_id"], doc_ids))
    options = {"batch_size": config.models.batch_size, "show_progress": config.show_progress}
    return (
        embed_table(model, data.queries, id_column="query_id", kind="query", **options),
        embed_table(model, corpus, id_column="doc_id", kind="document", **options),
    )


@stage(name="dense-candidates")
def dense_stage(queries: Embeddings, documents: Embeddings, config: MineConfig) -> pa.Table:
    return candidates.dense_search(
        queries.ids,
        queries.vectors,
        documents.ids,
        documents.vectors,
        k=config.retrieval.dense_k,
        threads=_threads(config),
    )


@stage(name="candidate-pool")
def pool_stage(bm25: pa.Table | None, dense: pa.Table | None, config: MineConfig) -> pa.Table:
    return candidates.candidate_pool(bm25, dense, rrf_k=config.retrieval.rrf_k)


@stage(name="teacher-scores")
def teacher_stage(
    pairs: pa.Table,
    data: Ingested,
    config: MineConfig,
    teacher_ref: ModelRef | None,
    embeddings: tuple[Embeddings, Embeddings] | None,
) -> pa.Table:
    if teacher_ref is not None:
        model = load_cross_encoder(teacher_ref)
        return score.cross_encoder_scores(
            pairs,
            data.queries,
            data.corpus,
            model,
            batch_size=config.models.teacher_batch_size,
            show_progress=config.show_progress,
        )
    assert embeddings is not None
    queries, documents = embeddings
    return score.bi_encoder_scores(pairs, queries.ids, queries.vectors, documents.ids, documents.vectors)


@stage(name="filter")
def filter_stage(pool: pa.Table, teacher_scores: pa.Table, data: Ingested, config: MineConfig) -> pa.Table:
    return positive_aware_filter(pool, teacher_scores, data.qrels, data.corpus, config.filter)


@stage(name="sample")
def sample_stage(
    judged: pa.Table, teacher_scores: pa.Table, data: Ingested, config: MineConfig
) -> tuple[pa.Table, dict[str, int]]:
    return sample.sample_negatives(judged, data.qrels, teacher_scores, config.sample)


@stage(name="export")
def export_stage(
    selected: pa.Table, data: Ingested, config: MineConfig, manifest_parts: dict[str, Any]
) -> dict[str, Any]:
    """Write the training files, then the manifest last: a folder with a manifest is complete."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    negatives = export.training_rows(selected, data.queries, data.corpus)
    ntuples, incomplete = export.ntuples(negatives, config.sample.num_negatives)
    outputs = {
        export.NEGATIVES_FILE: negatives,
        export.TRIPLETS_FILE: export.triplets(negatives),
        export.NTUPLES_FILE: ntuples,
    }
    for name, table in outputs.items():
        export.write_parquet_atomic(table, out / name)
    manifest_parts["counts"]["export"] = {
        **{name: table.num_rows for name, table in outputs.items()},
        "ntuples_incomplete_pairs_left_out": incomplete,
    }
    manifest = build_manifest(
        config=config,
        scores=export.score_statistics(negatives),
        files=[*outputs, export.MANIFEST_FILE],
        **manifest_parts,
    )
    export.write_json_atomic(manifest, out / export.MANIFEST_FILE)
    return manifest


def _timed(timings: dict[str, float], name: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    started = time.perf_counter()
    result = call(*args, **kwargs)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
    return result


@flow(name="mine-hard-negatives", validate_parameters=False)
def mine_flow(config: MineConfig) -> dict[str, Any]:
    """ingest -> BM25 + dense candidates -> teacher scores -> positive-aware filter -> sample -> export."""
    log = get_run_logger()
    timings: dict[str, float] = {}
    data = _timed(timings, "ingest", ingest_stage, config)
    log.info("ingested %s", data.counts)

    embedding_ref = resolve_model(config.models.embedding_model)
    teacher_ref = resolve_model(config.models.cross_encoder) if config.models.cross_encoder else None
    models = {"embedding": embedding_ref, **({"teacher": teacher_ref} if teacher_ref else {})}

    bm25 = _timed(timings, "bm25", bm25_stage, data, config) if config.retrieval.bm25 else None
    embeddings = _timed(timings, "embed", embed_stage, data, embedding_ref, config) if config.retrieval.dense else None
    dense = _timed(timings, "dense", dense_stage, *embeddings, config) if embeddings else None
    pool = _timed(timings, "pool", pool_stage, bm25, dense, config)
    pairs = score.teacher_pairs(pool, data.qrels)
    if teacher_ref is None and embeddings is None:
        # Dense retrieval is off but the teacher is the bi-encoder: embed only what it will score.
        embeddings = _timed(
            timings, "embed", embed_stage, data, embedding_ref, config, doc_ids=pc.unique(pairs["doc_id"])
        )
    teacher_scores = _timed(timings, "teacher", teacher_stage, pairs, data, config, teacher_ref, embeddings)
    judged = _timed(timings, "filter", filter_stage, pool, teacher_scores, data, config)
    selected, sample_counts = _timed(timings, "sample", sample_stage, judged, teacher_scores, data, config)

    candidate_counts = {
        "pool": pool.num_rows,
        "bm25_hits": bm25.num_rows if bm25 else 0,
        "dense_hits": dense.num_rows if dense else 0,
    }
    for source in ("bm25", "dense", "both"):
        candidate_counts[f"source_{source}"] = pc.sum(pc.equal(pool["source"], source)).as_py() or 0
    counts = {
        "ingest": data.counts,
        "candidates": candidate_counts,
        "teacher": {"pairs_scored": teacher_scores.num_rows},
        "filter": filter_counts(judged),
        "sample": sample_counts,
    }
    manifest = _timed(
        timings,
        "export",
        export_stage,
        selected,
        data,
        config,
        {
            "models": models,
            "inputs": data.input_hashes,
            "counts": counts,
            "timings": timings,
            "teacher": f"cross-encoder:{teacher_ref.spec}" if teacher_ref else f"bi-encoder:{embedding_ref.spec}",
        },
    )
    log.info(
        "wrote %s: %s negatives for %s (query, positive) pairs",
        config.out,
        sample_counts["negatives"],
        sample_counts["pairs"],
    )
    return manifest
