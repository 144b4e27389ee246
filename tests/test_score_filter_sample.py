from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from miner import schema
from miner.config import FilterConfig, SampleConfig
from miner.filter import filter_counts, positive_aware_filter
from miner.ingest import ingest
from miner.models import encode, load_cross_encoder, resolve_model
from miner.sample import sample_negatives
from miner.score import bi_encoder_scores, cross_encoder_scores, teacher_pairs

# --- teacher scores on real models ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(small_beir: Path):
    return ingest(small_beir)


def _some_pairs(small) -> pa.Table:
    docs = small.corpus["doc_id"].to_pylist()[:6]
    queries = small.queries["query_id"].to_pylist()[:3]
    return schema.conform(
        pl.DataFrame({"query_id": [q for q in queries for _ in docs], "doc_id": docs * len(queries)}), schema.PAIRS
    )


def test_bi_encoder_scores_are_cosines(small, embedding_model) -> None:
    queries = encode(embedding_model, small.queries["text"], kind="query", batch_size=16, show_progress=False)
    documents = encode(embedding_model, small.corpus["text"], kind="document", batch_size=16, show_progress=False)
    scores = pl.from_arrow(
        bi_encoder_scores(_some_pairs(small), small.queries["query_id"], queries, small.corpus["doc_id"], documents)
    )
    q_row = {q: i for i, q in enumerate(small.queries["query_id"].to_pylist())}
    d_row = {d: i for i, d in enumerate(small.corpus["doc_id"].to_pylist())}
    for query_id, doc_id, score in scores.iter_rows():
        assert score == pytest.approx(float(queries[q_row[query_id]] @ documents[d_row[doc_id]]), abs=1e-5)


def test_cross_encoder_scores_match_per_pair_predictions(small, tiny_cross_encoder: Path) -> None:
    model = load_cross_encoder(resolve_model(str(tiny_cross_encoder)))
    pairs = _some_pairs(small)
    scores = pl.from_arrow(
        cross_encoder_scores(pairs, small.queries, small.corpus, model, batch_size=4, show_progress=False)
    )
    assert scores.height == pairs.num_rows
    query_text = dict(zip(small.queries["query_id"].to_pylist(), small.queries["text"].to_pylist(), strict=True))
    doc_text = dict(zip(small.corpus["doc_id"].to_pylist(), small.corpus["text"].to_pylist(), strict=True))
    expected = model.predict([(query_text[q], doc_text[d]) for q, d, _ in scores.iter_rows()], batch_size=1)
    assert np.allclose(scores["teacher_score"].to_numpy(), expected, atol=1e-4)
    assert scores["teacher_score"].n_unique() > 1


def test_teacher_pairs_include_positives_once() -> None:
    pool = schema.conform(
        pl.DataFrame(
            {
                "query_id": ["q", "q"],
                "doc_id": ["a", "p"],
                "bm25_rank": [1, 2],
                "bm25_score": [1.0, 0.5],
                "dense_rank": [None, None],
                "dense_score": [None, None],
                "fused_score": [0.1, 0.05],
                "fused_rank": [1, 2],
                "source": ["bm25", "bm25"],
            }
        ),
        schema.CANDIDATES,
    )
    qrels = schema.conform(
        pl.DataFrame({"query_id": ["q", "q"], "doc_id": ["p", "z"], "relevance": [1, 1]}), schema.QRELS
    )
    assert sorted(teacher_pairs(pool, qrels)["doc_id"].to_pylist()) == ["a", "p", "z"]


# --- the filter on hand-made tables -----------------------------------------------------------------


def _world(candidate_scores: dict[str, float], positive_scores: dict[str, float], texts: dict[str, str] | None = None):
    """One query 'q': candidates with teacher scores, positives with theirs."""
    ids = list(candidate_scores)
    pool = schema.conform(
        pl.DataFrame(
            {
                "query_id": ["q"] * len(ids),
                "doc_id": ids,
                "bm25_rank": list(range(1, len(ids) + 1)),
                "bm25_score": [1.0] * len(ids),
                "dense_rank": [None] * len(ids),
                "dense_score": [None] * len(ids),
                "fused_score": [1.0 / (61 + i) for i in range(len(ids))],
                "fused_rank": list(range(1, len(ids) + 1)),
                "source": ["bm25"] * len(ids),
            },
            schema_overrides={"dense_rank": pl.Int32, "dense_score": pl.Float32},
        ),
        schema.CANDIDATES,
    )
    every = {**candidate_scores, **positive_scores}
    scores = schema.conform(
        pl.DataFrame({"query_id": ["q"] * len(every), "doc_id": list(every), "teacher_score": list(every.values())}),
        schema.TEACHER_SCORES,
    )
    qrels = schema.conform(
        pl.DataFrame(
            {
                "query_id": ["q"] * len(positive_scores),
                "doc_id": list(positive_scores),
                "relevance": [1] * len(positive_scores),
            }
        ),
        schema.QRELS,
    )
    texts = texts or {}
    corpus = schema.conform(
        pl.DataFrame(
            {
                "doc_id": list(every),
                "text": [texts.get(d, d) for d in every],
                "text_hash": [texts.get(d, d) for d in every],
            }
        ),
        schema.CORPUS,
    )
    return pool, scores, qrels, corpus


def _verdicts(world, **settings) -> dict[str, str | None]:
    judged = pl.from_arrow(positive_aware_filter(*world, FilterConfig(**{"expansion_depth": 0, **settings})))
    return dict(zip(judged["doc_id"].to_list(), judged["dropped_by"].to_list(), strict=True))


def test_percpos_drops_candidates_above_pct_of_the_positive() -> None:
    world = _world({"a": 0.90, "b": 0.80, "c": 0.70, "p": 0.85}, {"p": 0.85})
    verdicts = _verdicts(world, method="topk-percpos", pct=0.9)  # ceiling 0.765
    assert verdicts == {"a": "topk-percpos", "b": "topk-percpos", "c": None, "p": "positive"}


def test_percpos_is_sign_safe_for_negative_scores() -> None:
    world = _world({"a": -1.9, "b": -2.1, "c": -3.0}, {"p": -2.0})
    # pct x positive would be -1.8, above the positive; the sign-safe ceiling is -2.0 - 0.1 x 2.0 = -2.2.
    assert _verdicts(world, method="topk-percpos", pct=0.9) == {"a": "topk-percpos", "b": "topk-percpos", "c": None}


def test_marginpos_and_abs() -> None:
    world = _world({"a": 0.79, "b": 0.70, "c": 0.50}, {"p": 0.80})
    assert _verdicts(world, method="topk-marginpos", margin=0.05) == {"a": "topk-marginpos", "b": None, "c": None}
    assert _verdicts(world, method="topk-abs", max_score=0.6) == {"a": "topk-abs", "b": "topk-abs", "c": None}
    assert _verdicts(world, method="none") == {"a": None, "b": None, "c": None}


@pytest.mark.parametrize(("reference", "kept"), [("min", ["c"]), ("mean", ["b", "c"]), ("max", ["a", "b", "c"])])
def test_positive_reference_with_several_positives(reference: str, kept: list[str]) -> None:
    world = _world({"a": 0.75, "b": 0.55, "c": 0.35}, {"p1": 0.9, "p2": 0.4})
    verdicts = _verdicts(world, method="topk-marginpos", margin=0.0, positive_reference=reference)
    assert sorted(d for d, v in verdicts.items() if v is None) == kept


def test_rank_window_duplicates_and_invalid_scores() -> None:
    world = _world(
        {"a": 0.9, "b": 0.8, "copy": 0.7, "c": 0.6, "d": 0.5, "nan": math.nan},
        {"p": 0.95},
        texts={"copy": "same text", "p": "same text"},
    )
    verdicts = _verdicts(world, method="none", range_min=1, range_max=3)
    assert verdicts == {
        "a": "rank_window",
        "b": None,
        "copy": "duplicate_of_positive",
        "c": None,
        "d": "rank_window",
        "nan": "invalid_score",
    }
    judged = positive_aware_filter(*world, FilterConfig(method="none", range_min=1, range_max=3, expansion_depth=0))
    assert pl.from_arrow(judged).filter(pl.col("doc_id") == "c")["teacher_rank"][0] == 3
    counts = filter_counts(judged)
    assert counts["rank_window"] == 2 and counts["kept"] == 2 and counts["duplicate_of_positive"] == 1


# --- sampling ---------------------------------------------------------------------------------------


def _judged_many(n: int):
    world = _world({f"d{i:02d}": 0.9 - i * 0.01 for i in range(n)}, {"p1": 0.95, "p2": 0.97})
    return positive_aware_filter(*world, FilterConfig(method="none", expansion_depth=0)), world


def test_top_sampling_takes_the_hardest_for_each_positive() -> None:
    judged, (_, scores, qrels, _) = _judged_many(10)
    selected, counts = sample_negatives(judged, qrels, scores, SampleConfig(num_negatives=3))
    frame = pl.from_arrow(selected)
    assert counts == {
        "pairs": 2,
        "pairs_full": 2,
        "pairs_short": 0,
        "pairs_without_negatives": 0,
        "negatives": 6,
        "negatives_from_fallback": 0,
    }
    for positive in ("p1", "p2"):
        assert frame.filter(pl.col("positive_id") == positive)["negative_id"].to_list() == ["d00", "d01", "d02"]
    assert frame["negative_rank"].to_list() == [1, 2, 3, 1, 2, 3]


def test_random_sampling_is_seeded_and_does_not_depend_on_row_order() -> None:
    judged, (_, scores, qrels, _) = _judged_many(30)
    config = SampleConfig(num_negatives=5, strategy="random", seed=7)
    first = sample_negatives(judged, qrels, scores, config)[0]
    shuffled = judged.take(np.random.default_rng(0).permutation(judged.num_rows))
    again = sample_negatives(shuffled, qrels, scores, config)[0]
    assert first.equals(again)
    other = sample_negatives(judged, qrels, scores, SampleConfig(num_negatives=5, strategy="random", seed=8))[0]
    assert first["negative_id"].to_pylist() != other["negative_id"].to_pylist()
    chosen = pl.from_arrow(first)
    assert chosen.group_by("positive_id").agg(pl.col("negative_id").n_unique())["negative_id"].to_list() == [5, 5]


def test_short_pairs_keep_what_they_have_and_are_counted() -> None:
    judged, (_, scores, qrels, _) = _judged_many(2)
    selected, counts = sample_negatives(judged, qrels, scores, SampleConfig(num_negatives=5))
    assert selected.num_rows == 4
    assert counts["pairs_short"] == 2 and counts["pairs_full"] == 0


def test_simans_favours_candidates_scored_near_the_positive() -> None:
    # Positives score 0.95 and 0.97; candidate scores run from 0.90 down in steps of 0.01.
    judged, (_, scores, qrels, _) = _judged_many(40)
    sharp = SampleConfig(num_negatives=3, strategy="simans", simans_a=2000.0, seed=1)
    chosen = pl.from_arrow(sample_negatives(judged, qrels, scores, sharp)[0])
    # With a sharp kernel the draw keeps to the candidates just below each positive's score.
    assert chosen["negative_rank"].max() <= 6
    again = pl.from_arrow(sample_negatives(judged, qrels, scores, sharp)[0])
    assert chosen.equals(again)
    flat = SampleConfig(num_negatives=3, strategy="simans", simans_a=0.001, seed=1)
    spread = pl.from_arrow(sample_negatives(judged, qrels, scores, flat)[0])
    assert spread["negative_rank"].max() > 6  # a flat kernel draws from the whole list, like `random`


def test_coverage_fallback_widens_the_window_only_for_short_pairs() -> None:
    world = _world({f"d{i}": 0.9 - i * 0.01 for i in range(8)}, {"p": 0.95})
    narrow = FilterConfig(method="none", range_max=2, fallback_steps=1, fallback_width=1, expansion_depth=0)
    judged = positive_aware_filter(*world, narrow)
    steps = pl.from_arrow(judged).sort("teacher_rank")["fallback_step"].to_list()
    assert steps == [0, 0, 1, None, None, None, None, None]
    _, scores, qrels, _ = world
    selected, counts = sample_negatives(judged, qrels, scores, SampleConfig(num_negatives=4))
    chosen = pl.from_arrow(selected)
    assert chosen["negative_id"].to_list() == ["d0", "d1", "d2"]
    assert chosen["fallback_step"].to_list() == [0, 0, 1]
    assert counts["negatives_from_fallback"] == 1 and counts["pairs_short"] == 1
    wider = positive_aware_filter(
        *world, FilterConfig(method="none", range_max=2, fallback_steps=2, fallback_width=1, expansion_depth=0)
    )
    assert sample_negatives(wider, qrels, scores, SampleConfig(num_negatives=4))[1]["pairs_full"] == 1
    # A pair with enough kept candidates takes none from the fallback.
    plenty = sample_negatives(judged, qrels, scores, SampleConfig(num_negatives=2))[1]
    assert plenty["negatives_from_fallback"] == 0
