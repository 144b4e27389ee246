"""Resource guards, run before the heavy stages: refuse when the disk cannot hold the run, warn on memory.

The estimates are upper bounds from the input's size and the settings (uncompressed rows, every stage's
checkpoint, every embedding cached), so a run that passes the guard does not fail half-way for room; a
disk that fills up anyway (another process writing) still ends in one line, and the finished stages stay.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from miner.batches import check_batch_size
from miner.config import MineConfig
from miner.errors import InputError
from miner.ingest import Ingested
from miner.manifest import nearest_existing
from miner.models import ModelRef, resolve_model
from miner.pipeline import dense_index_spec
from miner.resume import work_dir

log = logging.getLogger(__name__)

FLOAT_BYTES = 4
CANDIDATE_ROW_BYTES = 64  # ids, ranks, scores and source of one candidate, uncompressed
CHECKPOINTED_CANDIDATE_TABLES = 6  # bm25, dense, pool, teacher, geometry, filter
LUCENE_BYTES_PER_TEXT_BYTE = 1.5  # postings, positions and the stored raw document
SAFETY = 1.25
OUTPUT_FILES = 3  # negatives, triplets, ntuples


@dataclass(frozen=True)
class Need:
    what: str
    folder: Path
    bytes: int


def embedding_dimension(ref: ModelRef) -> int:
    """The model's output width from its config file, without loading it (768 when it cannot be read)."""
    try:
        config = json.loads((Path(ref.location) / "config.json").read_text(encoding="utf-8"))
        return int(config.get("hidden_size") or config.get("d_model") or 768)
    except (OSError, ValueError, TypeError):
        return 768


def _embedding_width(config: MineConfig) -> int:
    models = config.models
    return embedding_dimension(resolve_model(models.embedding_model, trust_remote_code=models.trust_remote_code))


def _text_bytes(column: object) -> int:
    return int(pc.sum(pc.binary_length(pc.cast(column, "binary"))).as_py() or 0)


def disk_needs(data: Ingested, config: MineConfig) -> list[Need]:
    documents, queries, positives = data.corpus.num_rows, data.queries.num_rows, data.qrels.num_rows
    corpus_text = _text_bytes(data.corpus["text"])
    query_text = _text_bytes(data.queries["text"])
    retrieval = config.retrieval
    needs_vectors = retrieval.dense or config.models.cross_encoder is None or config.filter.needs_geometry
    vectors = (documents + queries) * _embedding_width(config) * FLOAT_BYTES
    vectors = vectors if needs_vectors else 0
    depth = (retrieval.bm25_k if retrieval.bm25 else 0) + (retrieval.dense_k if retrieval.dense else 0)
    candidate_tables = queries * depth * CANDIDATE_ROW_BYTES * CHECKPOINTED_CANDIDATE_TABLES
    rows = positives * config.sample.num_negatives
    # Parquet stores each distinct text once per row group (dictionary encoding), so the three files hold
    # at most the corpus and the queries each, plus ids and scores per row.
    outputs = OUTPUT_FILES * (corpus_text + query_text) + rows * CANDIDATE_ROW_BYTES
    needs = [
        Need("outputs", config.out, int(outputs)),
        Need("stage checkpoints", work_dir(config.out), int(candidate_tables + vectors)),
        Need("embedding cache", config.cache_dir, int(vectors) if config.cache else 0),
        Need("BM25 index", Path(tempfile.gettempdir()), int(corpus_text * LUCENE_BYTES_PER_TEXT_BYTE) * retrieval.bm25),
    ]
    return [need for need in needs if need.bytes > 0]


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def check_disk(needs: list[Need]) -> None:
    """Refuse when a filesystem has less free room than what the run will write to it."""
    by_device: dict[int, list[Need]] = {}
    for need in needs:
        by_device.setdefault(os.stat(nearest_existing(need.folder)).st_dev, []).append(need)
    for group in by_device.values():
        needed = int(sum(need.bytes for need in group) * SAFETY)
        folder = nearest_existing(group[0].folder)
        free = shutil.disk_usage(folder).free
        if needed > free:
            parts = ", ".join(f"{need.what} {human(need.bytes)}" for need in group)
            raise InputError(
                folder,
                f"not enough free disk: this run needs about {human(needed)} here ({parts}), {human(free)} is free",
                "free space, or choose another --out / --cache-dir (or --no-cache)",
            )


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dense_index_warning(documents: int, width: int, kind: str, available: int) -> str | None:
    """A warning when an approximate index over `documents` vectors would take over half the available memory.

    Exact search needs none: it reads the vectors from the run's file a block at a time (miner/vectors.py).
    An HNSW or IVF index holds every vector in memory, and building it needs them all at once.
    """
    if kind == "flat":
        return None
    needed = documents * width * FLOAT_BYTES * 2  # the vectors read in to build, and the index's own copy
    if needed <= available // 2:
        return None
    return (
        f"a {kind} index over {documents:,} documents needs about {human(needed)} of memory and "
        f"{human(available)} is available; use exact search (--dense-index flat), which reads the vectors "
        "from disk in blocks, or run on a larger machine"
    )


def memory_warnings(data: Ingested, config: MineConfig) -> list[str]:
    """Settings whose memory grows with the corpus, when the estimate comes near what the machine has."""
    available = available_memory()
    if available is None or not config.retrieval.dense:
        return []
    width = _embedding_width(config)
    documents = data.corpus.num_rows
    kind = dense_index_spec(config).resolve(documents)
    warning = dense_index_warning(documents, width, kind, available)
    return [warning] if warning else []


def check_resources(data: Ingested, config: MineConfig) -> list[str]:
    """Refuse what cannot fit on disk or into training batches; return warnings about memory."""
    queries = pc.count_distinct(data.qrels["query_id"]).as_py()
    check_batch_size(config.batches.size, queries, "the input (queries with a positive)")
    check_disk(disk_needs(data, config))
    warnings = memory_warnings(data, config)
    for warning in warnings:
        log.warning(warning)
    return warnings
