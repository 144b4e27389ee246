"""False-negative audit: mine with one positive given and the others hidden, and count what leaks.

Protocol: queries with two or more judged-relevant documents; the best-judged one (ties by id) is given
to the miner as the positive, the rest are hidden. A mined negative that is a hidden positive is a
false negative the miner could not have known about, which is exactly the failure that unlabelled
relevant passages cause in real training data.

Per setting: false-negative rate, coverage (share of queries that got the full quota), hardness (mean
cosine of query and negative under one fixed reference model, so that miners with different teachers
are measured with the same ruler) and the mean teacher rank of the negatives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from miner import schema
from miner.atomic import write_json_atomic, write_parquet_atomic
from miner.calibrate import split_positives
from miner.config import SPEED_ONLY_MODEL_SETTINGS, MineConfig
from miner.errors import InputError
from miner.ingest import Ingested
from miner.models import Embeddings, resolve_model
from miner.pipeline import Scored, embed, run_directly, score_candidates, select_negatives
from miner.score import bi_encoder_scores

REFERENCE_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class HeldOut:
    given: Ingested  # the data with one positive per eligible query
    hidden: pl.DataFrame  # (query_id, doc_id) of the positives the miner does not see


def hold_out_positives(data: Ingested) -> HeldOut:
    given, hidden = split_positives(data.qrels)
    if given.height == 0:
        raise InputError(
            "qrels",
            "no query has two or more judged-relevant documents, so no positive can be held out",
            "audit a dataset whose queries have several positives (or lower --min-relevance)",
        )
    queries = data.queries.filter(pc.is_in(data.queries["query_id"], given["query_id"].to_arrow()))
    counts = {**data.counts, "audit_queries": given.height, "audit_hidden_positives": hidden.height}
    return HeldOut(replace(data, queries=queries, qrels=schema.conform(given, schema.QRELS), counts=counts), hidden)


def measure(
    selected: pa.Table, held_out: HeldOut, reference: tuple[Embeddings, Embeddings], num_negatives: int
) -> dict[str, float]:
    """The audit's four numbers for one set of mined negatives (schema.SELECTED)."""
    negatives = pl.from_arrow(selected)
    assert isinstance(negatives, pl.DataFrame)
    queries = held_out.given.queries.num_rows
    per_query = negatives.group_by("query_id").len()
    leaked = negatives.join(
        held_out.hidden.rename({"doc_id": "negative_id"}), on=["query_id", "negative_id"], how="semi"
    ).height
    queries_ref, documents_ref = reference
    pairs = negatives.select("query_id", doc_id="negative_id").to_arrow()
    cosines = bi_encoder_scores(pairs, queries_ref.ids, queries_ref.vectors, documents_ref.ids, documents_ref.vectors)
    hardness = cosines["teacher_score"].to_numpy()
    return {
        "queries": queries,
        "negatives": negatives.height,
        "coverage": per_query.filter(pl.col("len") >= num_negatives).height / queries,
        "false_negative_rate": leaked / negatives.height if negatives.height else 0.0,
        "hardness": float(hardness.mean()) if negatives.height else 0.0,
        "mean_rank": float(negatives["negative_rank"].mean() or 0.0) if negatives.height else 0.0,
    }


def _upstream_key(config: MineConfig) -> str:
    # Settings that change candidates or teacher scores; the others only change filtering and sampling.
    return json.dumps(
        {
            "retrieval": config.retrieval.model_dump(),
            "models": config.models.model_dump(exclude=set(SPEED_ONLY_MODEL_SETTINGS)),
            "geometry": config.filter.needs_geometry,
        },
        sort_keys=True,
    )


def reference_embeddings(scored: Scored, held_out: HeldOut, config: MineConfig) -> tuple[Embeddings, Embeddings]:
    """The reference model's vectors: reused when the mining run embedded with it, else computed."""
    reference = resolve_model(REFERENCE_MODEL)
    mined_with = scored.models["embedding"]
    whole_corpus = scored.embeddings is not None and len(scored.embeddings[1].ids) == held_out.given.corpus.num_rows
    # The ruler is float32 whatever precision mined: settings compared at two precisions share one ruler.
    if whole_corpus and (mined_with.fingerprint, mined_with.precision) == (reference.fingerprint, reference.precision):
        assert scored.embeddings is not None
        return scored.embeddings
    return embed(held_out.given, reference, config)


def audit(data: Ingested, settings: dict[str, MineConfig]) -> pl.DataFrame:
    """Mine `data` under each named setting with positives held out; one row of metrics per setting.

    Candidates and teacher scores are computed once for settings that share retrieval and models.
    """
    held_out = hold_out_positives(data)
    upstream: dict[str, Scored] = {}
    reference: tuple[Embeddings, Embeddings] | None = None
    rows: list[dict[str, Any]] = []
    for name, config in settings.items():
        key = _upstream_key(config)
        if key not in upstream:
            upstream[key] = score_candidates(held_out.given, config, run_directly)
        scored = upstream[key]
        if reference is None:
            reference = reference_embeddings(scored, held_out, config)
        chosen = select_negatives(scored, held_out.given, config, run_directly)
        rows.append({"setting": name, **measure(chosen.selected, held_out, reference, config.sample.num_negatives)})
    return pl.DataFrame(rows)


def write_report(report: pl.DataFrame, out: Path, settings: dict[str, MineConfig]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(report.to_arrow(), out / "audit.parquet")
    write_json_atomic(
        {
            "protocol": "held-out positives: best-judged given, the rest hidden",
            "reference_model": REFERENCE_MODEL,
            "results": report.to_dicts(),
            "settings": {name: config.model_dump(mode="json") for name, config in settings.items()},
        },
        out / "audit.json",
    )


def format_table(report: pl.DataFrame) -> str:
    header = f"{'setting':<32}{'queries':>8}{'coverage':>10}{'false neg':>11}{'hardness':>10}{'mean rank':>11}"
    lines = [header, "-" * len(header)]
    for row in report.iter_rows(named=True):
        lines.append(
            f"{row['setting']:<32}{row['queries']:>8}{row['coverage']:>10.1%}{row['false_negative_rate']:>11.1%}"
            f"{row['hardness']:>10.3f}{row['mean_rank']:>11.1f}"
        )
    return "\n".join(lines)
