"""The settings the data decides: auto expansion depth, the false-negative budget and the estimate."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from miner.calibrate import HARDNESS_LADDER, resolve_filter, split_positives, wilson_interval
from miner.config import load_config
from miner.filter import annotated_candidates, auto_expansion_depth, negatives_cosine
from miner.ingest import ingest
from miner.pipeline import run_directly, score_candidates
from miner.run import mine
from miner.score import positive_geometry


@pytest.fixture(scope="module")
def scored_small(small_beir: Path, tmp_path_factory: pytest.TempPathFactory):
    data = ingest(small_beir)
    config = load_config(
        None, {"data": small_beir, "out": tmp_path_factory.mktemp("cal") / "out", "show_progress": False}
    )
    scored = score_candidates(data, config, run_directly)
    geometry = positive_geometry(scored.pool, data.qrels, *scored.embeddings)
    return data, config, scored, geometry


def test_auto_depth_is_the_deepest_cut_that_keeps_the_hardness_target(scored_small) -> None:
    data, config, scored, geometry = scored_small
    frame = annotated_candidates(scored.pool, scored.teacher_scores, data.qrels, data.corpus, config.filter, geometry)
    keep = config.sample.num_negatives
    depth, info = auto_expansion_depth(frame, config.filter, keep)
    target = config.filter.hardness_target * info["reference_cosine"]
    assert depth > 0
    assert negatives_cosine(frame, config.filter, depth, keep) >= target
    assert negatives_cosine(frame, config.filter, depth + 1, keep) < target
    # Asking for less hardness cuts deeper, never shallower.
    softer, _ = auto_expansion_depth(frame, config.filter.model_copy(update={"hardness_target": 0.8}), keep)
    assert softer > depth


def test_split_positives_gives_the_best_judged_and_hides_the_rest() -> None:
    qrels = pl.DataFrame(
        {"query_id": ["a", "a", "a", "b"], "doc_id": ["d2", "d1", "d3", "d9"], "relevance": [2, 2, 1, 1]}
    )
    given, hidden = split_positives(qrels)
    assert given.select("query_id", "doc_id").rows() == [("a", "d1")]
    assert sorted(hidden.rows()) == [("a", "d2"), ("a", "d3")]


def test_wilson_interval_brackets_the_rate() -> None:
    low, high = wilson_interval(3, 100)
    assert 0.0 < low < 0.03 < high < 0.1
    assert wilson_interval(0, 50)[0] == 0.0


@pytest.mark.parametrize("budget", [0.05, 0.3])
def test_budget_mode_uses_the_hardest_setting_within_the_budget(scored_small, budget: float) -> None:
    data, config, scored, geometry = scored_small
    filt = config.filter.model_copy(update={"max_false_negatives": budget})
    resolved, choice = resolve_filter(
        scored.pool, scored.teacher_scores, data.qrels, data.corpus, scored.embeddings, geometry, filt, config.sample
    )
    record = choice["budget"]
    assert record["applied"]
    tried = record["tried"]
    assert [t["hardness_target"] for t in tried] == list(HARDNESS_LADDER[: len(tried)])
    # Every harder target tried before the chosen one measured over the budget (the upper end of its interval).
    assert all(t["ci95"][1] > budget for t in tried[:-1])
    assert record["chosen"] == tried[-1]
    if record["met"]:
        assert record["chosen"]["ci95"][1] <= budget
    else:
        assert len(tried) == len(HARDNESS_LADDER)
    assert resolved.hardness_target == record["chosen"]["hardness_target"]
    assert isinstance(resolved.expansion_depth, int)
    assert choice["estimate"]["rate"] == record["chosen"]["rate"]


def test_every_run_records_its_choice_and_estimate(small_beir: Path, tmp_path: Path) -> None:
    manifest = mine(load_config(None, {"data": small_beir, "out": tmp_path / "out", "show_progress": False}))
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written["filter_choice"] == manifest["filter_choice"]
    expansion = written["filter_choice"]["expansion"]
    assert expansion["expansion_depth"] > 0
    assert expansion["negatives_cosine"] >= expansion["hardness_target"] * expansion["reference_cosine"]
    estimate = written["false_negatives_estimate"]
    assert estimate["method"].startswith("held-out positives")
    assert 0.0 <= estimate["ci95"][0] <= estimate["rate"] <= estimate["ci95"][1] <= 1.0
    counts = written["counts"]["filter"]
    assert counts["positive_expansion"] > 0


def test_a_run_with_one_positive_per_query_says_it_cannot_measure(tmp_path: Path) -> None:
    from conftest import cranfield_subset

    folder = cranfield_subset(tmp_path / "beir", num_queries=12, extra_docs=60)
    qrels = (folder / "qrels" / "test.tsv").read_text().splitlines()
    seen: set[str] = set()
    kept = [qrels[0]]
    for line in qrels[1:]:
        query = line.split("\t")[0]
        if query not in seen:
            seen.add(query)
            kept.append(line)
    (folder / "qrels" / "test.tsv").write_text("\n".join(kept) + "\n")
    config = load_config(
        None, {"data": folder, "out": tmp_path / "out", "show_progress": False, "filter.max_false_negatives": 0.05}
    )
    manifest = mine(config)
    assert manifest["false_negatives_estimate"]["rate"] is None
    assert "two or more positives" in manifest["false_negatives_estimate"]["method"]
    assert manifest["filter_choice"]["budget"]["applied"] is False


def test_the_estimate_is_measured_whatever_the_rule(scored_small) -> None:
    data, config, scored, geometry = scored_small
    rates = {}
    for depth in (0, "auto"):
        filt = config.filter.model_copy(update={"expansion_depth": depth})
        _, choice = resolve_filter(
            scored.pool,
            scored.teacher_scores,
            data.qrels,
            data.corpus,
            scored.embeddings,
            geometry,
            filt,
            config.sample,
        )
        rates[depth] = choice["estimate"]["rate"]
    # Without the evidence cut, the teacher's top candidates include the hidden positives it ranks first.
    assert rates[0] > rates["auto"]


def test_rate_interval_widens_when_false_negatives_cluster_in_few_queries() -> None:
    import numpy as np

    from miner.calibrate import rate_interval

    negatives = np.full(40, 5)
    spread = np.zeros(40, dtype=int)
    spread[:10] = 1  # 10 false negatives, one in each of 10 queries
    clustered = np.zeros(40, dtype=int)
    clustered[:2] = 5  # the same 10, all in 2 queries
    assert rate_interval(spread, negatives)[0] >= 0.0
    low_spread, high_spread = rate_interval(spread, negatives)
    low_clustered, high_clustered = rate_interval(clustered, negatives)
    assert low_spread <= 0.05 <= high_spread and low_clustered <= 0.05 <= high_clustered
    assert high_clustered - low_clustered > high_spread - low_spread
