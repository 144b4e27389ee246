from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from miner import schema
from miner.candidates import bm25_search, build_bm25_index, candidate_pool, dense_search
from miner.ingest import ingest
from miner.models import encode


@pytest.fixture(scope="module")
def small(small_beir: Path):
    return ingest(small_beir)


@pytest.fixture(scope="module")
def bm25_index(small, tmp_path_factory: pytest.TempPathFactory) -> Path:
    index_dir = tmp_path_factory.mktemp("bm25") / "index"
    build_bm25_index(small.corpus, index_dir, threads=2, batch_size=50)  # several batches
    return index_dir


def test_bm25_finds_the_passage_that_shares_the_words(bm25_index: Path, small) -> None:
    corpus = pl.from_arrow(small.corpus)
    target = corpus.filter(pl.col("doc_id") == "12")["text"][0]
    queries = pa.table({"query_id": ["exact"], "text": [target], "text_hash": ["x"]})
    hits = pl.from_arrow(bm25_search(bm25_index, queries, k=5, threads=2))
    assert hits["doc_id"][0] == "12"
    assert hits["rank"].to_list() == [1, 2, 3, 4, 5]
    assert hits["score"].is_sorted(descending=True)


def test_bm25_searches_every_query_with_lucene_syntax_taken_literally(bm25_index: Path, small) -> None:
    odd = pa.table({"query_id": ["odd"], "text": ['wing AND "lift" OR: (flow) ~ * ?'], "text_hash": ["y"]})
    queries = pa.concat_tables([small.queries, odd])
    table = bm25_search(bm25_index, queries, k=10, threads=2)
    assert table.schema == schema.RETRIEVED
    hits = pl.from_arrow(table)
    assert set(hits["query_id"]) == set(queries["query_id"].to_pylist())
    assert hits.group_by("query_id").len()["len"].max() == 10
    assert set(hits["doc_id"]) <= set(small.corpus["doc_id"].to_pylist())


def test_bm25_hits_and_scores_are_anserinis_own(bm25_index: Path, small) -> None:
    """Our search reads Lucene directly; Anserini's SimpleSearcher.batch_search is the reference it must equal,
    hit for hit and score for score (its rounding and tie perturbation included), at a depth past every match."""
    from jnius import autoclass

    from miner.candidates import ranked

    simple = autoclass("io.anserini.search.SimpleSearcher")(str(bm25_index))
    simple.set_bm25(0.9, 0.4)
    texts, ids = autoclass("java.util.ArrayList")(), autoclass("java.util.ArrayList")()
    queries = small.queries
    for text, query_id in zip(queries.column("text").to_pylist(), queries.column("query_id").to_pylist(), strict=True):
        texts.add(text)
        ids.add(query_id)
    rows = [
        (entry.getKey(), hit.docid, hit.score)
        for entry in simple.batch_search(texts, ids, 1000, 2).entrySet().toArray()
        for hit in entry.getValue()
    ]
    simple.close()
    reference = ranked(
        pl.DataFrame(rows, schema={"query_id": pl.String, "doc_id": pl.String, "score": pl.Float32}, orient="row")
    )
    ours = bm25_search(bm25_index, small.queries, k=1000, threads=2)
    assert ours.num_rows == reference.num_rows > 1000
    assert ours.equals(reference)


def test_tie_adjusted_rounds_in_double_and_lowers_each_tie() -> None:
    from miner.candidates import tie_adjusted

    # x 1e4 is 24922.4997 in double (rounds down) but 24922.5 in float32 (would round up): the class rounds in double.
    assert tie_adjusted(np.array([2.49225], dtype=np.float32)).tolist() == [np.float32(2.4922)]
    adjusted = tie_adjusted(np.array([5.0, 3.00001, 3.0, 3.0, 1.0], dtype=np.float32))
    one, two = np.float32(1e-6), np.float32(2e-6)
    assert adjusted.tolist() == [5.0, np.float32(3.0), np.float32(3.0) - one, np.float32(3.0) - two, 1.0]
    assert (np.diff(adjusted) < 0).all()


def test_dense_search_matches_brute_force(small, embedding_model) -> None:
    queries = encode(embedding_model, small.queries["text"], kind="query", batch_size=32, show_progress=False)
    documents = encode(embedding_model, small.corpus["text"], kind="document", batch_size=32, show_progress=False)
    assert np.allclose(np.linalg.norm(documents, axis=1), 1.0, atol=1e-5)
    hits = pl.from_arrow(
        dense_search(small.queries["query_id"], queries, small.corpus["doc_id"], documents, k=7, threads=2)
    )
    doc_ids = np.array(small.corpus["doc_id"].to_pylist())
    for row, query_id in enumerate(small.queries["query_id"].to_pylist()):
        similarity = documents @ queries[row]
        expected = doc_ids[np.argsort(-similarity, kind="stable")[:7]]
        got = hits.filter(pl.col("query_id") == query_id).sort("rank")
        assert got["doc_id"].to_list() == expected.tolist()
        assert np.allclose(got["score"].to_numpy(), np.sort(similarity)[::-1][:7], atol=1e-5)


def test_dense_search_with_k_above_corpus_size(small, embedding_model) -> None:
    vectors = np.eye(3, 8, dtype=np.float32)
    hits = dense_search(pa.array(["q"]), vectors[:1], pa.array(["a", "b", "c"]), vectors, k=50, threads=1)
    assert hits.num_rows == 3


def _retrieved(rows: list[tuple[str, str, int, float]]) -> pa.Table:
    frame = pl.DataFrame(rows, schema=["query_id", "doc_id", "rank", "score"], orient="row")
    return schema.conform(frame, schema.RETRIEVED)


def test_candidate_pool_fuses_ranks_and_labels_sources() -> None:
    bm25 = _retrieved([("q", "a", 1, 9.0), ("q", "b", 2, 8.0), ("q", "c", 3, 7.0)])
    dense = _retrieved([("q", "c", 1, 0.9), ("q", "d", 2, 0.8)])
    pool = pl.from_arrow(candidate_pool(bm25, dense, rrf_k=60)).sort("fused_rank")
    # c: 1/63 + 1/61 beats a: 1/61, which beats d: 1/62 and b: 1/62 (tie broken by id).
    assert pool["doc_id"].to_list() == ["c", "a", "b", "d"]
    assert pool["source"].to_list() == ["both", "bm25", "bm25", "dense"]
    assert pool["fused_score"][0] == pytest.approx(1 / 63 + 1 / 61)
    assert pool.filter(pl.col("doc_id") == "d")["bm25_rank"][0] is None


def test_candidate_pool_with_one_retriever() -> None:
    dense = _retrieved([("q", "x", 1, 0.5), ("q", "y", 2, 0.4)])
    pool = pl.from_arrow(candidate_pool(None, dense))
    assert pool["source"].to_list() == ["dense", "dense"]
    assert pool["fused_rank"].to_list() == [1, 2]
