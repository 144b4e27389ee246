"""Candidates: BM25 (pyserini/Lucene) and dense (faiss) top-k, merged into one candidate pool."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from miner import schema
from miner.atomic import atomic_write, write_json_atomic
from miner.background import side_by_side
from miner.cache import note_use
from miner.config import DenseIndexSpec
from miner.java import anserini_jar, start_jvm
from miner.language import analyzer_name
from miner.tables import drop_mapped_pages, file_sha256
from miner.vectors import exact_top_k, stacked

log = logging.getLogger(__name__)

# Queries per shard of exact dense search.
QUERY_BATCH = 4096


def ranked(frame: pl.DataFrame) -> pa.Table:
    """(query_id, doc_id, score) -> RETRIEVED, ranking by score then doc_id so ties never depend on order."""
    return schema.conform(
        frame.sort(["query_id", "score", "doc_id"], descending=[False, True, False]).with_columns(
            rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("query_id")
        ),
        schema.RETRIEVED,
    )


# --- BM25 -------------------------------------------------------------------------------------------


def bm25_index_settings(language: str = "en") -> str:
    """What decides the index's content besides the documents: a cached index is reused only if it matches."""
    # English keeps the key it had before languages existed, so English indexes already cached stay valid.
    analyzer = "anserini-default-english" if language == "en" else f"{analyzer_name(language)};language={language}"
    return f"analyzer={analyzer};fields=id,contents;jar={anserini_jar().name}"


def _indexer(index_dir: Path, append: bool, threads: int, language: str) -> Any:
    """Anserini's SimpleIndexer with the analyser of `language` (its default English one for `en`)."""
    from jnius import autoclass  # the caller started the JVM

    simple_indexer = autoclass("io.anserini.index.SimpleIndexer")
    if language == "en":
        return simple_indexer(str(index_dir), append, int(threads))
    # Only the argument form picks another analyser: Anserini's `-language`, as pyserini's LuceneIndexer passes
    # it. `-input` is unused (documents come from us); the RAM buffer is the one the plain constructor uses.
    arguments = ["-index", str(index_dir), "-input", "", "-collection", "JsonCollection"]
    arguments += ["-threads", str(int(threads)), "-language", language, "-memoryBuffer", "2048"]
    return simple_indexer([*arguments, *(["-append"] if append else [])])


# A table, or tables / record batches one after another (Parquet shards read batch by batch, say).
CorpusBatches = pa.Table | Iterable[pa.Table | pa.RecordBatch]
# Anserini's SimpleIndexer keeps up to 2 GB of postings in memory before it writes a segment: more than the
# JVM's heap (miner.java.DEFAULT_HEAP). Committing after this much text bounds that buffer, so indexing
# memory does not grow with the corpus (a million Cranfield-like documents, 1 GB of text, fitted uncommitted
# in a 1 GB heap).
COMMIT_TEXT_BYTES = 512 * 2**20


def build_bm25_index(
    corpus: CorpusBatches,
    index_dir: Path,
    *,
    threads: int,
    batch_size: int = 10_000,
    append: bool = False,
    commit_bytes: int = COMMIT_TEXT_BYTES,
    language: str = "en",
) -> int:
    """Index (doc_id, text) rows into a Lucene index at `index_dir`, analysed for `language` (miner/language.py).

    Only one batch of `batch_size` texts is held in Python at a time. With `append`, the rows are added to the
    index already there. Returns the number of documents Lucene indexed.
    """
    start_jvm()
    # Anserini's Java classes directly: pyserini's Python wrappers import torch and transformers (seconds of
    # start-up) for encoders BM25 never uses.
    indexer = _indexer(index_dir, append, threads, language)
    given = indexed = uncommitted = 0
    try:
        for batch in _record_batches(corpus, batch_size):
            # JSON lines, parsed on Lucene's indexing threads: one call into Java per batch, not one per document.
            documents = _json_documents(batch)
            drop_mapped_pages()
            indexed += indexer.addRawDocuments(documents)
            given += batch.num_rows
            uncommitted += batch.column("text").nbytes
            if uncommitted >= commit_bytes:
                indexer.close()
                indexer = None  # not closed twice should reopening fail
                indexer = _indexer(index_dir, True, threads, language)
                uncommitted = 0
    finally:
        if indexer is not None:
            indexer.close()
    if indexed < given:
        log.warning("Lucene left out %d of %d documents (empty after trimming)", given - indexed, given)
    return indexed


def _record_batches(corpus: CorpusBatches, size: int) -> Iterator[pa.RecordBatch]:
    for piece in [corpus] if isinstance(corpus, pa.Table) else corpus:
        table = piece if isinstance(piece, pa.Table) else pa.Table.from_batches([piece])
        yield from table.select(["doc_id", "text"]).to_batches(max_chunksize=size)


def _json_documents(batch: pa.RecordBatch) -> list[str]:
    """Rows as Anserini's JSON documents ({"id", "contents"}), encoded by polars rather than row by row."""
    frame = pl.from_arrow(batch)
    assert isinstance(frame, pl.DataFrame)
    document = pl.struct(id=pl.col("doc_id").cast(pl.String), contents=pl.col("text"))
    return frame.select(document.struct.json_encode()).to_series().to_list()


def bm25_search(
    index_dir: Path,
    queries: pa.Table,
    *,
    k: int,
    threads: int,
    k1: float = 0.9,
    b: float = 0.4,
    language: str = "en",
) -> pa.Table:
    """QUERIES -> RETRIEVED: BM25 top-k per query, `threads` queries searched at a time.

    The queries are analysed for `language`: it must be the language the index was built with. The hits are
    the ones Anserini's SimpleSearcher returns, with its scores; see `_LuceneBm25`.
    """
    start_jvm()
    searcher = _LuceneBm25(index_dir, k1=k1, b=b, language=language)
    texts = queries.column("text").to_pylist()
    parts = max(1, min(int(threads), len(texts)))
    bounds = [len(texts) * part // parts for part in range(parts + 1)]
    try:
        parts_of_texts = [texts[a:z] for a, z in itertools.pairwise(bounds)]
        # Daemon threads: an interrupted run must not wait for Lucene to finish (miner/background.py).
        found = side_by_side(lambda part: searcher.search(part, k), parts_of_texts, "bm25-search")
    finally:
        searcher.close()
    per_query = [hits for part in found for hits in part]  # in the queries' order
    doc_ids = [doc_id for ids, _ in per_query for doc_id in ids]
    scores = np.concatenate([tie_adjusted(raw) for _, raw in per_query] or [np.zeros(0, np.float32)])
    rows = np.repeat(np.arange(len(texts)), [len(ids) for ids, _ in per_query])
    query_ids = queries.column("query_id").take(pa.array(rows))
    return ranked(
        pl.DataFrame(
            {"query_id": query_ids, "doc_id": doc_ids, "score": scores},
            schema={"query_id": pl.String, "doc_id": pl.String, "score": pl.Float32},
        )
    )


class _LuceneBm25:
    """Anserini's BM25 search, one query at a time on Lucene's own classes.

    SimpleSearcher.batch_search hands back one Java object per hit, and reading each hit's id and score through
    the Java bridge holds Python's lock: about a second per 200,000 hits, taken from the model loading beside
    it. Here each query's hits come back as two arrays (ids and scores) that the bridge copies in one call
    each, and the bridge lets go of the lock while Lucene searches. The query, the similarity and the order
    (score, then id) are SimpleSearcher's, so the hits are the same; its rounding of the scores is
    `tie_adjusted`.
    """

    def __init__(self, index_dir: Path, *, k1: float, b: float, language: str) -> None:
        from jnius import autoclass, cast  # after start_jvm: importing jnius starts the JVM

        simple = autoclass("io.anserini.search.SimpleSearcher")(str(index_dir))
        try:
            if language != "en":
                simple.set_language(language)
            self._analyzer = simple.get_analyzer()
        finally:
            simple.close()
        path = autoclass("java.io.File")(str(index_dir)).toPath()
        self._reader = autoclass("org.apache.lucene.index.DirectoryReader").open(
            autoclass("org.apache.lucene.store.FSDirectory").open(path)
        )
        self._searcher = autoclass("org.apache.lucene.search.IndexSearcher")(
            cast("org.apache.lucene.index.IndexReader", self._reader)
        )
        self._searcher.setSimilarity(autoclass("org.apache.lucene.search.similarities.BM25Similarity")(k1, b))
        sort_field = autoclass("org.apache.lucene.search.SortField")
        by_id = sort_field("id", autoclass("org.apache.lucene.search.SortField$Type").STRING_VAL)
        self._order = autoclass("org.apache.lucene.search.Sort")(sort_field.FIELD_SCORE, by_id)
        self._queries = autoclass("io.anserini.search.query.BagOfWordsQueryGenerator")()
        self._hits = autoclass("io.anserini.search.ScoredDocs")

    def search(self, texts: list[str], k: int) -> list[tuple[list[str], np.ndarray]]:
        """Each text's hits: (doc ids, raw float32 scores), best first."""
        from jnius import detach

        try:
            found = []
            for text in texts:
                query = self._queries.buildQuery("contents", self._analyzer, text)
                hits = self._hits.fromTopDocs(self._searcher.search(query, int(k), self._order, True), self._searcher)
                found.append((list(hits.docids), np.asarray(hits.scores, dtype=np.float32)))
            return found
        finally:
            detach()  # the thread leaves the JVM as it ends

    def close(self) -> None:
        self._reader.close()


def tie_adjusted(scores: np.ndarray) -> np.ndarray:
    """One query's BM25 scores (best first) as Anserini's ScoreTiesAdjusterReranker leaves them, with the
    arithmetic its compiled class does: rounded to 1e-4 in double precision (half up) and stored as float32,
    then each score within 1e-4 of the one before it lowered by 1e-6 per step of the run, in float32, so that
    the scores alone give the rank order."""
    scaled = scores.astype(np.float64) * 1e4
    whole = np.floor(scaled)
    rounded = ((whole + (scaled - whole >= 0.5)) / 1e4).astype(np.float32)
    close = np.float32(1e-4)
    near = np.flatnonzero(rounded[:-1] - rounded[1:] <= close)
    if near.size == 0:
        return rounded  # no score is lowered, so none comes within 1e-4 of the next either
    adjusted = rounded.copy()
    step = np.float32(1e-6)
    run = 0
    for i in range(int(near[0]) + 1, adjusted.size):
        if adjusted[i - 1] - adjusted[i] > close:
            run = 0
        else:
            run += 1
            adjusted[i] = adjusted[i] - step * np.float32(run)
    return adjusted


# --- dense ------------------------------------------------------------------------------------------

# faiss's default: candidates kept per insertion while the HNSW graph is built.
HNSW_EF_CONSTRUCTION = 40
# IVF lists are trained by k-means on up to this many vectors per list (faiss warns below 39), for this many
# rounds: enough for stable lists, while training a million documents takes minutes, not hours.
IVF_TRAINING_VECTORS_PER_LIST = 64
IVF_TRAINING_ROUNDS = 20
INDEX_FILE_SUFFIX = ".faiss"


def ivf_lists(documents: int) -> int:
    """About 4 x sqrt(N) lists, but never fewer than 39 training vectors per list."""
    return max(1, min(round(4 * math.sqrt(documents)), documents // 39))


def dense_retrieve(
    query_ids: pa.Array | pa.ChunkedArray,
    query_vectors: np.ndarray,
    doc_ids: pa.Array | pa.ChunkedArray,
    doc_vectors: np.ndarray,
    *,
    k: int,
    threads: int,
    spec: DenseIndexSpec = DenseIndexSpec(),
    cache_dir: Path | None = None,
    exact: ExactSearch | None = None,
    cache_label: str = "",
) -> tuple[pa.Table, dict[str, Any]]:
    """Dense top-k through the index `spec` picks -> (RETRIEVED, what searched: kind, settings, measured recall).

    An approximate index is kept in `cache_dir` (when given) under a hash of the vectors and its settings,
    and reused by the next run over the same vectors; `cache_label` names the model that made them there.
    """
    documents = len(doc_vectors)
    kind = spec.resolve(documents)
    info: dict[str, Any] = {"kind": kind, "requested": spec.kind, "documents": documents}
    if kind == "flat":
        search = exact or exact_search
        retrieved = dense_search(query_ids, query_vectors, doc_ids, doc_vectors, k=k, threads=threads, exact=search)
        return retrieved, {**info, "exact": True}
    settings = index_settings(kind, documents, spec)
    index, reused = cached_dense_index(
        kind, doc_vectors, settings, cache_dir=cache_dir, threads=threads, label=cache_label
    )
    k = min(k, documents)
    settings.update(configure_search(index, kind, spec, k))
    retrieved = dense_search(query_ids, query_vectors, doc_ids, doc_vectors, k=k, threads=threads, index=index)
    info.update(settings, exact=False, reused_from_cache=reused)
    sampled = min(spec.recall_queries, len(query_vectors))
    if sampled:
        recall = ann_recall(index, doc_vectors, query_vectors, k=k, sample=sampled, seed=spec.seed)
        info.update(k=k, recall_at_k=round(recall, 4), recall_queries=sampled)
    return retrieved, info


def index_settings(kind: str, documents: int, spec: DenseIndexSpec) -> dict[str, Any]:
    """What decides an approximate index's content: its key in the cache."""
    if kind == "hnsw":
        return {"hnsw_m": spec.hnsw_m, "hnsw_ef_construction": HNSW_EF_CONSTRUCTION}
    return {
        "ivf_nlist": ivf_lists(documents),
        "ivf_training_vectors_per_list": IVF_TRAINING_VECTORS_PER_LIST,
        "ivf_training_rounds": IVF_TRAINING_ROUNDS,
        "ivf_seed": spec.seed,
    }


def configure_search(index: Any, kind: str, spec: DenseIndexSpec, k: int) -> dict[str, int]:
    """Set the search-time settings `spec` asks for on `index`; returns them as set."""
    if kind == "hnsw":
        index.hnsw.efSearch = max(spec.hnsw_ef_search, k)  # HNSW cannot return more than efSearch hits
        return {"hnsw_ef_search": index.hnsw.efSearch}
    index.nprobe = min(spec.ivf_nprobe, index.nlist)
    return {"ivf_nprobe": index.nprobe}


def build_dense_index(kind: str, vectors: np.ndarray, settings: dict[str, Any], *, threads: int) -> Any:
    """An HNSW or IVF inner-product index over `vectors` (a faiss.Index), the same one every time."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings["hnsw_ef_construction"]
        # faiss inserts in an unspecified order on several threads, so such a graph differs run to run (faiss
        # issues 983 and 2548); one thread builds the same graph every time, and the graph is then cached.
        faiss.omp_set_num_threads(1)
        index.add(vectors)
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, settings["ivf_nlist"], faiss.METRIC_INNER_PRODUCT)
        # k-means is seeded and, for a given number of threads, repeatable.
        index.cp.seed = settings["ivf_seed"]
        index.cp.niter = settings["ivf_training_rounds"]
        index.cp.max_points_per_centroid = settings["ivf_training_vectors_per_list"]
        faiss.omp_set_num_threads(threads)
        index.train(vectors)
        index.add(vectors)
    else:
        raise ValueError(f"no approximate index of kind {kind!r}")
    faiss.omp_set_num_threads(threads)
    return index


def cached_dense_index(
    kind: str, vectors: np.ndarray, settings: dict[str, Any], *, cache_dir: Path | None, threads: int, label: str = ""
) -> tuple[Any, bool]:
    """(index, whether it came from `cache_dir`): a cached index of the same vectors and settings, else a new one.

    The index file is written whole under a temporary name, then its checksum beside it: an index whose file
    fails the checksum (damaged, truncated) is discarded with a warning and rebuilt, never used; one without
    a checksum (a run stopped between the two writes) is rebuilt.
    """
    if cache_dir is None:
        return build_dense_index(kind, vectors, settings, threads=threads), False
    path = cache_dir / f"{kind}-{_index_key(kind, vectors, settings)}{INDEX_FILE_SUFFIX}"
    index = _read_cached_index(path, vectors)
    reused = index is not None
    if index is None:
        index = build_dense_index(kind, vectors, settings, threads=threads)
        _write_cached_index(index, path, settings)
    note_use(path, kind="dense index", model=label, precision="float32", text=f"documents ({kind})")
    return index, reused


def _index_key(kind: str, vectors: np.ndarray, settings: dict[str, Any]) -> str:
    # The index holds row numbers, not ids: the same vectors under other ids give the same index.
    import faiss

    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([faiss.__version__, kind, settings, vectors.shape], sort_keys=True).encode())
    digest.update(np.ascontiguousarray(vectors, dtype=np.float32).data)
    return digest.hexdigest()


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_cached_index(path: Path, vectors: np.ndarray) -> Any | None:
    import faiss

    record_path = _checksum_path(path)
    if not path.is_file() or not record_path.is_file():
        return None
    problem = None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if file_sha256(path) != record["sha256"]:
            problem = "failed its checksum"
        else:
            index = faiss.read_index(str(path))
            if (index.ntotal, index.d) != vectors.shape:
                problem = f"holds {index.ntotal} vectors of {index.d} dimensions, not {vectors.shape}"
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        problem = f"is unreadable ({' '.join(str(error).split())[:200]})"
    if problem is not None:
        log.warning("cached dense index %s %s; discarding it and building it again", path, problem)
        path.unlink(missing_ok=True)
        record_path.unlink(missing_ok=True)
        return None
    return index


def _write_cached_index(index: Any, path: Path, settings: dict[str, Any]) -> None:
    import faiss

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        faiss.write_index(index, str(temporary))
        checksum = file_sha256(temporary)
    record = {"sha256": checksum, "vectors": index.ntotal, "dimensions": index.d, "settings": settings}
    write_json_atomic(record, _checksum_path(path))


def ann_recall(
    index: Any, doc_vectors: np.ndarray, query_vectors: np.ndarray, *, k: int, sample: int, seed: int
) -> float:
    """Mean recall@k of `index` against exact search, over `sample` of the queries drawn with `seed`."""
    rows = np.sort(np.random.default_rng(seed).choice(len(query_vectors), size=sample, replace=False))
    chosen = np.ascontiguousarray(query_vectors[rows], dtype=np.float32)
    k = min(k, len(doc_vectors))
    _, exact = exact_top_k(chosen, doc_vectors, k)
    _, approximate = index.search(chosen, k)
    found = sum(np.intersect1d(got, wanted).size for got, wanted in zip(approximate, exact, strict=True))
    return found / (len(rows) * k)


# (query vectors, document vectors, k) -> (scores, document rows), each (queries, k), best first.
ExactSearch = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def query_shards(queries: int) -> list[tuple[int, int]]:
    """(start, stop) rows of the query shards exact search goes through, here or on Dask workers alike."""
    return [(start, min(start + QUERY_BATCH, queries)) for start in range(0, queries, QUERY_BATCH)]


def exact_search(query_vectors: np.ndarray, doc_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k in this process, a query shard at a time, each over the documents a block at a time."""
    shards = query_shards(len(query_vectors))
    return stacked([exact_top_k(query_vectors[start:stop], doc_vectors, k) for start, stop in shards], k)


def dense_search(
    query_ids: pa.Array | pa.ChunkedArray,
    query_vectors: np.ndarray,
    doc_ids: pa.Array | pa.ChunkedArray,
    doc_vectors: np.ndarray,
    *,
    k: int,
    threads: int,
    index: Any | None = None,
    exact: ExactSearch = exact_search,
) -> pa.Table:
    """Inner-product top-k (cosine on normalised vectors) with faiss -> RETRIEVED.

    Exact (through `exact`, which may spread the query shards over workers) unless an `index` built over
    `doc_vectors` is given (see `dense_retrieve`).
    """
    import faiss

    faiss.omp_set_num_threads(threads)
    k = min(k, len(doc_ids))
    if index is None:
        similarity, found = exact(query_vectors, doc_vectors, k)
    else:
        shards = query_shards(len(query_vectors))
        batches = [np.ascontiguousarray(query_vectors[start:stop], np.float32) for start, stop in shards]
        similarity, found = stacked([index.search(batch, k) for batch in batches], k)
    flat = found.reshape(-1)
    valid = flat >= 0  # faiss pads with -1 when it finds fewer than k
    query_rows = np.repeat(np.arange(len(query_vectors)), k)[valid]
    frame = pl.DataFrame(
        {
            "query_id": _series(query_ids).gather(query_rows),
            "doc_id": _series(doc_ids).gather(flat[valid]),
            "score": similarity.reshape(-1)[valid].astype(np.float32),
        }
    )
    return ranked(frame)


def _series(values: pa.Array | pa.ChunkedArray) -> pl.Series:
    series = pl.from_arrow(values)
    assert isinstance(series, pl.Series)
    return series.cast(pl.String)


# --- the pool ---------------------------------------------------------------------------------------


def candidate_pool(
    bm25: pa.Table | None, dense: pa.Table | None, *, rrf_k: int = 60, bm25_pool_k: int | None = None
) -> pa.Table:
    """Two RETRIEVED lists (either may be None) -> CANDIDATES, fused by reciprocal rank fusion.

    With `bm25_pool_k`, only BM25's top `bm25_pool_k` become candidates; its deeper hits only fill in the BM25
    rank and score of candidates dense retrieval found (evidence for the filter, not more pairs to score).
    """
    empty = pl.DataFrame(schema={"query_id": pl.String, "doc_id": pl.String, "rank": pl.Int32, "score": pl.Float32})
    deep = None
    if bm25 is not None and bm25_pool_k is not None:
        ranks = pl.from_arrow(bm25)
        assert isinstance(ranks, pl.DataFrame)
        deep = ranks.filter(pl.col("rank") > bm25_pool_k).rename({"rank": "_deep_rank", "score": "_deep_score"})
        bm25 = ranks.filter(pl.col("rank") <= bm25_pool_k).to_arrow()

    def prefixed(table: pa.Table | None, name: str) -> pl.DataFrame:
        frame = pl.from_arrow(table) if table is not None else empty
        assert isinstance(frame, pl.DataFrame)
        return frame.rename({"rank": f"{name}_rank", "score": f"{name}_score"})

    pool = prefixed(bm25, "bm25").join(prefixed(dense, "dense"), on=["query_id", "doc_id"], how="full", coalesce=True)
    reciprocal = [(1.0 / (rrf_k + pl.col(f"{name}_rank"))).fill_null(0.0) for name in ("bm25", "dense")]
    pool = (
        pool.with_columns(
            fused_score=reciprocal[0] + reciprocal[1],
            source=pl.when(pl.col("bm25_rank").is_not_null() & pl.col("dense_rank").is_not_null())
            .then(pl.lit("both"))
            .when(pl.col("bm25_rank").is_not_null())
            .then(pl.lit("bm25"))
            .otherwise(pl.lit("dense")),
        )
        .sort(["query_id", "fused_score", "doc_id"], descending=[False, True, False])
        .with_columns(fused_rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("query_id"))
    )
    if deep is not None:
        pool = pool.join(deep, on=["query_id", "doc_id"], how="left").with_columns(
            bm25_rank=pl.coalesce("bm25_rank", "_deep_rank"), bm25_score=pl.coalesce("bm25_score", "_deep_score")
        )
    return schema.conform(pool, schema.CANDIDATES)
