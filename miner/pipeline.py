"""The order of the stages, written once.

`score_candidates` and `select_negatives` call each stage through a `run(name, function, *args)`
hook: the Prefect flow passes one that makes every stage a task; the library and the audit call
stages directly. So a flow run, a library call and an audit mine the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from miner import calibrate, candidates, java, precision, sample, score
from miner.background import finished, in_background, result_of
from miner.batches import BatchContext, check_batch_size
from miner.cache import Bm25IndexCache, EmbeddingCache, TeacherScoreCache
from miner.config import BATCHED_FORMATS, MineConfig
from miner.distributed import (
    ShardRunner,
    Workers,
    prefill_embeddings,
    prefill_teacher_scores,
    sharded_bm25_search,
    sharded_exact_search,
)
from miner.errors import InputError
from miner.filter import filter_counts, positive_aware_filter
from miner.ingest import Ingested
from miner.language import Detection, choose_language, detect_language
from miner.models import (
    Embeddings,
    ModelHandle,
    ModelRef,
    Prompt,
    cast,
    check_cross_encoder,
    embed_table,
    load_cross_encoder,
    load_embedding_model,
    model_key,
    prompted_model_key,
    resolve_model,
)
from miner.resume import work_dir
from miner.tables import rows_named
from miner.vectors import Allocator, in_memory, on_disk

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

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
    counts: dict[str, dict[str, Any]]  # numbers, and the dense index's kind and settings
    # Per model role: the precision asked for and used, why, and the guard's figures.
    precision: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Selected:
    judged: pa.Table  # schema.JUDGED
    selected: pa.Table  # schema.SELECTED
    counts: dict[str, dict[str, int]]
    # Settings the data decided (auto expansion depth, budget) and the estimated false-negative rate.
    choice: dict[str, Any]


def bm25_candidates(
    data: Ingested, config: MineConfig, shards: ShardRunner | None = None
) -> tuple[pa.Table, dict[str, int | str]]:
    """BM25 top-k per query, over an index taken from the cache, grown from a cached one, or built.

    With `shards`, the query shards are searched on the workers, over the index in the shared cache folder.
    """
    # Whatever needs the JVM first starts it (detecting the language, indexing, searching), and a warm run that
    # finds everything in the cache never does; when it starts, it is sized for this job.
    java.expect_job(data.corpus.num_rows + data.queries.num_rows)
    language, analysis = choose_language(config.retrieval.language, data.corpus, _detector(config))
    retrieval = config.retrieval
    settings = {"k": bm25_depth(config), "k1": retrieval.bm25_k1, "b": retrieval.bm25_b, "language": language}
    if shards is None:
        search = functools.partial(candidates.bm25_search, queries=data.queries, threads=threads(config), **settings)
    else:
        workers = _workers(config, shards)
        search = functools.partial(sharded_bm25_search, queries=data.queries, workers=workers, **settings)
    build = functools.partial(_index_rows, threads=threads(config), language=language)

    def counted(indexed: int) -> dict[str, int | str]:
        # Asked last: by then the JVM has started, or the cache spared the run it.
        counts = {"documents_indexed": indexed, "documents_from_cache": data.corpus.num_rows - indexed}
        return {**counts, **analysis, "jvm": java.jvm_mode()}

    folder = cache_dir(config)
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="miner-bm25-") as workdir:
            index_dir = Path(workdir) / "index"
            build(data.corpus, index_dir, False)
            return search(index_dir), counted(data.corpus.num_rows)
    index_settings = candidates.bm25_index_settings(language)
    index_cache = Bm25IndexCache(folder, corpus=str(config.corpus or config.data))
    entry, indexed = index_cache.index(index_settings, data.corpus, build)
    hits = index_cache.hits(entry, data.queries, settings)
    if hits is None:
        hits = search(entry)
        index_cache.keep_hits(entry, data.queries, settings, hits)
    return hits, counted(indexed)


def _detector(config: MineConfig) -> Callable[[Sequence[str]], Detection]:
    """`detect_language`, answered from the cache when the same sample was detected before."""
    folder = cache_dir(config)
    if folder is None:
        return detect_language

    def detect(texts: Sequence[str]) -> Detection:
        signature = "\n".join([candidates.bm25_index_settings("en"), *texts]).encode()
        key = hashlib.blake2b(signature, digest_size=16).hexdigest()
        found = Bm25IndexCache(folder).remembered(f"language-{key}", lambda: dataclasses.asdict(detect_language(texts)))
        return Detection(**found)

    return detect


def bm25_depth(config: MineConfig) -> int:
    """How deep BM25 searches: its candidates, or deeper when the filter reads its hits as evidence."""
    retrieval = config.retrieval
    reads_evidence = config.filter.expansion_depth != 0 and config.filter.lexical_weight > 0 and retrieval.dense
    return max(retrieval.bm25_k, retrieval.bm25_evidence_k if reads_evidence else 0)


def _index_rows(rows: pa.Table, folder: Path, append: bool, *, threads: int, language: str) -> None:
    candidates.build_bm25_index(rows, folder, threads=threads, append=append, language=language)


def _documents(data: Ingested, doc_ids: pa.Array | None) -> pa.Table:
    """The corpus, or only the documents `doc_ids` names."""
    return data.corpus if doc_ids is None else rows_named(data.corpus, "doc_id", doc_ids)


def embed(
    data: Ingested,
    model_ref: ModelRef,
    config: MineConfig,
    doc_ids: pa.Array | None = None,
    vectors_dir: Path | None = None,
    guarded: bool = False,
) -> tuple[Embeddings, Embeddings]:
    """Query and document embeddings; `doc_ids` limits the documents (when only the teacher needs them).

    With `vectors_dir` the vectors are `.npy` files there, memory-mapped, rather than arrays in memory.
    `guarded`: the precision guard encoded its sample, which is then encoded in the guard's own batches (or
    found in the cache), so the rows do not depend on whether there is a cache.
    """

    corpus = _documents(data, doc_ids)
    options = {
        "batch_size": config.models.batch_size,
        "show_progress": config.show_progress,
        "cache": embedding_cache(model_ref, config),
        "model_key": model_key(model_ref),
    }
    model = ModelHandle(lambda: _embedding_model(model_ref, config))

    def allocator(kind: str) -> Allocator:
        return on_disk(vectors_dir / f"vectors-{kind}.npy") if vectors_dir is not None else in_memory

    prompts = prompts_of(config)

    def sample(table: pa.Table) -> frozenset[str]:
        return frozenset(_guard_hashes(table).to_pylist()) if guarded else frozenset()

    return (
        embed_table(
            model,
            data.queries,
            id_column="query_id",
            kind="query",
            allocate=allocator("query"),
            prompt=prompts["query"],
            first=sample(data.queries),
            **options,
        ),
        embed_table(
            model,
            corpus,
            id_column="doc_id",
            kind="document",
            allocate=allocator("document"),
            prompt=prompts["document"],
            first=sample(data.corpus),
            **options,
        ),
    )


def prompts_of(config: MineConfig) -> dict[str, Prompt]:
    """The embedding model's prompt for each kind of text, as the config gives it."""
    models = config.models
    return {
        "query": (models.query_prompt, models.query_prompt_name),
        "document": (models.document_prompt, models.document_prompt_name),
    }


# A model the precision guard loaded and cast to the precision it then passed, by the ref it now matches: the
# stage that runs it next takes it instead of loading the same weights again. Emptied as each run's scoring ends.
_handed_over: dict[ModelRef, Any] = {}


def _loaded(load: Callable[[ModelRef, bool], Any], ref: ModelRef, config: MineConfig, show_progress: bool) -> Any:
    """The model the guard handed over for `ref`, else `load(ref)` with the run's torch threads."""
    if ref in _handed_over:
        return _handed_over.pop(ref)
    import torch

    torch.set_num_threads(threads(config))
    return load(ref, show_progress)


def _embedding_model(ref: ModelRef, config: MineConfig, show_progress: bool | None = None) -> SentenceTransformer:
    return _loaded(load_embedding_model, ref, config, config.show_progress if show_progress is None else show_progress)


def embedding_cache(ref: ModelRef, config: MineConfig) -> EmbeddingCache | None:
    folder = cache_dir(config)
    return EmbeddingCache(folder, {model_key(ref): ref.spec}, ref.precision) if folder else None


def guard_floor(config: MineConfig) -> precision.GuardFloor:
    models = config.models
    return precision.GuardFloor(models.guard_min_cosine, models.guard_min_overlap, models.guard_min_rank_correlation)


def _guard_hashes(table: pa.Table) -> pa.Array:
    """The text hashes of the guard's sample of `table`: the smallest, so the same texts whatever order the input
    lists them in and whatever the cache holds. A resumed run checks the texts the interrupted one did, in the
    same batches, so their vectors are the same."""
    hashes = pl.Series("text_hash", table.column("text_hash"), dtype=pl.String).unique().sort()
    return hashes.head(precision.sample_size(len(hashes))).to_arrow()


def _guard_sample(table: pa.Table) -> pa.Table:
    """The guard's texts of `table` (text_hash, text), by `_guard_hashes`."""
    texts = pl.from_arrow(rows_named(table, "text_hash", _guard_hashes(table)).select(["text_hash", "text"]))
    assert isinstance(texts, pl.DataFrame)
    return texts.unique("text_hash").sort("text_hash").to_arrow()


def _all_cached(data: Ingested, ref: ModelRef, config: MineConfig) -> bool:
    cache = embedding_cache(ref, config)
    if cache is None:
        return False
    prompts = prompts_of(config)
    for table, kind in ((data.queries, "query"), (data.corpus, "document")):
        key = prompted_model_key(model_key(ref), kind, prompts[kind])
        _, found, _ = cache.lookup(key, kind, table.column("text_hash"), allocate=None)
        if not found.all():
            return False
    return True


def embedding_precision(data: Ingested, ref: ModelRef, config: MineConfig) -> tuple[ModelRef, dict[str, Any]]:
    """The embedding model at the precision the run will use, and the record of why.

    For bfloat16, a fixed sample of the texts is encoded at float32 and at bfloat16 first; the run keeps bfloat16
    only when the two agree (miner/precision.py). Both sides go to the cache like any other vectors: the encoding
    stage then does not encode the sample again, and a later run on the same texts checks at no cost. Nothing to
    encode: nothing to check.
    """
    reduced, record = _chosen(ref, config)
    if reduced is None:
        return ref, record
    if _all_cached(data, reduced, config):
        return reduced, {**record, "guard": "not run: every text was in the cache at this precision"}
    queries, documents = _guard_sample(data.queries), _guard_sample(data.corpus)
    model = _embedding_model(ref, config, show_progress=False)
    prompts = prompts_of(config)

    def vectors(at: ModelRef, table: pa.Table, kind: str) -> Embeddings:
        return embed_table(
            model,
            table,
            id_column="text_hash",
            kind=kind,
            batch_size=config.models.batch_size,
            show_progress=False,
            cache=embedding_cache(at, config),
            model_key=model_key(at),
            prompt=prompts[kind],
        )

    started = time.perf_counter()
    full = vectors(ref, queries, "query"), vectors(ref, documents, "document")
    reference_seconds = time.perf_counter() - started
    cast(model, reduced.precision)
    lowered = vectors(reduced, queries, "query"), vectors(reduced, documents, "document")
    (query_low, doc_low), (query_full, doc_full) = ([side.vectors for side in pair] for pair in (lowered, full))
    figures = precision.vector_agreement(query_low, query_full, doc_low, doc_full, guard_floor(config))
    # What the guard encoded at the precision the run goes on with (float32 when the check failed), which the
    # encoding stage then finds in the cache; and the guard's own cost, its float32 reference.
    kept = lowered if figures["passed"] else full
    figures["encoded"] = {"queries": kept[0].encoded, "documents": kept[1].encoded}
    figures["float32_seconds"] = round(reference_seconds, 3)
    return _guarded(ref, reduced, record, figures, "embedding model", model)


def _chosen(ref: ModelRef, config: MineConfig) -> tuple[ModelRef | None, dict[str, Any]]:
    """(`ref` at the reduced precision the run asks for, or None for float32; the manifest's record of why)."""
    choice = precision.choose_precision(config.models.precision)
    record: dict[str, Any] = {"requested": choice.requested, "precision": choice.precision, "reason": choice.reason}
    if choice.precision == "float32":
        return None, {**record, "guard": None}
    return dataclasses.replace(ref, precision=choice.precision), record


def _guarded(
    ref: ModelRef, reduced: ModelRef, record: dict[str, Any], figures: dict[str, Any], role: str, model: Any
) -> tuple[ModelRef, dict[str, Any]]:
    if figures["passed"]:
        _handed_over[reduced] = model
        return reduced, {**record, "guard": figures}
    log.warning(
        "%s at %s failed the precision guard (%s); running at float32", role, reduced.precision, figures["failed"]
    )
    reason = f"{record['reason']}, but the guard failed: {figures['failed']}"
    return ref, {**record, "precision": "float32", "reason": reason, "guard": figures}


def teacher_precision(
    pairs: pa.Table, data: Ingested, ref: ModelRef, config: MineConfig
) -> tuple[ModelRef, dict[str, Any]]:
    """The cross-encoder at the precision the run will use: as `embedding_precision`, on the text pairs with the
    smallest hashes, compared by the rank correlation of their scores; both sides go to the cache."""
    reduced, record = _chosen(ref, config)
    if reduced is None:
        return ref, record
    texts = score.pair_texts(pairs, data.queries, data.corpus)
    if not score.scoring_chunks(texts, teacher_cache(reduced, config), model_key(reduced))[1]:
        return reduced, {**record, "guard": "not run: every pair was in the cache at this precision"}
    sample_pairs = score.guard_pairs(texts)
    model = _cross_encoder(ref, config, show_progress=False)

    def scores(at: ModelRef) -> tuple[np.ndarray, int]:
        known, scored = score.scored_pairs(
            sample_pairs,
            model,
            batch_size=config.models.teacher_batch_size,
            show_progress=False,
            cache=teacher_cache(at, config),
            model_key=model_key(at),
        )
        ordered = sample_pairs.select(score.PAIR_KEYS).join(known, on=score.PAIR_KEYS, how="left")
        return ordered["teacher_score"].to_numpy(), scored

    started = time.perf_counter()
    full, scored_full = scores(ref)
    reference_seconds = time.perf_counter() - started
    cast(model, reduced.precision)
    lowered, scored_lowered = scores(reduced)
    figures = precision.score_agreement(lowered, full, guard_floor(config))
    figures["scored"] = scored_lowered if figures["passed"] else scored_full
    figures["float32_seconds"] = round(reference_seconds, 3)
    return _guarded(ref, reduced, record, figures, "cross-encoder", model)


def dense_candidates(
    embeddings: tuple[Embeddings, Embeddings], config: MineConfig, shards: ShardRunner | None = None
) -> tuple[pa.Table, dict[str, Any]]:
    """Dense top-k per query, and which index searched (for an approximate one, its measured recall).

    With `shards`, exact search runs its query shards on the workers.
    """
    queries, documents = embeddings
    folder = cache_dir(config)
    return candidates.dense_retrieve(
        queries.ids,
        queries.vectors,
        documents.ids,
        documents.vectors,
        k=config.retrieval.dense_k,
        threads=threads(config),
        spec=dense_index_spec(config),
        cache_dir=folder / "dense" if folder else None,
        cache_label=config.models.embedding_model,
        exact=None if shards is None else functools.partial(sharded_exact_search, workers=_workers(config, shards)),
    )


def dense_index_spec(config: MineConfig) -> candidates.DenseIndexSpec:
    """Which faiss index the settings ask for (exact, or HNSW/IVF above a corpus size), and how to search it."""
    retrieval = config.retrieval
    return candidates.DenseIndexSpec(
        kind=retrieval.dense_index,
        ann_threshold=retrieval.ann_threshold,
        hnsw_m=retrieval.hnsw_m,
        hnsw_ef_search=retrieval.hnsw_ef_search,
        ivf_nprobe=retrieval.ivf_nprobe,
        recall_queries=retrieval.ann_recall_queries,
    )


def teacher_scores(
    pairs: pa.Table,
    data: Ingested,
    config: MineConfig,
    teacher_ref: ModelRef | None,
    embeddings: tuple[Embeddings, Embeddings] | None,
    guarded: bool = False,
) -> pa.Table:
    """Each pair's teacher score; `guarded` as in `embed`."""
    if teacher_ref is not None:
        return score.cross_encoder_scores(
            pairs,
            data.queries,
            data.corpus,
            ModelHandle(lambda: _cross_encoder(teacher_ref, config)),
            batch_size=config.models.teacher_batch_size,
            show_progress=config.show_progress,
            cache=teacher_cache(teacher_ref, config),
            model_key=model_key(teacher_ref),
            guarded=guarded,
        )
    assert embeddings is not None
    queries, documents = embeddings
    return score.bi_encoder_scores(pairs, queries.ids, queries.vectors, documents.ids, documents.vectors)


def _cross_encoder(ref: ModelRef, config: MineConfig, show_progress: bool | None = None) -> Any:
    return _loaded(load_cross_encoder, ref, config, config.show_progress if show_progress is None else show_progress)


def teacher_cache(ref: ModelRef, config: MineConfig) -> TeacherScoreCache | None:
    folder = cache_dir(config)
    return TeacherScoreCache(folder, {model_key(ref): ref.spec}, ref.precision) if folder else None


def cache_dir(config: MineConfig) -> Path | None:
    """Where computed artefacts are kept: the cache, or with Dask and no cache a folder the run removes at the end.

    Dask workers hand their shards over through it, so it must be on a path every worker sees.
    """
    if config.cache:
        return config.cache_dir
    return work_dir(config.out) / "shard-cache" if config.dask else None


def _workers(config: MineConfig, shards: ShardRunner) -> Workers:
    folder = cache_dir(config)
    assert folder is not None
    return Workers(shards, work_dir(config.out) / "shards", folder, threads(config))


def distributed_embeddings(
    data: Ingested, ref: ModelRef, config: MineConfig, shards: ShardRunner, doc_ids: pa.Array | None = None
) -> None:
    """Encode what the cache lacks on the workers, shard by shard; `embed` then finds it all cached."""
    corpus = _documents(data, doc_ids)
    workers = _workers(config, shards)
    for kind, table in (("query", data.queries), ("document", corpus)):
        prefill_embeddings(table, kind=kind, ref=ref, batch_size=config.models.batch_size, workers=workers)


def distributed_teacher_scores(
    pairs: pa.Table, data: Ingested, ref: ModelRef, config: MineConfig, shards: ShardRunner
) -> None:
    """Score what the teacher cache lacks on the workers; the teacher stage then finds it all cached."""
    batch_size = config.models.teacher_batch_size
    workers = _workers(config, shards)
    prefill_teacher_scores(pairs, data.queries, data.corpus, ref=ref, batch_size=batch_size, workers=workers)


def searched(run: StageRunner, shards: ShardRunner | None, name: str, stage: Callable[..., Any], *args: Any) -> Any:
    """A retrieval stage: through `run`, or with `shards` called here with them. Its query shards are then
    tasks of their own, which Prefect runs on the cluster only when the flow itself submits them, not a task."""
    return run(name, stage, *args) if shards is None else stage(*args, shards)


def resolve_models(config: MineConfig) -> tuple[ModelRef, ModelRef | None]:
    """(embedding model, cross-encoder or None), each found on disk (a hub id fetched) and the cross-encoder
    checked to be one: entry points call this before any stage, so a wrong model costs nothing."""
    trust = config.models.trust_remote_code
    embedding = resolve_model(config.models.embedding_model, trust_remote_code=trust)
    if config.models.cross_encoder is None:
        return embedding, None
    teacher = resolve_model(config.models.cross_encoder, role="cross-encoder", trust_remote_code=trust)
    if not config.models.allow_untrained_head:
        check_cross_encoder(teacher)
    return embedding, teacher


def score_candidates(
    data: Ingested,
    config: MineConfig,
    run: StageRunner = run_directly,
    shards: ShardRunner | None = None,
    vectors_dir: Path | None = None,
    concurrent_bm25: bool = False,
) -> Scored:
    """BM25 + dense candidates, merged, then teacher scores for every candidate and positive.

    With `shards` (a Dask cluster), encoding and cross-encoder scoring run on its workers first. With
    `vectors_dir`, embeddings are kept in files there instead of in memory. With `concurrent_bm25`, BM25 (the
    JVM's start, indexing, search: mostly one core) runs beside loading the model and encoding, which start
    as torch is imported (another core, mostly), instead of before them.
    """
    embedding_ref, teacher_ref = resolve_models(config)
    retrieval = config.retrieval
    search_bm25 = functools.partial(searched, run, shards, "bm25", bm25_candidates, data, config)
    if not retrieval.bm25:
        bm25_search = finished((None, {}))
    elif concurrent_bm25:
        bm25_search = in_background(search_bm25, "bm25")
    else:
        bm25_search = finished(search_bm25())
    chosen_precision = {}
    if retrieval.dense or teacher_ref is None or config.filter.needs_geometry:
        embedding_ref, chosen_precision["embedding"] = run(
            "precision", embedding_precision, data, embedding_ref, config
        )
    if bm25_search.done() and bm25_search.exception() is not None:
        bm25_search.result()  # its error now, not after the encoding
    if shards is not None and retrieval.dense:
        distributed_embeddings(data, embedding_ref, config, shards)
    # A guard that ran leaves its sample encoded in batches of its own, which the stage repeats where no cache has them.
    embed_guarded = guard_ran(chosen_precision.get("embedding"))
    embeddings = (
        run("embed", embed, data, embedding_ref, config, None, vectors_dir, embed_guarded) if retrieval.dense else None
    )
    dense, dense_index = None, {}
    if embeddings is not None:
        dense, dense_index = searched(run, shards, "dense", dense_candidates, embeddings, config)
    bm25, bm25_counts = result_of(bm25_search)
    pool = run("pool", candidates.candidate_pool, bm25, dense, rrf_k=retrieval.rrf_k, bm25_pool_k=retrieval.bm25_k)
    pairs = score.teacher_pairs(pool, data.qrels)
    if embeddings is None and (teacher_ref is None or config.filter.needs_geometry):
        # Dense retrieval is off but the bi-encoder is needed (teacher or geometry): embed only what it scores.
        doc_ids = pc.unique(pairs["doc_id"])
        if shards is not None:
            distributed_embeddings(data, embedding_ref, config, shards, doc_ids=doc_ids)
        embeddings = run("embed", embed, data, embedding_ref, config, doc_ids, vectors_dir, embed_guarded)
    if teacher_ref is not None:
        teacher_ref, chosen_precision["teacher"] = run(
            "teacher-precision", teacher_precision, pairs, data, teacher_ref, config
        )
    if shards is not None and teacher_ref is not None:
        distributed_teacher_scores(pairs, data, teacher_ref, config, shards)
    teacher_guarded = guard_ran(chosen_precision.get("teacher"))
    scores = run("teacher", teacher_scores, pairs, data, config, teacher_ref, embeddings, teacher_guarded)
    counts = {
        "pool": pool.num_rows,
        "bm25_hits": pc.sum(pc.less_equal(bm25["rank"], retrieval.bm25_k)).as_py() or 0 if bm25 is not None else 0,
        "bm25_evidence_hits": bm25.num_rows if bm25 is not None else 0,
        "dense_hits": dense.num_rows if dense is not None else 0,
        **{f"source_{s}": pc.sum(pc.equal(pool["source"], s)).as_py() or 0 for s in ("bm25", "dense", "both")},
    }
    _handed_over.clear()  # a model no stage took (the workers encoded): not kept for the process's lifetime
    return Scored(
        pool=pool,
        teacher_scores=scores,
        embeddings=embeddings,
        models={"embedding": embedding_ref, **({"teacher": teacher_ref} if teacher_ref else {})},
        teacher=f"cross-encoder:{teacher_ref.spec}" if teacher_ref else f"bi-encoder:{embedding_ref.spec}",
        counts={
            "candidates": counts,
            "teacher": {"pairs_scored": scores.num_rows},
            "embeddings": _embedding_counts(embeddings, chosen_precision.get("embedding", {}).get("guard")),
            "bm25_index": bm25_counts,
            "dense_index": dense_index,
        },
        precision=chosen_precision,
    )


def guard_ran(record: dict[str, Any] | None) -> bool:
    """Whether a precision record's guard computed its sample (its figures), rather than not running."""
    return isinstance((record or {}).get("guard"), dict)


def _embedding_counts(embeddings: tuple[Embeddings, Embeddings] | None, guard: Any = None) -> dict[str, int]:
    """Texts encoded by this run (by the precision guard or the encoding stage) and texts the cache gave."""
    if embeddings is None:
        return {}
    by_guard = guard.get("encoded", {}) if isinstance(guard, dict) else {}
    counts = {}
    for kind, table in zip(("queries", "documents"), embeddings, strict=True):
        encoded = min(len(table.ids), table.encoded + by_guard.get(kind, 0))
        counts[f"{kind}_encoded"] = encoded
        counts[f"{kind}_from_cache_or_duplicates"] = len(table.ids) - encoded
        counts[f"{kind}_truncated"] = table.truncated
    return counts


def select_negatives(scored: Scored, data: Ingested, config: MineConfig, run: StageRunner = run_directly) -> Selected:
    """Resolve the settings the data decides, filter the scored pool, then sample negatives per (query, positive)."""
    geometry = None
    if config.filter.needs_geometry:
        assert scored.embeddings is not None
        geometry = run("geometry", score.positive_geometry, scored.pool, data.qrels, *scored.embeddings)
    resolved, choice = run(
        "calibrate",
        calibrate.resolve_filter,
        scored.pool,
        scored.teacher_scores,
        data.qrels,
        data.corpus,
        scored.embeddings,
        geometry,
        config.filter,
        config.sample,
    )
    judged = run(
        "filter",
        positive_aware_filter,
        scored.pool,
        scored.teacher_scores,
        data.qrels,
        data.corpus,
        resolved,
        geometry,
        config.sample.num_negatives,
    )
    selected, sample_counts = run(
        "sample", sample.sample_negatives, judged, data.qrels, scored.teacher_scores, config.sample
    )
    counts = filter_counts(judged)
    if selected.num_rows == 0:
        raise no_negatives_error(counts, scored.pool.num_rows)
    return Selected(judged, selected, {"filter": counts, "sample": sample_counts}, choice)


def batch_context(
    negatives: pa.Table, data: Ingested, embeddings: tuple[Embeddings, Embeddings] | None, config: MineConfig
) -> BatchContext | None:
    """What the batched formats need besides the rows, or None when none is chosen. The embeddings are the run's
    own; a run without them (cross-encoder teacher, no dense retrieval, no geometry rule) encodes the queries
    and the passages the rows and judgements name (from the cache when it has them)."""
    if not any(name in BATCHED_FORMATS for name in config.formats):
        return None
    assert config.batches.size is not None  # the config refuses batched formats without a size
    check_batch_size(config.batches.size, pc.count_distinct(negatives["query_id"]).as_py(), "the mined rows")
    named = pa.chunked_array(
        [*negatives["positive_id"].chunks, *negatives["negative_id"].chunks, *data.qrels["doc_id"].chunks]
    )
    if embeddings is None:
        embedding_ref = resolve_model(config.models.embedding_model, trust_remote_code=config.models.trust_remote_code)
        embeddings = embed(data, embedding_ref, config, pc.unique(named))
    queries, documents = embeddings
    return BatchContext(
        size=config.batches.size,
        seed=config.sample.seed,
        near_copy=config.batches.near_copy,
        check_negatives=config.batches.check_negatives,
        qrels=pl.from_arrow(data.qrels.select(["query_id", "doc_id"])),
        text_hashes=pl.from_arrow(rows_named(data.corpus, "doc_id", named).select(["doc_id", "text_hash"])),
        query_ids=queries.ids.to_pylist(),
        query_vectors=queries.vectors,
        doc_ids=documents.ids.to_pylist(),
        doc_vectors=documents.vectors,
    )


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
