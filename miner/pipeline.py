"""The order of the stages, written once.

`score_candidates` and `select_negatives` call each stage through a `run(name, function, *args)`
hook: the Prefect flow passes one that makes every stage a task; the library and the audit call
stages directly. So a flow run, a library call and an audit mine the same way.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from miner import candidates, sample, score
from miner.cache import EmbeddingCache
from miner.config import MineConfig
from miner.errors import InputError
from miner.filter import filter_counts, positive_aware_filter
from miner.ingest import Ingested
from miner.models import (
    Embeddings,
    ModelRef,
    embed_table,
    load_cross_encoder,
    load_embedding_model,
    resolve_model,
)

StageRunner = Callable[..., Any]


def run_directly(name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return function(*args, **kwargs)


def threads(config: MineConfig) -> int:
    return config.threads or os.cpu_count() or 1


@dataclass(frozen=True)
class Scored:
    """The candidate pool with teacher scores: everything upstream of the filter."""

    pool: pa.Table  # schema.CANDIDATES
    teacher_scores: pa.Table  # schema.TEACHER_SCORES
    embeddings: tuple[Embeddings, Embeddings] | None  # (queries, documents), when the bi-encoder ran
    models: dict[str, ModelRef]
    teacher: str
    counts: dict[str, dict[str, int]]


@dataclass(frozen=True)
class Selected:
    judged: pa.Table  # schema.JUDGED
    selected: pa.Table  # schema.SELECTED
    counts: dict[str, dict[str, int]]


def bm25_candidates(data: Ingested, config: MineConfig) -> pa.Table:
    with tempfile.TemporaryDirectory(prefix="miner-bm25-") as workdir:
        index_dir = Path(workdir) / "index"
        candidates.build_bm25_index(data.corpus, index_dir, threads=threads(config))
        return candidates.bm25_search(
            index_dir,
            data.queries,
            k=config.retrieval.bm25_k,
            threads=threads(config),
            k1=config.retrieval.bm25_k1,
            b=config.retrieval.bm25_b,
        )


def embed(
    data: Ingested, model_ref: ModelRef, config: MineConfig, doc_ids: pa.Array | None = None
) -> tuple[Embeddings, Embeddings]:
    """Query and document embeddings; `doc_ids` limits the documents (when only the teacher needs them)."""
    import torch

    torch.set_num_threads(threads(config))
    model = load_embedding_model(model_ref, config.show_progress)
    corpus = data.corpus if doc_ids is None else data.corpus.filter(pc.is_in(data.corpus["doc_id"], doc_ids))
    options = {
        "batch_size": config.models.batch_size,
        "show_progress": config.show_progress,
        "cache": EmbeddingCache(config.cache_dir) if config.cache else None,
        "model_key": hashlib.blake2b(model_ref.fingerprint.encode(), digest_size=8).hexdigest(),
    }
    return (
        embed_table(model, data.queries, id_column="query_id", kind="query", **options),
        embed_table(model, corpus, id_column="doc_id", kind="document", **options),
    )


def dense_candidates(embeddings: tuple[Embeddings, Embeddings], config: MineConfig) -> pa.Table:
    queries, documents = embeddings
    return candidates.dense_search(
        queries.ids,
        queries.vectors,
        documents.ids,
        documents.vectors,
        k=config.retrieval.dense_k,
        threads=threads(config),
    )


def teacher_scores(
    pairs: pa.Table,
    data: Ingested,
    config: MineConfig,
    teacher_ref: ModelRef | None,
    embeddings: tuple[Embeddings, Embeddings] | None,
) -> pa.Table:
    if teacher_ref is not None:
        return score.cross_encoder_scores(
            pairs,
            data.queries,
            data.corpus,
            load_cross_encoder(teacher_ref, config.show_progress),
            batch_size=config.models.teacher_batch_size,
            show_progress=config.show_progress,
        )
    assert embeddings is not None
    queries, documents = embeddings
    return score.bi_encoder_scores(pairs, queries.ids, queries.vectors, documents.ids, documents.vectors)


def score_candidates(data: Ingested, config: MineConfig, run: StageRunner = run_directly) -> Scored:
    """BM25 + dense candidates, merged, then teacher scores for every candidate and positive."""
    embedding_ref = resolve_model(config.models.embedding_model)
    teacher_ref = resolve_model(config.models.cross_encoder) if config.models.cross_encoder else None
    retrieval = config.retrieval
    bm25 = run("bm25", bm25_candidates, data, config) if retrieval.bm25 else None
    embeddings = run("embed", embed, data, embedding_ref, config) if retrieval.dense else None
    dense = run("dense", dense_candidates, embeddings, config) if embeddings else None
    pool = run("pool", candidates.candidate_pool, bm25, dense, rrf_k=retrieval.rrf_k)
    pairs = score.teacher_pairs(pool, data.qrels)
    if embeddings is None and (teacher_ref is None or config.filter.needs_geometry):
        # Dense retrieval is off but the bi-encoder is needed (teacher or geometry): embed only what it scores.
        embeddings = run("embed", embed, data, embedding_ref, config, doc_ids=pc.unique(pairs["doc_id"]))
    scores = run("teacher", teacher_scores, pairs, data, config, teacher_ref, embeddings)
    counts = {
        "pool": pool.num_rows,
        "bm25_hits": bm25.num_rows if bm25 is not None else 0,
        "dense_hits": dense.num_rows if dense is not None else 0,
        **{f"source_{s}": pc.sum(pc.equal(pool["source"], s)).as_py() or 0 for s in ("bm25", "dense", "both")},
    }
    return Scored(
        pool=pool,
        teacher_scores=scores,
        embeddings=embeddings,
        models={"embedding": embedding_ref, **({"teacher": teacher_ref} if teacher_ref else {})},
        teacher=f"cross-encoder:{teacher_ref.spec}" if teacher_ref else f"bi-encoder:{embedding_ref.spec}",
        counts={
            "candidates": counts,
            "teacher": {"pairs_scored": scores.num_rows},
            "embeddings": _embedding_counts(embeddings),
        },
    )


def _embedding_counts(embeddings: tuple[Embeddings, Embeddings] | None) -> dict[str, int]:
    if embeddings is None:
        return {}
    counts = {}
    for kind, table in zip(("queries", "documents"), embeddings, strict=True):
        counts[f"{kind}_encoded"] = table.encoded
        counts[f"{kind}_from_cache_or_duplicates"] = len(table.ids) - table.encoded
        counts[f"{kind}_truncated"] = table.truncated
    return counts


def select_negatives(scored: Scored, data: Ingested, config: MineConfig, run: StageRunner = run_directly) -> Selected:
    """Filter the scored pool, then sample negatives per (query, positive)."""
    geometry = None
    if config.filter.needs_geometry:
        assert scored.embeddings is not None
        geometry = run(
            "geometry",
            score.positive_geometry,
            scored.pool,
            data.qrels,
            *scored.embeddings,
            weight=config.filter.expansion_weight,
        )
    judged = run(
        "filter",
        positive_aware_filter,
        scored.pool,
        scored.teacher_scores,
        data.qrels,
        data.corpus,
        config.filter,
        geometry,
    )
    selected, sample_counts = run(
        "sample", sample.sample_negatives, judged, data.qrels, scored.teacher_scores, config.sample
    )
    counts = filter_counts(judged)
    if selected.num_rows == 0:
        raise no_negatives_error(counts, scored.pool.num_rows)
    return Selected(judged, selected, {"filter": counts, "sample": sample_counts})


def no_negatives_error(counts: dict[str, int], pool_size: int) -> InputError:
    """Why a run produced nothing, said before any output is written."""
    if pool_size == 0:
        return InputError(
            "retrieval",
            "the retrievers returned no candidate for any query",
            "check that queries and documents share a language and that the corpus is not empty",
        )
    removed = {rule: n for rule, n in counts.items() if rule not in ("kept", "positive") and n}
    worst = max(removed, key=lambda rule: removed[rule]) if removed else "positive"
    return InputError(
        "settings",
        f"no candidate survived the filter ({worst} removed {counts.get(worst, 0)} of {pool_size})",
        f"loosen the {worst} setting (see `miner mine --help`)",
    )
