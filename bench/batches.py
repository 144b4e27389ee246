"""Batch benchmark: in-batch hardness and in-batch false negatives of training orders, on both dev collections.

For each collection, one `miner mine` run (defaults, `--format batched --batch-size` the first size) gives the
triplet rows and their embeddings; then, for each batch size, four orders of the same rows are compared:

- random order: what a trainer's default shuffling sampler does (a seeded permutation cut into batches);
- sentence-transformers' `NoDuplicatesBatchSampler` (`BatchSamplers.NO_DUPLICATES`): no text twice in a batch;
- this export (`miner/batches.py`), other rows' positives and negatives kept from answering a query;
- this export with `batches.check_negatives = false`: only other rows' positives are checked.

Measured over full batches, for each row i and each other row j of its batch: hardness is the mean cosine of
i's query with j's positive (all-MiniLM-L6-v2, the run's embeddings); a false negative is j's positive (or,
second column, any passage of j) judged relevant to i's query by the collection's full judgements (every qrels
row). Writes bench/results/batches.md and batches.json.

    python bench/batches.py [--sizes 8 32] [--seed 12345] [--work DIR] [--reuse]

`--reuse` skips mining a collection whose run is already in `--work` (its rows, manifest and embedding cache, from
an earlier run of this script with the same seed): for iterating on the ordering. The table then gives that
earlier run's mining time, and the run's own batched file (written by the code of then) is not compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from miner.batches import (
    TrainingRows,
    batch_hardness,
    batches_possible,
    conflict_graph,
    hardness_bound,
    order_batches,
    training_rows,
)
from miner.config import load_config
from miner.ingest import ingest
from miner.models import resolve_model
from miner.pipeline import batch_context, embed
from miner.run import mine

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MINER_DEV_DATASETS", "/work/shared/datasets"))
COLLECTIONS = {"cranfield": ROOT / "data" / "cranfield", "cisi": SHARED / "cisi"}
RESULTS = ROOT / "bench" / "results"


def judgements(folder: Path) -> dict[str, set[str]]:
    """Every judged (query, document) of the collection's qrels files, whatever the score."""
    judged: dict[str, set[str]] = {}
    for path in sorted((folder / "qrels").glob("*.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            query_id, doc_id, score = line.split("\t")[:3]
            if int(score) > 0:
                judged.setdefault(query_id, set()).add(doc_id)
    return judged


def measure(order: list[list[int]], rows: pl.DataFrame, vectors: dict[str, Any], judged: dict[str, set[str]]) -> dict:
    """Hardness and false-negative rates of `order` (full batches of row numbers of `rows`)."""
    pairs = false_positive_pairs = false_any_pairs = 0
    cosine = 0.0
    query_ids, positive_ids, negative_ids = (rows[c].to_list() for c in ("query_id", "positive_id", "negative_id"))
    for batch in order:
        q = vectors["query"][[vectors["query_row"][query_ids[i]] for i in batch]]
        p = vectors["doc"][[vectors["doc_row"][positive_ids[j]] for j in batch]]
        similarity = q @ p.T
        cosine += float(similarity.sum() - np.trace(similarity))
        for a in batch:
            relevant = judged.get(query_ids[a], set())
            for b in batch:
                if a == b:
                    continue
                pairs += 1
                false_positive_pairs += positive_ids[b] in relevant
                false_any_pairs += positive_ids[b] in relevant or negative_ids[b] in relevant
    return {
        "batches": len(order),
        "rows": sum(len(batch) for batch in order),
        "hardness": cosine / pairs if pairs else float("nan"),
        "false_negatives_positives": false_positive_pairs / pairs if pairs else float("nan"),
        "false_negatives_any": false_any_pairs / pairs if pairs else float("nan"),
    }


def limits(rows: TrainingRows, size: int, seed: int, placed: int, reached: float, samples: int = 2000) -> dict:
    """What the conflicts and counts allow, whatever the ordering.

    - hits per row: how many other queries a row brings a passage answering (it may meet no row of them);
    - the count bound: n batches take at most min(rows, n) rows of a query (`batches_possible`);
    - random query sets: of `samples` seeded random sets of `size` queries, the share in which every query has a
      row hitting none of the others (only those sets can be a conflict-free batch);
    - whether a conflict-free order can place every row the counts allow: False when `hardness_bound` proves
      that none can (None: not ruled out);
    - the most hardness any conflict-free order can have that places as many rows as this export (`placed`,
      which reached `reached`): `hardness_bound`.
    """
    from scipy import sparse

    graph = conflict_graph(rows)
    queries, count = len(rows.forbidden), len(rows.query)
    per_query = np.bincount(rows.query, minlength=queries)
    batches = batches_possible(per_query, size)
    hits = sparse.csr_matrix((np.ones(len(graph.hits)), graph.hits, graph.hits_start), shape=(count, queries))
    rng = np.random.default_rng(seed)
    possible = 0
    for _ in range(samples):
        chosen = np.zeros(queries, dtype=bool)
        chosen[rng.choice(queries, size, replace=False)] = True
        fitting = chosen[rows.query] & (hits @ chosen.astype(float) == 0)
        possible += bool(np.all(np.bincount(rows.query[fitting], minlength=queries)[chosen] > 0))
    started = time.perf_counter()
    all_placed = None if hardness_bound(rows, size, batches * size) is not None else False
    bound_placed = hardness_bound(rows, size, placed, reached)
    return {
        "hits_per_row": len(graph.hits) / count,
        "other_queries": queries - 1,
        "count_bound_rows": batches * size,
        "random_sets_possible": possible / samples,
        "all_placed": all_placed,
        "placed": placed,
        "bound_placed": bound_placed,
        "bound_s": round(time.perf_counter() - started, 1),
    }


def no_duplicates_order(rows: pl.DataFrame, size: int, seed: int) -> list[list[int]]:
    from datasets import Dataset
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    dataset = Dataset.from_dict({c: rows[c].to_list() for c in ("query", "positive", "negative")})
    sampler = NoDuplicatesBatchSampler(dataset, batch_size=size, drop_last=True, seed=seed)
    return [list(batch) for batch in sampler]


def collection_runs(
    name: str, folder: Path, sizes: list[int], seed: int, work: Path, reuse: bool = False
) -> list[dict[str, Any]]:
    out = work / name
    overrides = {"data": folder, "out": out, "show_progress": False, "cache_dir": work / "cache"}
    config = load_config(None, {**overrides, "formats": ["batched"], "batches.size": sizes[0], "sample.seed": seed})
    # Written after a finished run only, so that --reuse never picks up a half-written one.
    mined_record = out / "bench-mined.json"
    reused = reuse and mined_record.exists() and json.loads(mined_record.read_text())["seed"] == seed
    if reused:
        manifest = json.loads((out / "manifest.json").read_text())
        mined_s = json.loads(mined_record.read_text())["mine_s"]
    else:
        started = time.perf_counter()
        manifest = mine(config)
        mined_s = time.perf_counter() - started
        mined_record.write_text(json.dumps({"seed": seed, "mine_s": mined_s}) + "\n", encoding="utf-8")
    data = ingest(folder)
    negatives = pq.read_table(out / "negatives.parquet")
    rows = pl.from_arrow(negatives)
    # The run's embeddings, from its cache: at the precision it chose (bfloat16 where the CPU has it), which the
    # manifest records; at another precision they would be encoded anew and differ a little.
    chosen = manifest["precision"]["embedding"]["precision"]
    ref = dataclasses.replace(resolve_model(config.models.embedding_model), precision=chosen)
    embeddings = embed(data, ref, config)
    queries, documents = embeddings
    vectors = {
        "query": np.asarray(queries.vectors),
        "doc": np.asarray(documents.vectors),
        "query_row": {value: i for i, value in enumerate(queries.ids.to_pylist())},
        "doc_row": {value: i for i, value in enumerate(documents.ids.to_pylist())},
    }
    judged = judgements(folder)
    keys = rows.select("query_id", "positive_id", negative_ids=pl.concat_list("negative_id"))
    results = []
    for size in sizes:
        orders: dict[str, list[list[int]]] = {}
        shuffled = np.random.default_rng(seed).permutation(rows.height)
        orders["random order"] = [shuffled[i : i + size].tolist() for i in range(0, rows.height - size + 1, size)]
        orders["NO_DUPLICATES sampler"] = no_duplicates_order(rows, size, seed)
        timings = {}
        limit: dict[str, dict[str, float]] = {}
        for label, check_negatives in (("this export", True), ("this export, positives only", False)):
            batching = {"batches.size": size, "batches.check_negatives": check_negatives, "sample.seed": seed}
            sized = load_config(None, {**overrides, "formats": ["batched"], **batching})
            context = batch_context(negatives, data, embeddings, sized)
            assert context is not None
            started = time.perf_counter()
            batch_rows = training_rows(keys, context)
            ordered = order_batches(batch_rows, size, seed)
            timings[label] = time.perf_counter() - started
            reached = batch_hardness(batch_rows, ordered.rows, size)
            limit[label] = limits(batch_rows, size, seed, len(ordered.rows), reached)
            order = ordered.rows.reshape(-1, size).tolist()
            if label == "this export" and size == sizes[0] and not reused:
                # The same rows in the same order as the run's own file.
                written = pl.read_parquet(out / "batched-triplets.parquet")
                expected = rows[ordered.rows.tolist()].select(anchor="query", positive="positive", negative="negative")
                assert written.drop("batch").equals(expected), "the in-process order differs from the run's file"
            orders[label] = order
        for label, order in orders.items():
            result = {"collection": name, "size": size, "order": label, **measure(order, rows, vectors, judged)}
            result["total_rows"] = rows.height
            result["order_s"] = round(timings.get(label, float("nan")), 2)
            if label in limit:
                result["limits"] = limit[label]
            results.append(result)
    for result in results:
        result["mine_s"] = round(mined_s, 1)
        result["queries"] = rows["query_id"].n_unique()
    print(json.dumps(manifest["counts"].get("batches", {})))
    return results


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| collection | batch size | order | rows in full batches | in-batch false negatives (positives) | "
        "(any passage) | hardness | x random order |",
        "|---|---|---|---|---|---|---|---|",
    ]
    random = {(r["collection"], r["size"]): r["hardness"] for r in results if r["order"] == "random order"}
    for r in results:
        ratio = r["hardness"] / random[(r["collection"], r["size"])]
        lines.append(
            f"| {r['collection']} | {r['size']} | {r['order']} | {r['rows']:,} of {r['total_rows']:,} "
            f"({r['rows'] / r['total_rows']:.0%}) | {r['false_negatives_positives']:.2%} | "
            f"{r['false_negatives_any']:.2%} | {r['hardness']:.3f} | {ratio:.2f}x |"
        )
    return lines


def limits_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| collection | batch size | passages checked | other queries a row hits (mean, of) | rows the counts allow | "
        "random query sets that can be a batch | can an order place them all | hardness bound, as many rows placed "
        "as this export | x random order | this export |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    random = {(r["collection"], r["size"]): r["hardness"] for r in results if r["order"] == "random order"}
    for r in results:
        if "limits" not in r:
            continue
        limit = r["limits"]
        base = random[(r["collection"], r["size"])]
        checked = "positives only" if r["order"].endswith("positives only") else "positives and negatives"
        all_placed = "no (proved)" if limit["all_placed"] is False else "not ruled out"
        bound = limit["bound_placed"]
        as_many, as_many_ratio = ("none can", "") if bound is None else (f"{bound:.3f}", f"{bound / base:.2f}x")
        lines.append(
            f"| {r['collection']} | {r['size']} | {checked} | {limit['hits_per_row']:.2f} of "
            f"{limit['other_queries']} | {limit['count_bound_rows']:,} of {r['total_rows']:,} | "
            f"{limit['random_sets_possible']:.1%} | {all_placed} | {as_many} ({limit['placed']:,} rows) "
            f"| {as_many_ratio} | {r['hardness'] / base:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hardneg-bench-batches"))
    parser.add_argument("--reuse", action="store_true", help="reuse the mined runs already in --work")
    args = parser.parse_args()
    results = []
    for name, folder in COLLECTIONS.items():
        results += collection_runs(name, folder, args.sizes, args.seed, args.work, args.reuse)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batches.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    timing = ", ".join(
        f"{r['collection']} B={r['size']}: {r['order_s']} s" for r in results if r["order"] == "this export"
    )
    mined = ", ".join(sorted({f"{r['collection']} {r['mine_s']} s ({r['queries']} queries)" for r in results}))
    header = [
        "# Batches: in-batch hardness and false negatives of training orders",
        "",
        f"Run {when} by `python bench/batches.py --sizes {' '.join(map(str, args.sizes))}`. The rows are the "
        "triplets (query, positive, negative) of one default `miner mine` run per collection (5 negatives per "
        f"(query, positive); mining took {mined}). Over full batches only, every ordered pair of rows (i, j) in a "
        "batch: hardness is the mean cosine (all-MiniLM-L6-v2) of i's query with j's positive; a false negative "
        "is j's positive (or any passage of j: its positive or negative) judged relevant to i's query by the "
        "collection's full judgements. Random order is a seeded permutation; NO_DUPLICATES is "
        "sentence-transformers' `NoDuplicatesBatchSampler` (seeded). Ordering time of this export: "
        f"{timing}.",
        "",
    ]
    bounds = [
        "",
        "What the conflicts and counts allow, whatever the order (`limits` in bench/batches.py): how many other "
        "queries a row brings a passage answering (it may meet no row of them); how many rows batches of distinct "
        "queries can hold at most (n batches take at most min(rows, n) rows of a query); the share of 2,000 seeded "
        "random sets of B queries in which every query has a row hitting none of the others (only such a set can "
        "be a conflict-free batch); whether any conflict-free order can place all those rows; and a bound on the "
        "hardness of any conflict-free order placing as many rows as this export "
        "(`miner.batches.hardness_bound`: who meets whom, with every constraint of a real order but one, that the "
        "queries a row meets also meet each other; solved by Lagrangian relaxation, which also proves when no "
        "order exists). No order, by any algorithm, is above it.",
        "",
    ]
    (RESULTS / "batches.md").write_text(
        "\n".join(header + table(results) + bounds + limits_table(results)) + "\n", encoding="utf-8"
    )
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
