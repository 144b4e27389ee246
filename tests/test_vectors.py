"""Embedding matrices on disk (exact search over blocks, read without mapping the whole file in), and joins
that copy only the documents they name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from miner.tables import rows_named
from miner.vectors import blocks, exact_top_k, file_backed, on_disk


def unit_rows(rows: int, width: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def on_disk_copy(vectors: np.ndarray, path: Path) -> np.ndarray:
    stored = on_disk(path)(*vectors.shape)
    stored[:] = vectors
    stored.flush()
    return stored


@pytest.mark.parametrize("rows_per_block", [7, 100, 5000])
def test_block_search_equals_one_exact_search(tmp_path: Path, rows_per_block: int) -> None:
    documents = on_disk_copy(unit_rows(1000, 48, seed=1), tmp_path / "documents.npy")
    queries = unit_rows(37, 48, seed=2)
    assert file_backed(documents)
    want_scores, want_rows = faiss.knn(queries, np.asarray(documents), 25, faiss.METRIC_INNER_PRODUCT)
    scores, rows = exact_top_k(queries, documents, 25, rows_per_block=rows_per_block)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)


def test_fewer_documents_than_k_pads_with_minus_one(tmp_path: Path) -> None:
    documents = on_disk_copy(unit_rows(5, 8, seed=3), tmp_path / "few.npy")
    scores, rows = exact_top_k(unit_rows(2, 8, seed=4), documents, 9, rows_per_block=2)
    assert (rows[:, :5] >= 0).all() and (rows[:, 5:] == -1).all()
    assert sorted(rows[0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert (np.diff(scores[:, :5], axis=1) <= 0).all()  # best first


def test_blocks_of_a_file_and_of_a_slice_read_the_same_values(tmp_path: Path) -> None:
    vectors = unit_rows(103, 16, seed=5)
    stored = on_disk_copy(vectors, tmp_path / "v.npy")
    reopened = np.load(tmp_path / "v.npy", mmap_mode="r")
    for matrix, expected in ((stored, vectors), (reopened, vectors), (reopened[10:50], vectors[10:50])):
        got = np.concatenate([block for _, block in blocks(matrix, 9)])
        np.testing.assert_array_equal(got, expected)
        starts = [start for start, _ in blocks(matrix, 9)]
        assert starts == list(range(0, len(expected), 9))
    assert not file_backed(reopened[10:50])  # a slice's offset is not the file's: read through the mapping


def test_searching_a_file_does_not_make_it_resident(tmp_path: Path) -> None:
    """A 512 MB matrix searched block by block: this process's peak memory stays far below its size."""
    script = textwrap.dedent(
        f"""
        import faiss
        import numpy as np
        from miner.vectors import exact_top_k
        documents = np.load({str(tmp_path / "big.npy")!r}, mmap_mode="r")
        queries = np.ascontiguousarray(documents[:64])
        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        before = peak()
        scores, rows = exact_top_k(queries, documents, 10)
        assert (rows[:, 0] == np.arange(64)).all(), rows[:, 0]  # each query finds itself first
        print(peak() - before)
        """
    )
    rows, width = 349_525, 384  # 512 MiB of float32
    big = on_disk(tmp_path / "big.npy")(rows, width)
    for start in range(0, rows, 50_000):
        big[start : start + 50_000] = unit_rows(min(50_000, rows - start), width, seed=start)
    big.flush()
    del big
    grown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    size = rows * width * 4
    # One 64 MB block at a time plus faiss's buffers. Read through the mapping instead, the peak grew by the
    # whole file (513 MiB measured).
    assert int(grown.stdout) < size / 4, f"peak grew by {int(grown.stdout) >> 20} MiB for a {size >> 20} MiB file"


def test_rows_written_through_the_mapping_are_dropped_by_release(tmp_path: Path) -> None:
    """Filling a file-backed matrix leaves its pages resident until `release`; the file keeps the rows."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from pathlib import Path
        from miner.vectors import on_disk, release
        def resident():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        vectors = on_disk(Path({str(tmp_path / "filled.npy")!r}))(174_762, 384)  # 256 MiB
        before = resident()
        for start in range(0, len(vectors), 10_000):
            vectors[start : start + 10_000] = 1.0
        filled = resident()
        release(vectors)
        print(filled - before, resident() - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    filled, released = (int(value) for value in out.split())
    assert filled > 200 * 2**20  # the written pages count as this process's memory...
    assert released < 16 * 2**20  # ...until they are released
    stored = np.load(tmp_path / "filled.npy", mmap_mode="r")
    assert stored.shape == (174_762, 384) and float(stored[-1, -1]) == 1.0 and float(stored[0, 0]) == 1.0


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string(), pa.string_view()])
def test_rows_named_takes_ids_of_any_string_type(kind: pa.DataType) -> None:
    corpus = pa.table({"doc_id": pa.array(["a", "b", "c", "d"]), "text": pa.array(["A", "B", "C", "D"])})
    named = rows_named(corpus, "doc_id", pa.array(["c", "a", "c"], kind), pa.chunked_array([pa.array(["a"], kind)]))
    assert named.column("text").to_pylist() == ["A", "C"]  # the table's order, each row once
    assert rows_named(corpus, "doc_id", pa.array([], kind)).num_rows == 0


def test_row_dots_over_a_file_equal_the_in_memory_ones_and_leave_it_unmapped(tmp_path: Path) -> None:
    """Scoring pairs whose rows are spread over a 256 MiB matrix: the distinct rows are read with plain reads, so
    the peak grows by what they hold, not by the file. Measured here: 76 MiB, against 310 MiB for the same products
    taken by indexing the mapping (the kernel maps in the pages around every page touched)."""
    rows, width, pairs = 174_762, 384, 40_000
    stored = on_disk(tmp_path / "spread.npy")(rows, width)
    for start in range(0, rows, 50_000):
        stored[start : start + 50_000] = unit_rows(min(50_000, rows - start), width, seed=start)
    stored.flush()
    del stored
    rng = np.random.default_rng(7)
    distinct = rng.choice(rows, size=5_000, replace=False)  # 7.3 MiB of rows, spread over the whole file
    picks = rng.choice(distinct, size=(2, pairs))
    np.save(tmp_path / "picks.npy", picks)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from miner.vectors import row_dots
        vectors = np.load({str(tmp_path / "spread.npy")!r}, mmap_mode="r")
        left, right = np.load({str(tmp_path / "picks.npy")!r})
        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        before = peak()
        dots = row_dots(vectors, left, vectors, right)
        print(peak() - before)
        np.save({str(tmp_path / "dots.npy")!r}, dots)
        """
    )
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    in_memory = np.load(tmp_path / "spread.npy")
    expected = np.einsum("ij,ij->i", in_memory[picks[0]], in_memory[picks[1]])
    assert np.array_equal(np.load(tmp_path / "dots.npy"), expected)
    # The distinct rows, one 64 MB block being read, the pairs' chunks.
    size = rows * width * 4
    assert grown < size / 2, f"peak grew by {grown >> 20} MiB for a {size >> 20} MiB file"
