"""Peak memory of a whole `miner mine` run as the corpus grows: 10k, 100k and 1M synthetic documents.

Encoding a million passages takes hours on two CPU cores, so the embedding cache is filled first with random
unit vectors for every document and query text (keyed exactly as a run keys them: the bundled model's
fingerprint and each text's hash). The run then does everything else for real: ingest of a Parquet corpus,
a cache look-up of every vector, exact dense search, bi-encoder teacher scores, the positive-aware filter,
sampling and export. BM25 is off here; its memory at these sizes is in scale.md.

The corpora are `bench/scale.py`'s (Cranfield's vocabulary and lengths); the queries are its first 1,000,
each given one positive. Each run is its own process and reports its own peak RSS (VmHWM). `--tree` runs
the code of another checkout (by PYTHONPATH), to compare a change against the code before it.

Writes bench/results/run_memory.md and run_memory.json.

    python bench/run_memory.py [--sizes 10k,100k,1m] [--queries 1000] [--tree PATH --label NAME]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import CRANFIELD, WORK, corpus_batches, size_name, sizes_of, text_model, write_corpus, write_queries

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MEMORY_WORK = ROOT / "bench" / "work" / "run-memory"
DIMENSION = 384

# Runs `miner mine` in this process and prints, as its last lines, the peak anonymous memory sampled during each
# stage (every 20 ms: memory no file backs, which the kernel cannot drop), each stage's peak RSS so far and the
# run's peak RSS (which also counts pages of mapped files: the corpus, the vectors), whatever the exit. The stage
# runner is wrapped only to know which stage is running and to read /proc/self/status after each.
MEASURED_RUN = """
import json, sys, threading, time
import miner.run
from miner.cli import app
def status():
    values = {}
    for line in open("/proc/self/status"):
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) * 1024
    return values
stages, anon, current = {}, {}, ["start"]
def sample():
    while True:
        now = status()["RssAnon"]
        anon[current[0]] = max(anon.get(current[0], 0), now)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
plain = miner.run.timed
def timed(run, timings):
    inner = plain(run, timings)
    def run_stage(name, *args, **kwargs):
        current[0] = name
        try:
            return inner(name, *args, **kwargs)
        finally:
            stages[name] = status()["VmHWM"]
            current[0] = "after " + name
    return run_stage
miner.run.timed = timed
code = 0
try:
    app(sys.argv[1:], prog_name="miner")
except SystemExit as stop:
    code = stop.code or 0
print("ANON", json.dumps(anon))
print("STAGES", json.dumps(stages))
print("PEAK", status()["VmHWM"], "EXIT", code)
"""


def peak_reached_in(stages: dict[str, int]) -> str:
    """The first stage after which the high-water mark stood at its final value."""
    top = max(stages.values(), default=0)
    return next((name for name, value in stages.items() if value == top), "?")


def inputs(size: int, queries: int, seed: int) -> tuple[Path, Path]:
    """(pairs table, corpus table) for a corpus of `size` documents; made once and kept."""
    folder = MEMORY_WORK / f"input-{size_name(size)}-{queries}"
    pairs, corpus = folder / "pairs.parquet", folder / "corpus.parquet"
    if pairs.is_file() and corpus.is_file():
        return pairs, corpus
    shards = WORK / f"corpus-{size_name(size)}"
    query_file = WORK / f"queries-{queries}.parquet"
    if not (shards / "complete.json").is_file() or not query_file.is_file():
        model = text_model(CRANFIELD)
        write_corpus(model, size, shards, seed)
        write_queries(model, queries, query_file, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(corpus.with_suffix(".tmp"), pa.schema([("doc_id", pa.string()), ("text", pa.string())])) as w:
        for batch in corpus_batches(shards):
            w.write_batch(batch)
    corpus.with_suffix(".tmp").rename(corpus)
    chosen = pq.read_table(query_file)
    step = max(1, size // queries)
    positive_ids = pa.array([f"d{(i * step) % size}" for i in range(chosen.num_rows)], pa.string())
    table = pa.table({"query_id": chosen["query_id"], "query": chosen["text"], "positive_id": positive_ids})
    pq.write_table(table, pairs)
    return pairs, corpus


def prefill(pairs: Path, corpus: Path, cache: Path, seed: int) -> int:
    """Random unit vectors in the embedding cache for every text the run will look up; returns how many."""
    marker = cache / "prefilled.json"
    if marker.is_file():
        return json.loads(marker.read_text())["texts"]
    from miner.cache import EmbeddingCache
    from miner.ingest import ingest
    from miner.models import model_key, resolve_model

    given = ingest(pairs, corpus=corpus)
    key = model_key(resolve_model("all-MiniLM-L6-v2"))
    store = EmbeddingCache(cache)
    rng = np.random.default_rng(seed)
    texts = 0
    for kind, table in (("query", given.queries), ("document", given.corpus)):
        hashes = sorted(set(table.column("text_hash").to_pylist()))
        for start in range(0, len(hashes), 100_000):
            chunk = hashes[start : start + 100_000]
            vectors = rng.standard_normal((len(chunk), DIMENSION)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            store.store(key, kind, chunk, vectors, np.zeros(len(chunk), dtype=bool))
        texts += len(hashes)
    marker.write_text(json.dumps({"texts": texts}))
    return texts


def measured_run(pairs: Path, corpus: Path, cache: Path, out: Path, tree: Path) -> dict[str, Any]:
    env = {**os.environ, "MINER_CACHE_DIR": str(cache), "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-c", MEASURED_RUN, "mine", str(pairs), "--corpus", str(corpus)]
    command += ["--no-bm25", "--out", str(out), "-q", "--json"]
    started = time.perf_counter()
    process = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - started
    lines = process.stdout.strip().splitlines()
    last = lines[-1].split() if lines else ["?"]
    if last[0] != "PEAK" or last[3] != "0":
        raise SystemExit(f"the run failed:\n{process.stdout[-2000:]}\n{process.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    stages = json.loads(lines[-2].removeprefix("STAGES "))
    anonymous = json.loads(lines[-3].removeprefix("ANON "))
    return {
        "peak_rss_bytes": int(last[1]),
        "peak_anon_bytes": max(anonymous.values(), default=0),
        "peak_anon_by_stage_bytes": anonymous,
        "peak_after_stage_bytes": stages,
        "peak_reached_in": peak_reached_in(stages),
        "wall_s": wall,
        "encoded": counts["embeddings"],
        "negatives": counts["sample"]["negatives"],
        "timings_s": manifest.get("timings_s", {}),
    }


def _anonymous(run: dict[str, Any]) -> str:
    """Peak anonymous memory and its stage; runs recorded before the sampler existed have neither."""
    by_stage = run.get("peak_anon_by_stage_bytes")
    if not by_stage:
        return "not measured | "
    stage = max(by_stage, key=by_stage.get)
    return f"{run['peak_anon_bytes'] / 2**30:.2f} GB | {stage}"


def report(runs: list[dict[str, Any]]) -> str:
    lines = [
        "# Peak memory of a whole `miner mine` run, by corpus size",
        "",
        "Written by `bench/run_memory.py`. Dense only, bi-encoder teacher, embedding cache pre-filled with random",
        "unit vectors (encoding 1M passages takes hours here), so the run computes no embedding; everything else",
        "is the real run. Peak RSS is the run process's own VmHWM: it counts the pages of mapped files it touched",
        "(the corpus' Arrow file, the vectors' `.npy` files), which the kernel may drop. Peak anonymous memory",
        "(RssAnon, sampled every 20 ms) is what no file backs; the stage named is where it peaked.",
        "",
        "| code | documents | queries | peak RSS | per 1k documents | peak reached in | peak anonymous | in stage "
        "| wall s | negatives | when |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['label']} | {run['documents']:,} | {run['queries']:,} | {run['peak_rss_bytes'] / 2**30:.2f} GB | "
            f"{run['peak_rss_bytes'] / 2**20 / (run['documents'] / 1000):.1f} MB | {run.get('peak_reached_in', '?')} | "
            f"{_anonymous(run)} | "
            f"{run['wall_s']:.0f} | "
            f"{run['negatives']:,} | {run['date']} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10k,100k,1m")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose miner code runs")
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = RESULTS / "run_memory.json"
    runs = json.loads(record.read_text()) if record.is_file() else []
    for size in sizes_of(args.sizes):
        pairs, corpus = inputs(size, args.queries, args.seed)
        cache = MEMORY_WORK / f"cache-{size_name(size)}-{args.queries}"
        texts = prefill(pairs, corpus, cache, args.seed)
        out = MEMORY_WORK / f"out-{size_name(size)}"
        result = measured_run(pairs, corpus, cache, out, args.tree.resolve())
        if any(result["encoded"].get(f"{kind}_encoded") for kind in ("queries", "documents")):
            raise SystemExit(f"the run encoded texts: {result['encoded']} (the prefill missed some)")
        row = {
            "label": args.label,
            "documents": size,
            "queries": args.queries,
            "texts_prefilled": texts,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            **result,
        }
        print(json.dumps({k: v for k, v in row.items() if k != "timings_s"}), flush=True)
        runs = [r for r in runs if (r["label"], r["documents"], r["queries"]) != (args.label, size, args.queries)]
        runs.append(row)
        record.write_text(json.dumps(runs, indent=1) + "\n")
    (RESULTS / "run_memory.md").write_text(report(runs), encoding="utf-8")
    print(report(runs))


if __name__ == "__main__":
    main()
