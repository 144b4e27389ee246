"""Settings the data decides: the expansion depth, a false-negative budget, and the estimated false-negative rate.

Where queries have two or more positives, the data can measure its own false negatives: hold all but the
best-judged positive out, mine, and count the hidden positives among the negatives (the protocol of
`miner audit`). The budget mode uses that measurement to choose a setting; every run reports it as the
estimated false-negative rate of what it exports.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from miner import schema
from miner.config import FilterConfig, SampleConfig
from miner.filter import annotated_candidates, auto_expansion_depth, judge
from miner.models import Embeddings
from miner.sample import sample_negatives
from miner.score import positive_geometry

# Hardness targets the budget mode tries, hardest first (above 1: harder than the reference window).
HARDNESS_LADDER = (1.2, 1.15, 1.1, 1.05, 1.0, 0.97, 0.95, 0.92, 0.9, 0.87, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
# Fewer held-out queries than this measure too little to choose by.
MIN_HELD_OUT_QUERIES = 10


def split_positives(qrels: pa.Table | pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Queries with two or more positives -> (their best-judged positive, ties by id; the others, hidden)."""
    positives = pl.from_arrow(qrels) if isinstance(qrels, pa.Table) else qrels
    assert isinstance(positives, pl.DataFrame)
    eligible = positives.group_by("query_id").len().filter(pl.col("len") >= 2).select("query_id")
    judged = positives.join(eligible, on="query_id", how="semi")
    given = (
        judged.sort(["query_id", "relevance", "doc_id"], descending=[False, True, False])
        .group_by("query_id", maintain_order=True)
        .head(1)
    )
    hidden = judged.join(given, on=["query_id", "doc_id"], how="anti").select("query_id", "doc_id")
    return given, hidden


def multi_positive_queries(qrels: pa.Table) -> int:
    """How many queries have two or more positives: the ones positives can be held out on."""
    counts = pl.from_arrow(qrels.select(["query_id"]))
    assert isinstance(counts, pl.DataFrame)
    return counts.group_by("query_id").len().filter(pl.col("len") >= 2).height


def rate_interval(leaked: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """95% interval of a false-negative rate measured over queries: the wider of Wilson's interval (sound near 0)
    and a cluster-robust one. A query's negatives share its topic and err together, so the queries, not the
    negatives, are the independent draws; counting negatives alone would claim too narrow an interval."""
    total, hits = int(negatives.sum()), int(leaked.sum())
    low, high = wilson_interval(hits, total)
    queries = len(negatives)
    if queries >= 2 and total:
        rate = hits / total
        spread = math.sqrt(queries / (queries - 1) * float(((leaked - rate * negatives) ** 2).sum())) / total
        low, high = min(low, rate - 1.96 * spread), max(high, rate + 1.96 * spread)
    return max(0.0, low), min(1.0, high)


def wilson_interval(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a rate, sound near 0 where the normal approximation is not."""
    if total == 0:
        return 0.0, 1.0
    rate = hits / total
    centre = (rate + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


class HeldOutPool:
    """The run's own multi-positive queries with positives held out, ready to be mined under several settings."""

    def __init__(
        self,
        pool: pa.Table,
        teacher_scores: pa.Table,
        qrels: pa.Table,
        corpus: pa.Table,
        embeddings: tuple[Embeddings, Embeddings] | None,
    ) -> None:
        given, self.hidden = split_positives(qrels)
        self.queries = given.height
        self.given = schema.conform(given, schema.QRELS)
        keep = pl.from_arrow(pool)
        assert isinstance(keep, pl.DataFrame)
        self.pool = schema.conform(keep.join(given.select("query_id"), on="query_id", how="semi"), schema.CANDIDATES)
        self.teacher_scores, self.corpus = teacher_scores, corpus
        self.geometry = positive_geometry(self.pool, self.given, *embeddings) if embeddings is not None else None
        self._annotated: dict[str, pl.DataFrame] = {}

    def _frame(self, config: FilterConfig) -> pl.DataFrame:
        """The annotated pool, joined (with the corpus read for text hashes) once for every setting that differs
        only in where the expansion cut falls: the budget tries a dozen such targets."""
        key = config.model_dump_json(exclude={"expansion_depth", "hardness_target", "max_false_negatives"})
        key += str(config.expansion_depth != 0)
        if key not in self._annotated:
            self._annotated[key] = annotated_candidates(
                self.pool, self.teacher_scores, self.given, self.corpus, config, self.geometry
            )
        return self._annotated[key]

    def rate(self, config: FilterConfig, sample: SampleConfig) -> dict[str, Any]:
        judged = judge(self._frame(config), config, keep=sample.num_negatives)
        selected, _ = sample_negatives(judged, self.given, self.teacher_scores, sample)
        negatives = pl.from_arrow(selected.select(["query_id", "negative_id", "source"]))
        assert isinstance(negatives, pl.DataFrame)
        hardness = None
        if self.geometry is not None:
            cosines = pl.from_arrow(self.geometry.select(["query_id", "doc_id", "query_cosine"]))
            assert isinstance(cosines, pl.DataFrame)
            hardness = negatives.join(
                cosines.rename({"doc_id": "negative_id"}), on=["query_id", "negative_id"], how="left"
            )["query_cosine"].mean()
        hits = negatives.join(
            self.hidden.rename({"doc_id": "negative_id"}).with_columns(_hidden=pl.lit(1)),
            on=["query_id", "negative_id"],
            how="left",
        )
        per_query_hits = hits.group_by("query_id").agg(negatives=pl.len(), leaked=pl.col("_hidden").fill_null(0).sum())
        leaked = int(per_query_hits["leaked"].sum() or 0)
        low, high = rate_interval(per_query_hits["leaked"].to_numpy(), per_query_hits["negatives"].to_numpy())
        return {
            "rate": round(leaked / negatives.height, 4) if negatives.height else 0.0,
            "ci95": [round(low, 4), round(high, 4)],
            "false_negatives": leaked,
            "negatives": negatives.height,
            "queries": self.queries,
            "coverage": round(
                per_query_hits.filter(pl.col("negatives") >= sample.num_negatives).height / self.queries, 4
            ),
            # Mean query cosine of the negatives under the run's embedding model.
            "hardness": round(float(hardness), 4) if hardness is not None else None,
            # Which retrievers found the negatives: bm25, dense or both.
            "sources": dict(sorted(negatives["source"].value_counts().iter_rows())),
        }


def resolve_filter(
    pool: pa.Table,
    teacher_scores: pa.Table,
    qrels: pa.Table,
    corpus: pa.Table,
    embeddings: tuple[Embeddings, Embeddings] | None,
    geometry: pa.Table | None,
    config: FilterConfig,
    sample: SampleConfig,
) -> tuple[FilterConfig, dict[str, Any]]:
    """The filter settings this run uses (budget applied, "auto" depth resolved) and a record of the choice,
    with the estimated false-negative rate of what the run exports."""
    choice: dict[str, Any] = {}
    held_out = None
    if multi_positive_queries(qrels) >= MIN_HELD_OUT_QUERIES:
        held_out = HeldOutPool(pool, teacher_scores, qrels, corpus, embeddings)
    if config.max_false_negatives is not None:
        config, choice["budget"] = within_budget(held_out, config, sample)
    requested = config
    if config.expansion_depth == "auto":
        frame = annotated_candidates(pool, teacher_scores, qrels, corpus, config, geometry)
        depth, choice["expansion"] = auto_expansion_depth(frame, config, sample.num_negatives)
        config = config.model_copy(update={"expansion_depth": depth})
    choice["estimate"] = _estimate(held_out, requested, sample, choice.get("budget"))
    return config, choice


def within_budget(
    held_out: HeldOutPool | None, config: FilterConfig, sample: SampleConfig
) -> tuple[FilterConfig, dict[str, Any]]:
    """The hardest target of HARDNESS_LADDER whose measured false-negative rate is within the budget.

    "Within" is judged by the upper end of the rate's 95% interval, not the rate itself: a few hundred held-out
    negatives measure a rate to a few points, and a budget is a promise about the data the run exports.
    """
    budget = config.max_false_negatives
    assert budget is not None
    if held_out is None:
        return config, {
            "budget": budget,
            "applied": False,
            "why": f"fewer than {MIN_HELD_OUT_QUERIES} queries have two or more positives, so no false negative "
            "can be measured; the default rule is used",
        }
    tried = []
    for target in HARDNESS_LADDER:
        setting = config.model_copy(update={"hardness_target": target, "expansion_depth": "auto"})
        tried.append({"hardness_target": target, **held_out.rate(setting, sample)})
        if tried[-1]["ci95"][1] <= budget:
            break
    chosen = tried[-1]
    record = {
        "budget": budget,
        "applied": True,
        "met": chosen["ci95"][1] <= budget,
        "tried": tried,
        "chosen": chosen,
        "rejected_next_harder": tried[-2] if len(tried) > 1 else None,
    }
    return config.model_copy(update={"hardness_target": chosen["hardness_target"], "expansion_depth": "auto"}), record


def _estimate(
    held_out: HeldOutPool | None, config: FilterConfig, sample: SampleConfig, budget: dict[str, Any] | None
) -> dict[str, Any]:
    if held_out is None:
        return {
            "rate": None,
            "method": "none: fewer than "
            f"{MIN_HELD_OUT_QUERIES} queries have two or more positives to hold out; measure a labelled sample "
            "with `miner audit`",
        }
    # An "auto" depth is chosen again on the held-out data, as the run chose it on its own.
    applied = budget is not None and budget.get("applied")
    measured = budget["chosen"] if applied else held_out.rate(config, sample)
    return {
        **measured,
        "method": f"held-out positives: on the {held_out.queries} queries with two or more positives, all but the "
        "best-judged hidden, mined with this run's settings; the rate of hidden positives among the negatives",
    }
