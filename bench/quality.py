"""Quality benchmark: the held-out-positive audit on data/cranfield, for the peer and for this project.

The peer is `sentence_transformers.util.mine_hard_negatives` with all-MiniLM-L6-v2, run in this process on
the same held-out protocol, the same corpus texts and the same reference model for hardness. Writes
bench/results/quality.md.

    python bench/quality.py [--data data/cranfield]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import time
from pathlib import Path

import numpy as np
import polars as pl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from miner import schema
from miner.audit import REFERENCE_MODEL, audit, hold_out_positives, measure
from miner.config import load_config
from miner.ingest import ingest
from miner.models import load_embedding_model, resolve_model
from miner.pipeline import embed

NUM_NEGATIVES = 5
PEER_SETTINGS = {
    "peer: naive top-5": {},
    "peer: relative_margin=0.05 (TopK-PercPos 95%)": {"relative_margin": 0.05},
    "peer: range_min=10, range_max=50, random": {"range_min": 10, "range_max": 50, "sampling_strategy": "random"},
}
NO_EXPANSION = {"filter.expansion_depth": 0}
OUR_SETTINGS = {
    "miner: defaults (method none, expansion_depth 40)": {},
    "miner: naive top-5 (no rule)": {"filter.method": "none", **NO_EXPANSION},
    "miner: topk-percpos 0.95": {"filter.method": "topk-percpos", **NO_EXPANSION},
    "miner: topk-percpos 0.95 + fallback 3 steps": {
        "filter.method": "topk-percpos",
        "filter.fallback_steps": 3,
        **NO_EXPANSION,
    },
    "miner: range 10-50, random": {
        "filter.range_min": 10,
        "filter.range_max": 50,
        "sample.strategy": "random",
        **NO_EXPANSION,
    },
    "miner: simans (a 20, b 0)": {"sample.strategy": "simans", **NO_EXPANSION},
    "miner: retriever agreement 20": {"filter.agreement_depth": 20, **NO_EXPANSION},
    **{f"miner: expansion_depth {depth}": {"filter.expansion_depth": depth} for depth in (20, 30, 35, 45, 50)},
    # The weight moves the same trade-off: a lighter pull towards the positive needs a shallower depth.
    **{
        f"miner: expansion_weight {weight}, depth {depth}": {
            "filter.expansion_weight": weight,
            "filter.expansion_depth": depth,
        }
        for weight, depth in ((0.25, 30), (0.25, 40), (1.0, 40), (1.0, 50))
    },
}


def _selected(rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    frame = pl.DataFrame(rows, schema=["query_id", "positive_id", "negative_id"], orient="row")
    return frame.with_columns(
        positive_score=pl.lit(None, pl.Float32),
        negative_score=pl.lit(None, pl.Float32),
        negative_rank=pl.lit(None, pl.Int32),
        source=pl.lit("dense"),
        bm25_rank=pl.lit(None, pl.Int32),
        dense_rank=pl.lit(None, pl.Int32),
        fused_rank=pl.lit(None, pl.Int32),
        fallback_step=pl.lit(0, pl.Int32),
    )


def peer_runs(held, reference, data_dir: Path) -> list[dict]:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    given = held.given
    query_text = dict(zip(given.queries["query_id"].to_pylist(), given.queries["text"].to_pylist(), strict=True))
    doc_ids = given.corpus["doc_id"].to_pylist()
    doc_texts = given.corpus["text"].to_pylist()
    id_of_text = {text: doc_id for doc_id, text in reversed(list(zip(doc_ids, doc_texts, strict=True)))}
    text_of_id = dict(zip(doc_ids, doc_texts, strict=True))
    pairs = pl.from_arrow(given.qrels).select("query_id", "doc_id").sort("query_id")
    anchors = [query_text[q] for q in pairs["query_id"]]
    query_of_anchor = {query_text[q]: q for q in pairs["query_id"]}
    dataset = Dataset.from_dict({"anchor": anchors, "positive": [text_of_id[d] for d in pairs["doc_id"]]})
    model = load_embedding_model(resolve_model("all-MiniLM-L6-v2"))
    rows = []
    for name, settings in PEER_SETTINGS.items():
        started = time.perf_counter()
        mined = mine_hard_negatives(
            dataset,
            model,
            corpus=doc_texts,
            num_negatives=NUM_NEGATIVES,
            use_faiss=True,
            output_format="triplet",
            verbose=False,
            **settings,
        )
        seconds = time.perf_counter() - started
        positive_of = dict(zip(pairs["query_id"], pairs["doc_id"], strict=True))
        found = [
            (query_of_anchor[a], positive_of[query_of_anchor[a]], id_of_text[n])
            for a, n in zip(mined["anchor"], mined["negative"], strict=True)
        ]
        selected = schema.conform(_selected(found), schema.SELECTED)
        rows.append({"setting": name, **measure(selected, held, reference, NUM_NEGATIVES), "seconds": seconds})
    # Random documents from the corpus, excluding the given positive: the floor of hardness.
    rng = np.random.default_rng(0)
    found = []
    for query_id, positive_id in pairs.iter_rows():
        choices = [d for d in rng.choice(doc_ids, NUM_NEGATIVES + 1, replace=False) if d != positive_id]
        found += [(query_id, positive_id, d) for d in choices[:NUM_NEGATIVES]]
    selected = schema.conform(_selected(found), schema.SELECTED)
    rows.append({"setting": "random documents", **measure(selected, held, reference, NUM_NEGATIVES), "seconds": 0.0})
    for row in rows:
        row["mean_rank"] = math.nan
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cranfield"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.md"))
    args = parser.parse_args()

    data = ingest(args.data)
    held = hold_out_positives(data)
    base = {"data": args.data, "out": Path("runs/bench-quality"), "show_progress": False}
    reference = embed(held.given, resolve_model(REFERENCE_MODEL), load_config(None, base))
    rows = peer_runs(held, reference, args.data)

    settings = {name: load_config(None, {**base, **overrides}) for name, overrides in OUR_SETTINGS.items()}
    started = time.perf_counter()
    ours = audit(data, settings)
    seconds = time.perf_counter() - started
    rows += [{**row, "seconds": math.nan} for row in ours.to_dicts()]

    lines = [
        "# Quality: held-out-positive audit on Cranfield",
        "",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python bench/quality.py`. {held.given.queries.num_rows} "
        f"queries with two or more positives; the best-judged is given, {held.hidden.height} are hidden; "
        f"{NUM_NEGATIVES} negatives per query. Hardness: mean query-negative cosine under {REFERENCE_MODEL}. "
        "Peer: `sentence_transformers.util.mine_hard_negatives` (all-MiniLM-L6-v2, use_faiss=True), in this "
        f"process, wall time per call shown. This project's {len(settings)} settings took {seconds:.0f} s together "
        "(one scoring shared by all). One percentage point of false negatives is about "
        f"{held.given.queries.num_rows * NUM_NEGATIVES // 100} negatives.",
        "",
        "| setting | coverage | false negatives | hardness | mean rank | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        rank = "—" if math.isnan(row["mean_rank"]) else f"{row['mean_rank']:.1f}"
        wall = "—" if math.isnan(row["seconds"]) else f"{row['seconds']:.1f}"
        lines.append(
            f"| {row['setting']} | {row['coverage']:.1%} | {row['false_negative_rate']:.1%} | "
            f"{row['hardness']:.3f} | {rank} | {wall} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
