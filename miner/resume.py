"""Resumable stages: a run killed at any point picks up from the last stage it finished.

Each finished stage leaves its result and then a completion record in a work folder beside OUT
(`.<name>.miner-work`, next to the lock), so OUT itself only ever receives finished files. A record names
the run key (input file hashes + every setting that changes rows) and the checksums of the files it
vouches for; a result without its record, or with a record of another key or checksum, is recomputed. The
work folder is removed once the manifest is written.

Inside the embedding stage, the embedding cache is the finer checkpoint: it stores each chunk of encoded
texts as soon as the chunk is done, so a kill mid-encoding loses at most one chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from miner.atomic import atomic_write, write_json_atomic, write_parquet_atomic
from miner.config import SPEED_ONLY_MODEL_SETTINGS, MineConfig
from miner.errors import disk_full_as_input_error
from miner.models import Embeddings
from miner.tables import file_sha256
from miner.vectors import backing_file

log = logging.getLogger(__name__)

KEY_FILE = "run-key.json"
# Settings that change only speed, what is shown or which files the rows go to, never rows: a re-run that
# differs only in these resumes.
RUNTIME_ONLY = {
    "out",
    "show_progress",
    "threads",
    "cache",
    "cache_dir",
    "engine",
    "dask_address",
    "workers",
    "formats",
    "batches",  # orders the batched files' rows at export, which is never checkpointed
    "require",  # quality gates decide where the files go, not what is in them
}


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.miner-work"


def run_key(config: MineConfig, input_hashes: dict[str, str]) -> str:
    settings = config.model_dump(mode="json", exclude=RUNTIME_ONLY)
    for key in SPEED_ONLY_MODEL_SETTINGS:
        settings["models"].pop(key, None)
    document = json.dumps({"inputs": input_hashes, "settings": settings}, sort_keys=True)
    return hashlib.blake2b(document.encode(), digest_size=16).hexdigest()


def _save_embeddings(embeddings: tuple[Embeddings, Embeddings], stage: str, folder: Path) -> list[Path]:
    """The stage's files: ids and counts, and each side's vectors as a `.npy` file (the one the stage wrote
    into, when it kept its vectors in this folder: a corpus' vectors are not copied a second time)."""
    queries, documents = embeddings
    files = []
    for side, vectors in (("query", queries.vectors), ("document", documents.vectors)):
        backing = backing_file(vectors)
        if backing is not None and backing.parent == folder.resolve():
            files.append(backing)
            continue
        path = folder / f"{stage}.{side}.npy"
        with atomic_write(path, folder) as temporary, temporary.open("wb") as handle:
            np.save(handle, vectors)
        files.append(path)
    ids = folder / f"{stage}.ids.npz"
    with atomic_write(ids, folder) as temporary, temporary.open("wb") as handle:
        np.savez(
            handle,
            query_ids=np.asarray(queries.ids.to_pylist(), dtype=str),
            doc_ids=np.asarray(documents.ids.to_pylist(), dtype=str),
            encoded=np.asarray([queries.encoded, documents.encoded]),
            truncated=np.asarray([queries.truncated, documents.truncated]),
        )
    return [ids, *files]


def _load_embeddings(ids: Path, query_vectors: Path, doc_vectors: Path) -> tuple[Embeddings, Embeddings]:
    with np.load(ids, allow_pickle=False) as stored:
        encoded, truncated = stored["encoded"].tolist(), stored["truncated"].tolist()
        query_ids, doc_ids = stored["query_ids"].tolist(), stored["doc_ids"].tolist()
    # Memory-mapped, as the run that wrote them kept them.
    return (
        Embeddings(pa.array(query_ids, pa.string()), np.load(query_vectors, mmap_mode="r"), encoded[0], truncated[0]),
        Embeddings(pa.array(doc_ids, pa.string()), np.load(doc_vectors, mmap_mode="r"), encoded[1], truncated[1]),
    )


class StageStore:
    """The work folder of one output: finished stage results of the current run key."""

    def __init__(self, out: Path, key: str) -> None:
        self.folder = work_dir(out)
        self.key = key
        recorded = self._recorded_key()
        if recorded is not None and recorded != key:
            log.info("settings or inputs changed since the interrupted run; starting its stages afresh")
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)  # a write the previous run did not finish
        if recorded != key:
            write_json_atomic({"key": key}, self.folder / KEY_FILE)

    def _recorded_key(self) -> str | None:
        try:
            return json.loads((self.folder / KEY_FILE).read_text(encoding="utf-8"))["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _record_path(self, stage: str) -> Path:
        return self.folder / f"{stage}.done.json"

    def load(self, stage: str) -> tuple[bool, Any]:
        """(True, result) when `stage` finished under this key and its files are intact, else (False, None)."""
        try:
            record = json.loads(self._record_path(stage).read_text(encoding="utf-8"))
            if record["key"] != self.key:
                return False, None
            for name, checksum in record["files"].items():
                if file_sha256(self.folder / name) != checksum:
                    log.warning("checkpoint %s of stage %s is damaged; running the stage again", name, stage)
                    return False, None
            kind = record["kind"]
            paths = [self.folder / name for name in record["files"]]
            if kind == "table":
                return True, pq.read_table(paths[0])
            if kind == "table+counts":
                return True, (pq.read_table(paths[0]), record["counts"])
            return True, _load_embeddings(*paths)
        except (OSError, ValueError, KeyError, TypeError, StopIteration):
            return False, None

    @disk_full_as_input_error
    def save(self, stage: str, result: Any) -> None:
        """Keep `result` if it is a kind the store knows; the record goes last, after the data is in place."""
        counts = None
        if isinstance(result, pa.Table):
            kind, paths = "table", [self.folder / f"{stage}.parquet"]
            write_parquet_atomic(result, paths[0], scratch=self.folder)
        elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], pa.Table):
            kind, paths, counts = "table+counts", [self.folder / f"{stage}.parquet"], result[1]
            write_parquet_atomic(result[0], paths[0], scratch=self.folder)
        elif isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, Embeddings) for r in result):
            kind, paths = "embeddings", _save_embeddings(result, stage, self.folder)
        else:
            return
        files = {path.name: file_sha256(path) for path in paths}
        record = {"stage": stage, "key": self.key, "kind": kind, "files": files}
        if counts is not None:
            record["counts"] = counts
        write_json_atomic(record, self._record_path(stage), scratch=self.folder)

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def resumable(
    run: Callable[..., Any], store: StageStore, resumed: list[str], skip: frozenset[str] = frozenset()
) -> Callable[..., Any]:
    """Wrap a stage runner: a stage finished before is loaded, not run; a stage that finishes is kept.

    Stages in `skip` always run (cheap ones, or those with their own checkpoint such as the final export).
    """

    def run_resumably(name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name not in skip:
            found, result = store.load(name)
            if found:
                resumed.append(name)
                log.info("stage %s: finished by an earlier, interrupted run; resumed from its checkpoint", name)
                return result
        result = run(name, function, *args, **kwargs)
        if name not in skip:
            store.save(name, result)
        return result

    return run_resumably
