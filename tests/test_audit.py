from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import write_beir
from typer.testing import CliRunner

from miner import schema
from miner.audit import audit, hold_out_positives, measure
from miner.cli import app
from miner.config import FilterConfig, load_config
from miner.errors import InputError
from miner.filter import positive_aware_filter
from miner.ingest import ingest
from miner.models import Embeddings
from miner.score import positive_geometry

DOCS = [{"_id": f"d{i}", "text": f"passage number {i}"} for i in range(8)]
QUERIES = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "third"}]


def test_best_judged_positive_is_given_and_the_rest_hidden(tmp_path: Path) -> None:
    qrels = [("q1", "d3", 2), ("q1", "d1", 3), ("q1", "d2", 2), ("q2", "d5", 1), ("q2", "d4", 1), ("q3", "d6", 2)]
    held = hold_out_positives(ingest(write_beir(tmp_path, DOCS, QUERIES, qrels)))
    given = pl.from_arrow(held.given.qrels).sort("query_id")
    assert given.select("query_id", "doc_id").rows() == [("q1", "d1"), ("q2", "d4")]  # ties broken by id
    assert sorted(held.hidden.rows()) == [("q1", "d2"), ("q1", "d3"), ("q2", "d5")]
    assert held.given.queries["query_id"].to_pylist() == ["q1", "q2"]  # q3 has one positive: not audited


def test_a_dataset_without_several_positives_is_refused(tmp_path: Path) -> None:
    data = ingest(write_beir(tmp_path, DOCS, QUERIES, [("q1", "d1", 1), ("q2", "d2", 1)]))
    with pytest.raises(InputError, match="no query has two or more judged-relevant documents"):
        hold_out_positives(data)


def test_measure_counts_leaks_coverage_and_hardness(tmp_path: Path) -> None:
    qrels = [("q1", "d1", 2), ("q1", "d2", 1), ("q2", "d3", 2), ("q2", "d4", 1)]
    held = hold_out_positives(ingest(write_beir(tmp_path, DOCS, QUERIES, qrels)))
    selected = pl.DataFrame(
        {
            "query_id": ["q1", "q1", "q2"],
            "positive_id": ["d1", "d1", "d3"],
            "negative_id": ["d2", "d5", "d6"],  # d2 is q1's hidden positive
            "positive_score": [0.9, 0.9, 0.8],
            "negative_score": [0.5, 0.4, 0.3],
            "negative_rank": [1, 3, 2],
            "source": ["both"] * 3,
            "bm25_rank": [1, 2, 3],
            "dense_rank": [1, 2, 3],
            "fused_rank": [1, 2, 3],
            "fallback_step": [0, 0, 0],
        }
    )
    vectors = np.eye(8, dtype=np.float32)
    queries = Embeddings(pa.array(["q1", "q2"]), np.stack([vectors[2] * 0.6 + vectors[5] * 0.8, vectors[6]]))
    documents = Embeddings(pa.array([d["_id"] for d in DOCS]), vectors)
    metrics = measure(schema.conform(selected, schema.SELECTED), held, (queries, documents), num_negatives=2)
    assert metrics["false_negative_rate"] == pytest.approx(1 / 3)
    assert metrics["coverage"] == pytest.approx(1 / 2)
    assert metrics["hardness"] == pytest.approx((0.6 + 0.8 + 1.0) / 3)
    assert metrics["mean_rank"] == pytest.approx(2.0)


def test_positive_geometry_measures_the_query_and_the_nearest_positive() -> None:
    rng = np.random.default_rng(1)
    docs = rng.normal(size=(5, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    query = rng.normal(size=(1, 16)).astype(np.float32)
    query /= np.linalg.norm(query)
    ids = pa.array([f"d{i}" for i in range(5)])
    pool = pa.table({"query_id": ["q"] * 3, "doc_id": ["d2", "d3", "d4"]})
    qrels = pa.table({"query_id": ["q", "q"], "doc_id": ["d0", "d1"]})
    geometry = positive_geometry(pool, qrels, Embeddings(pa.array(["q"]), query), Embeddings(ids, docs))
    assert np.allclose(geometry["query_cosine"].to_numpy(), docs[2:] @ query[0], atol=1e-6)
    nearest = np.maximum(docs[2:] @ docs[0], docs[2:] @ docs[1])
    assert np.allclose(geometry["positive_cosine"].to_numpy(), nearest, atol=1e-6)


def test_rules_that_use_positive_geometry_teacher_and_retriever_agreement() -> None:
    pool = schema.conform(
        pl.DataFrame(
            {
                "query_id": ["q"] * 3,
                "doc_id": ["a", "b", "c"],
                "bm25_rank": [1, 2, 3],
                "bm25_score": [3.0, 2.0, 1.0],
                "dense_rank": [1, 2, 3],
                "dense_score": [0.9, 0.8, 0.7],
                "fused_score": [0.03, 0.02, 0.01],
                "fused_rank": [1, 2, 3],
                "source": ["both"] * 3,
            }
        ),
        schema.CANDIDATES,
    )
    scores = schema.conform(
        pl.DataFrame({"query_id": ["q"] * 4, "doc_id": ["a", "b", "c", "p"], "teacher_score": [0.5, 0.6, 0.4, 0.9]}),
        schema.TEACHER_SCORES,
    )
    qrels = schema.conform(pl.DataFrame({"query_id": ["q"], "doc_id": ["p"], "relevance": [1]}), schema.QRELS)
    corpus = schema.conform(
        pl.DataFrame({"doc_id": ["a", "b", "c", "p"], "text": list("abcp"), "text_hash": list("abcp")}), schema.CORPUS
    )
    geometry = pa.table(
        {
            "query_id": ["q"] * 3,
            "doc_id": ["a", "b", "c"],
            "query_cosine": [0.2, 0.9, 0.1],
            "positive_cosine": [0.97, 0.5, 0.4],
        }
    )

    def verdicts(**settings) -> dict[str, str | None]:
        judged = pl.from_arrow(
            positive_aware_filter(
                pool,
                scores,
                qrels,
                corpus,
                FilterConfig(**{"method": "none", "expansion_depth": 0, **settings}),
                geometry,
            )
        )
        return dict(zip(judged["doc_id"].to_list(), judged["dropped_by"].to_list(), strict=True))

    # Evidence = z(query cosine) + 0.5 z(positive cosine) + z(BM25): a (close to the positive, BM25's first)
    # outweighs b (closest to the query only).
    assert verdicts(expansion_depth=1) == {"a": "positive_expansion", "b": None, "c": None}
    assert verdicts(expansion_depth=1, expansion_weight=0, lexical_weight=0) == {
        "a": None,
        "b": "positive_expansion",
        "c": None,
    }
    # However deep, the rule leaves a query as many candidates as the sampler needs (keep=1 here).
    assert verdicts(expansion_depth=40) == {"a": "positive_expansion", "b": "positive_expansion", "c": None}
    assert verdicts(max_positive_similarity=0.95) == {"a": "near_duplicate_of_positive", "b": None, "c": None}
    assert verdicts(denoise_threshold=0.55) == {"a": None, "b": "denoise", "c": None}
    # bm25 and dense ranks are 1, 2, 3 for a, b, c: depth 2 catches the two both retrievers put on top.
    assert verdicts(agreement_depth=2) == {"a": "retriever_agreement", "b": "retriever_agreement", "c": None}


def test_audit_sweeps_settings_over_one_scoring(small_beir: Path, tmp_path: Path) -> None:
    data = ingest(small_beir)
    base = {"data": small_beir, "out": tmp_path}
    settings = {
        "naive": load_config(None, {**base, "filter.method": "none", "filter.expansion_depth": 0}),
        "expansion": load_config(None, {**base, "filter.method": "none", "filter.expansion_depth": 10}),
    }
    report = audit(data, settings)
    assert report["setting"].to_list() == ["naive", "expansion"]
    naive, expansion = report.rows(named=True)
    assert naive["queries"] == expansion["queries"] == hold_out_positives(data).given.queries.num_rows
    assert naive["coverage"] == 1.0
    # Skipping what looks like the query and its positive at once takes easier candidates.
    assert expansion["mean_rank"] > naive["mean_rank"] and expansion["hardness"] < naive["hardness"]
    assert 0.0 <= expansion["false_negative_rate"] <= naive["false_negative_rate"]


def test_audit_command_writes_the_report(small_beir: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    result = CliRunner().invoke(
        app,
        ["audit", str(small_beir), "--out", str(out), "-q", "-s", "top: filter.method=none, sample.num_negatives=3"],
    )
    assert result.exit_code == 0, result.output
    assert "false neg" in result.stdout and "top" in result.stdout
    written = json.loads((out / "audit.json").read_text())
    assert written["results"][0]["setting"] == "top"
    assert pl.read_parquet(out / "audit.parquet").height == 1


def test_audit_refuses_a_setting_that_cannot_produce_negatives(small_beir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "audit",
            str(small_beir),
            "--out",
            str(tmp_path / "a"),
            "-s",
            "narrow: filter.range_min=10, filter.range_max=12",
        ],
    )
    assert result.exit_code == 2
    assert "holds fewer candidates than sample.num_negatives" in result.stderr
    assert not (tmp_path / "a").exists()
