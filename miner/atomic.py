"""Atomic file writes: a file is either absent or whole, whatever happens to the process writing it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_write(path: Path, scratch: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; it is renamed to `path` when the block succeeds, removed otherwise.

    The temporary file lives in `scratch` (same filesystem) when given, so that not even its name appears in
    the folder a trainer reads; else beside `path`.
    """
    folder = scratch if scratch is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.fchmod(descriptor, _FILE_MODE)  # mkstemp makes 0600; outputs are shared like any written file
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path, scratch: Path | None = None) -> None:
    with atomic_write(path, scratch) as temporary:
        pq.write_table(table, temporary, compression="zstd")


def write_json_atomic(document: dict[str, Any], path: Path, scratch: Path | None = None) -> None:
    with atomic_write(path, scratch) as temporary, temporary.open("w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
