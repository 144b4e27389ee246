"""Embedding matrices that need not fit in memory: made in memory or as a `.npy` file, read back in blocks.

A million passages at 384 dimensions are 1.5 GB of float32, ten million are 15 GB. A run keeps its document
vectors in a file in its work folder; exact search and checkpoints read that file a block at a time with
plain reads, so the matrix never has to be resident as a whole.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# (rows, width) -> a zeroed float32 matrix to fill.
Allocator = Callable[[int, int], np.ndarray]

# Rows read per block: 64 MB whatever the width (43,690 rows of 384 floats).
BLOCK_BYTES = 64 << 20


def in_memory(rows: int, width: int) -> np.ndarray:
    return np.zeros((rows, width), dtype=np.float32)


def on_disk(path: Path) -> Allocator:
    """An allocator of a `.npy` file at `path`, memory-mapped: pages the kernel may write out and drop."""

    def allocate(rows: int, width: int) -> np.ndarray:
        if rows == 0:
            return in_memory(rows, width)  # a file of no bytes cannot be mapped
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, width))

    return allocate


def file_backed(vectors: np.ndarray) -> bool:
    """Whether `vectors` is a whole `.npy`-style file mapping (not a slice of one), so its file can be read."""
    return isinstance(vectors, np.memmap) and isinstance(vectors.base, mmap.mmap) and vectors.filename is not None


def backing_file(vectors: np.ndarray) -> Path | None:
    """The file a file-backed matrix lives in, with every write flushed to it; None for one in memory."""
    if not file_backed(vectors):
        return None
    assert isinstance(vectors, np.memmap) and vectors.filename is not None
    if vectors.mode != "r":
        vectors.flush()
    return Path(vectors.filename)


def release(vectors: np.ndarray) -> None:
    """Write a file-backed matrix's changed rows to its file and drop its pages from this process.

    Rows written through the mapping stay resident (and count in this process's memory) until the kernel
    writes them back; a run that fills a million rows would otherwise hold them all.
    """
    if backing_file(vectors) is not None:
        base = vectors.base
        assert isinstance(base, mmap.mmap)
        base.madvise(mmap.MADV_DONTNEED)


# Rows handled at a time when pairs are multiplied or rows written by number: 6 MB of 384-float rows.
ROW_CHUNK = 4096


def distinct_rows(vectors: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, positions) with `matrix[positions] == vectors[rows]`: for a file-backed matrix, only the distinct
    rows asked for, read in one pass of plain block reads.

    Indexing the mapping instead maps whole neighbourhoods of pages into this process (the kernel faults in the
    pages around each one touched): 2,048 random rows of a 256 MB file left all of it resident. A pass over
    the file reads about 4 GB/s from the page cache here.
    """
    if not file_backed(vectors):
        return vectors, rows
    wanted, positions = np.unique(rows, return_inverse=True)
    picked = np.empty((len(wanted), vectors.shape[1]), dtype=np.float32)
    if len(wanted):
        for start, block in blocks(vectors):
            low, high = np.searchsorted(wanted, [start, start + len(block)])
            picked[low:high] = block[wanted[low:high] - start]
            del block  # before the next one is read
    return picked, positions


def gathered(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`vectors[rows]` as an array in memory, without mapping a file-backed matrix's pages in."""
    matrix, positions = distinct_rows(vectors, rows)
    return np.asarray(matrix[positions])


def row_dots(left: np.ndarray, left_rows: np.ndarray, right: np.ndarray, right_rows: np.ndarray) -> np.ndarray:
    """`left[left_rows[i]] . right[right_rows[i]]` for every i: the distinct rows are read once, and the products
    computed a chunk of pairs at a time, so that memory follows the distinct rows, not the number of pairs."""
    if left is right:  # one pass over the file for both sides
        matrix, positions = distinct_rows(left, np.concatenate([left_rows, right_rows]))
        left, left_rows, right, right_rows = matrix, positions[: len(left_rows)], matrix, positions[len(left_rows) :]
    else:
        left, left_rows = distinct_rows(left, left_rows)
        right, right_rows = distinct_rows(right, right_rows)
    dots = np.empty(len(left_rows), dtype=np.float32)
    for start in range(0, len(left_rows), ROW_CHUNK):
        stop = start + ROW_CHUNK
        dots[start:stop] = np.einsum("ij,ij->i", left[left_rows[start:stop]], right[right_rows[start:stop]])
    return dots


def write_rows(vectors: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """`vectors[rows] = values`; into a file-backed matrix in row order, a chunk at a time, its pages dropped
    after each. Scattered over the mapping at once, 100,000 rows of a million-row file kept 1.4 GB resident."""
    if not file_backed(vectors):
        vectors[rows] = values
        return
    order = np.argsort(rows, kind="stable")
    for start in range(0, len(order), ROW_CHUNK):
        chunk = order[start : start + ROW_CHUNK]
        vectors[rows[chunk]] = values[chunk]
        release(vectors)


def block_rows(width: int) -> int:
    return max(1, BLOCK_BYTES // max(1, width * 4))


def blocks(vectors: np.ndarray, rows_per_block: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) over `vectors`, each block a fresh contiguous float32 array.

    A file-backed matrix is read with plain reads: touching it through the mapping would leave every page
    resident in this process until the kernel needs the memory.
    """
    rows, width = vectors.shape
    step = rows_per_block or block_rows(width)
    path = backing_file(vectors)
    if path is None:
        for start in range(0, rows, step):
            yield start, np.ascontiguousarray(vectors[start : start + step], dtype=np.float32)
        return
    assert isinstance(vectors, np.memmap)
    with path.open("rb") as handle:
        for start in range(0, rows, step):
            count = min(step, rows - start)
            handle.seek(vectors.offset + start * width * 4)
            # Not bound to a name here: this frame would hold the block while the next one is read.
            yield start, np.fromfile(handle, dtype=np.float32, count=count * width).reshape(count, width)


def stacked(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard (scores, rows) results, one after another in query order; empty (0, k) arrays for none."""
    if not parts:
        return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
    return np.concatenate([scores for scores, _ in parts]), np.concatenate([rows for _, rows in parts])


def exact_top_k(
    queries: np.ndarray, documents: np.ndarray, k: int, rows_per_block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(inner products, document rows), each (queries, k), best first: exact search a block of documents at a
    time, merged in one heap per query. Rows are -1 where there are fewer than k documents."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if k == 0 or len(queries) == 0 or len(documents) == 0:
        return np.zeros((len(queries), k), dtype=np.float32), np.full((len(queries), k), -1, dtype=np.int64)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, block in blocks(documents, rows_per_block):
        scores, rows = faiss.knn(queries, block, min(k, len(block)), faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, rows + start, -1))
        del block  # before the next one is read: one block in memory at a time, not two
    heap.finalize()
    return heap.D, heap.I
