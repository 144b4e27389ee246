from __future__ import annotations

from pathlib import Path

from miner.config import load_config
from miner.guards import available_memory, dense_index_warning, disk_needs
from miner.ingest import ingest


def test_an_approximate_index_warns_past_half_the_memory_and_names_the_way_out() -> None:
    # 10M passages x 384 floats, twice (the vectors read in to build, and the index's copy): about 28.6 GB.
    warning = dense_index_warning(10_000_000, 384, "hnsw", available=24 * 2**30)
    assert warning is not None and "hnsw index over 10,000,000 documents needs about 28.6 GB" in warning
    assert "--dense-index flat" in warning
    assert dense_index_warning(1_398, 384, "ivf", available=24 * 2**30) is None
    # Exact search reads the vectors from disk in blocks: no size is too large for memory.
    assert dense_index_warning(10_000_000, 384, "flat", available=24 * 2**30) is None
    assert available_memory() is not None  # this machine reports MemAvailable


def test_disk_needs_grow_with_the_settings_that_write(cranfield: Path, tmp_path: Path) -> None:
    data = ingest(cranfield)
    base = {"data": cranfield, "out": tmp_path / "out", "cache_dir": tmp_path / "cache"}
    needs = {need.what: need.bytes for need in disk_needs(data, load_config(None, base))}
    assert set(needs) == {"outputs", "stage checkpoints", "embedding cache", "BM25 index"}
    # 1,398 documents + 225 queries, 384 floats each.
    assert needs["embedding cache"] == (1_398 + 225) * 384 * 4
    lean = load_config(None, {**base, "cache": False, "retrieval.bm25": False})
    no_cache = {need.what for need in disk_needs(data, lean)}
    assert no_cache == {"outputs", "stage checkpoints"}
