"""Content-addressed caches: nothing expensive is computed twice.

- embeddings: (model fingerprint, query|document) -> text hash -> vector, plus whether the model had to
  truncate the text;
- teacher scores: (teacher fingerprint) -> (query text hash, passage text hash) -> score;
- BM25 indexes: (analyser settings, Anserini version) -> the set of (doc id, text hash) indexed.

A re-run with other filter or sampling settings computes none of them again; a corpus with a few new
documents encodes, scores and indexes only those. Every entry is written under a temporary name and renamed,
so concurrent runs never read a half-written entry, and carries a checksum: an entry that fails it is
discarded with a warning and computed again, never used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from miner.atomic import atomic_write, write_parquet_atomic
from miner.errors import InputError
from miner.tables import file_sha256
from miner.vectors import Allocator, in_memory, write_rows

log = logging.getLogger(__name__)

KINDS = ("embeddings", "teacher", "bm25", "dense")  # dense: saved faiss indexes (miner/candidates.py)
# What the texts of an embeddings entry are, by the kind in its name.
_TEXTS = {"query": "queries", "document": "documents"}
# Beside each entry (a folder or an index file): what it holds, for `miner cache info`. Its modification time is
# when the entry was last used, which `miner cache clear --older-than` goes by. A sidecar, not a file inside the
# entry: a BM25 entry's files are exactly those its checksums list.
ENTRY_SUFFIX = ".entry.json"


def entry_record(entry: Path) -> Path:
    return entry.with_name(entry.name + ENTRY_SUFFIX)


def note_use(entry: Path, **info: str) -> None:
    """Record what `entry` holds and that it was used now. The description is written once, or again when it
    lacked the model's name (a Dask worker knows only the model's key) and `info` has it. Best effort: a cache
    that cannot be annotated still works."""
    record = entry_record(entry)
    try:
        known = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    try:
        if known and (known.get("model") or not info.get("model")):
            os.utime(record)  # described already: only the time of use changes
            return
        document = {**known, **{key: value for key, value in info.items() if value}}
        document["created"] = known.get("created") or _now()
        record.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(record) as temporary:
            temporary.write_text(json.dumps(document), encoding="utf-8")
    except OSError as error:
        log.debug("could not record the use of cache entry %s: %s", entry, error)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _strings(values: list[str] | pa.Array | pa.ChunkedArray) -> pl.Series:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return pl.Series(values.cast(pa.large_string()), dtype=pl.String)
    return pl.Series(values, dtype=pl.String)


def _checksum(*arrays: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        if array.dtype.kind == "U":
            digest.update("\n".join(array.tolist()).encode())
        else:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class _ShardStore:
    """npz shards of aligned arrays in one folder, each named by and checked against its checksum."""

    def __init__(self, folder: Path, fields: tuple[str, ...]) -> None:
        self.folder = folder
        self.fields = fields

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.npz")) if self.folder.is_dir() else []

    def read(self) -> Iterator[dict[str, np.ndarray]]:
        """Every intact shard, one at a time (a cache may hold more than memory); damaged ones are removed with a
        warning."""
        for shard in self.shards():
            try:
                with np.load(shard, allow_pickle=False) as stored:
                    arrays = {name: stored[name] for name in self.fields}
                    valid = str(stored["checksum"]) == _checksum(*arrays.values())
            except (OSError, ValueError, KeyError, EOFError) as error:
                valid, arrays = False, {}
                log.debug("cache shard %s is unreadable: %s", shard, error)
            if not valid:
                log.warning("cache shard %s failed its checksum; discarding it and computing again", shard)
                shard.unlink(missing_ok=True)
                continue
            yield arrays

    def write(self, **arrays: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        checksum = _checksum(*(arrays[name] for name in self.fields))
        with atomic_write(self.folder / f"shard-{checksum}.npz") as temporary, temporary.open("wb") as handle:
            np.savez(handle, checksum=checksum, **{name: arrays[name] for name in self.fields})

    def size(self) -> tuple[int, int, int]:
        """(shards, rows, bytes)."""
        shards = self.shards()
        rows = 0
        for shard in shards:
            with np.load(shard, allow_pickle=False) as stored:
                rows += len(stored[self.fields[0]])
        return len(shards), rows, sum(s.stat().st_size for s in shards)


class EmbeddingCache:
    """Vectors by (model key, query|document, text hash). `model_names` (key -> the model as the user named it)
    goes into the entries' descriptions for `miner cache info`."""

    def __init__(self, root: Path, model_names: dict[str, str] | None = None, precision: str = "float32") -> None:
        self.root = root
        self.model_names = model_names or {}
        self.precision = precision

    def _store(self, model: str, kind: str) -> _ShardStore:
        store = _ShardStore(self.root / "embeddings" / f"{model}-{kind}", ("hashes", "vectors", "truncated"))
        if store.folder.is_dir():
            text = _TEXTS.get(kind, kind)
            note_use(
                store.folder,
                kind="embeddings",
                model=self.model_names.get(model, ""),
                precision=self.precision,
                text=text,
            )
        return store

    def lookup(
        self,
        model: str,
        kind: str,
        hashes: list[str] | pa.Array | pa.ChunkedArray,
        allocate: Allocator | None = in_memory,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(vectors, found, truncated) for `hashes`; vectors is None when nothing of this model is cached.

        `allocate(rows, width)` makes the array the vectors go into (in memory, or a file on disk); with
        None only `found` and `truncated` are worked out. Rows not found are zeros and not truncated. A hash in
        several shards takes the first shard's vector.
        """
        wanted = pl.DataFrame({"text_hash": _strings(hashes)}).with_row_index("row")
        vectors: np.ndarray | None = None
        width: int | None = None
        found = np.zeros(wanted.height, dtype=bool)
        truncated = np.zeros(wanted.height, dtype=bool)
        for shard in self._store(model, kind).read():
            if width is None:
                width = shard["vectors"].shape[1]
                vectors = allocate(wanted.height, width) if allocate is not None else None
            if shard["vectors"].shape[1] != width:
                continue
            held = pl.DataFrame({"text_hash": shard["hashes"]}).with_row_index("at").unique("text_hash", keep="first")
            hits = wanted.join(held, on="text_hash", how="inner")
            rows, at = hits["row"].to_numpy(), hits["at"].to_numpy()
            fresh = ~found[rows]  # the first shard holding a hash gives its vector
            rows, at = rows[fresh], at[fresh]
            if vectors is not None:
                write_rows(vectors, rows, shard["vectors"][at])
            found[rows] = True
            truncated[rows] = shard["truncated"][at]
        return vectors, found, truncated

    def store(self, model: str, kind: str, hashes: list[str], vectors: np.ndarray, truncated: np.ndarray) -> None:
        if hashes:
            self._store(model, kind).write(
                hashes=np.asarray(hashes, dtype=str),
                vectors=vectors.astype(np.float32),
                truncated=np.asarray(truncated, dtype=bool),
            )
            self._store(model, kind)  # a new entry is described once it exists


class TeacherScoreCache:
    """Cross-encoder scores by (teacher fingerprint, query text hash, passage text hash)."""

    def __init__(self, root: Path, model_names: dict[str, str] | None = None, precision: str = "float32") -> None:
        self.root = root
        self.model_names = model_names or {}
        self.precision = precision

    def _store(self, model: str) -> _ShardStore:
        store = _ShardStore(self.root / "teacher" / model, ("query_hashes", "passage_hashes", "scores"))
        if store.folder.is_dir():
            name = self.model_names.get(model, "")
            note_use(
                store.folder, kind="teacher scores", model=name, precision=self.precision, text="(query, passage) pairs"
            )
        return store

    def lookup(self, model: str, pairs: pl.DataFrame) -> pl.DataFrame:
        """`pairs` (query_hash, passage_hash) -> the same rows with `teacher_score`, null where not cached."""
        keys = ["query_hash", "passage_hash"]
        scored = pairs.with_columns(teacher_score=pl.lit(None, pl.Float32))
        # Shard by shard, the first shard holding a pair giving its score: the cache may hold more than memory.
        for shard in self._store(model).read():
            held = pl.DataFrame(
                {
                    "query_hash": shard["query_hashes"],
                    "passage_hash": shard["passage_hashes"],
                    "held_score": shard["scores"].astype(np.float32),
                }
            ).unique(keys, keep="first")
            scored = (
                scored.join(held, on=keys, how="left", maintain_order="left")
                .with_columns(teacher_score=pl.coalesce("teacher_score", "held_score"))
                .drop("held_score")
            )
        return scored

    def store(self, model: str, scored: pl.DataFrame) -> None:
        if scored.height:
            self._store(model).write(
                query_hashes=scored["query_hash"].to_numpy().astype(str),
                passage_hashes=scored["passage_hash"].to_numpy().astype(str),
                scores=scored["teacher_score"].to_numpy().astype(np.float32),
            )
            self._store(model)  # a new entry is described once it exists


DOCS_FILE = "docs.parquet"  # the (doc_id, text_hash) rows an index holds
CHECKSUMS_FILE = "checksums.json"  # per index file; written last, so an entry without it is unfinished
# A search's hits sit beside the index they came from (`<entry><HITS_INFIX><search key>.parquet`), listed and
# removed with it.
HITS_INFIX = ".hits-"


class Bm25IndexCache:
    """Lucene indexes by (analyser settings, Anserini version, corpus); an index grows by the new documents.

    An entry is a folder named by the hash of its settings and documents. For a corpus that adds documents to
    a cached one, the cached index is copied (hard links: Lucene never rewrites a segment file) and only the
    new documents are added to the copy.
    """

    def __init__(self, root: Path, corpus: str = "") -> None:
        self.root = root / "bm25"
        self.corpus = corpus  # where the documents came from, for `miner cache info`

    def _used(self, entry: Path) -> Path:
        note_use(entry, kind="BM25 index", model="Lucene BM25", text=f"documents of {self.corpus or 'a corpus'}")
        return entry

    def key(self, settings: str, docs: pa.Table) -> str:
        digest = hashlib.blake2b(settings.encode(), digest_size=16)
        frame = pl.from_arrow(docs.select(["doc_id", "text_hash"])).sort("doc_id")
        for column in ("doc_id", "text_hash"):
            digest.update("\n".join(frame[column].to_list()).encode())
        return f"{hashlib.blake2b(settings.encode(), digest_size=6).hexdigest()}-{digest.hexdigest()}"

    def find(self, key: str) -> Path | None:
        entry = self.root / key
        if not (entry / CHECKSUMS_FILE).is_file():
            return None
        if not self._intact(entry):
            log.warning("cached BM25 index %s failed its checksum; discarding it and indexing again", entry)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        return entry

    def _intact(self, entry: Path) -> bool:
        try:
            checksums = json.loads((entry / CHECKSUMS_FILE).read_text(encoding="utf-8"))
            present = {p.name for p in entry.iterdir() if p.name != CHECKSUMS_FILE}
            return present == set(checksums) and all(file_sha256(entry / n) == c for n, c in checksums.items())
        except (OSError, ValueError, TypeError, AttributeError):
            return False

    def index(self, settings: str, docs: pa.Table, build: Callable[[pa.Table, Path, bool], None]) -> tuple[Path, int]:
        """(index folder, documents indexed now) for `docs`: the cached index, one grown from the largest cached
        index of the same settings whose documents are all in `docs`, or a new one.

        `build(rows, folder, append)` indexes `rows` into `folder`, adding to what is there when `append`.
        """
        key = self.key(settings, docs)
        entry = self.find(key)
        if entry is not None:
            return self._used(entry), 0
        base = self._base_for(key, docs)
        scratch = self._scratch()
        try:
            new_docs = docs
            if base is not None:
                self._copy_into(base[0], scratch)
                new_docs = docs.filter(pc.is_in(docs["doc_id"], base[1]["doc_id"]))
            build(new_docs, scratch, base is not None)
            return self._used(self._publish(scratch, key, docs)), new_docs.num_rows
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def remembered(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A small JSON answer about a corpus (its language, say) kept beside the indexes: computed once."""
        path = self.root / f"{name}.json"
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(document, dict):
                return document
        except (OSError, ValueError):
            pass
        document = compute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as temporary:
                temporary.write_text(json.dumps(document), encoding="utf-8")
        except OSError as error:
            log.debug("could not keep %s: %s", path, error)
        return document

    @staticmethod
    def _hits_file(entry: Path, queries: pa.Table, settings: dict[str, object]) -> Path:
        digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16)
        for column in ("query_id", "text_hash"):
            digest.update("\n".join(map(str, queries.column(column).to_pylist())).encode())
        return entry.with_name(f"{entry.name}{HITS_INFIX}{digest.hexdigest()}.parquet")

    def hits(self, entry: Path, queries: pa.Table, settings: dict[str, object]) -> pa.Table | None:
        """What a search of `entry` for `queries` with `settings` returned before, or None: a warm run with other
        filter settings then never starts the JVM."""
        try:
            return pq.read_table(self._hits_file(entry, queries, settings))
        except (OSError, pa.ArrowInvalid):
            return None

    def keep_hits(self, entry: Path, queries: pa.Table, settings: dict[str, object], hits: pa.Table) -> None:
        write_parquet_atomic(hits, self._hits_file(entry, queries, settings), scratch=self.root)

    def _base_for(self, key: str, docs: pa.Table) -> tuple[Path, pa.Table] | None:
        """The largest cached index (same settings) whose documents are all in `docs`, and the ones it lacks."""
        prefix = key.split("-")[0]
        wanted = pl.from_arrow(docs.select(["doc_id", "text_hash"]))
        best: tuple[int, Path, pl.DataFrame] | None = None
        for entry in self.root.glob(f"{prefix}-*") if self.root.is_dir() else []:
            if not entry.is_dir():
                continue  # an entry's description
            try:
                held = pl.read_parquet(entry / DOCS_FILE)
            except (OSError, pl.exceptions.ComputeError):
                continue
            if held.height == 0 or not (entry / CHECKSUMS_FILE).is_file():
                continue
            # Every held (id, text) must still be in the corpus with the same text; else start afresh.
            if held.join(wanted, on=["doc_id", "text_hash"], how="anti").height:
                continue
            if best is None or held.height > best[0]:
                best = (held.height, entry, held)
        if best is None or not self._intact(best[1]):
            return None
        new = wanted.join(best[2], on=["doc_id", "text_hash"], how="anti")
        return best[1], new.to_arrow()

    def _scratch(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".building-", dir=self.root))

    @staticmethod
    def _copy_into(base: Path, scratch: Path) -> None:
        for file in base.iterdir():
            if file.name in (DOCS_FILE, CHECKSUMS_FILE):
                continue
            try:
                os.link(file, scratch / file.name)
            except OSError:
                shutil.copy2(file, scratch / file.name)

    def _publish(self, scratch: Path, key: str, docs: pa.Table) -> Path:
        """Seal a built index in `scratch` and move it to its key; a concurrent run's equal entry wins."""
        pq.write_table(docs.select(["doc_id", "text_hash"]), scratch / DOCS_FILE)
        checksums = {p.name: file_sha256(p) for p in sorted(scratch.iterdir())}
        (scratch / CHECKSUMS_FILE).write_text(json.dumps(checksums), encoding="utf-8")
        entry = self.root / key
        try:
            os.rename(scratch, entry)
        except OSError:  # another run published the same index first
            shutil.rmtree(scratch, ignore_errors=True)
        return entry


@dataclass(frozen=True)
class Entry:
    """One cache entry as `miner cache info` shows it."""

    path: Path  # a folder, or a dense index file (its checksum record beside it)
    kind: str  # embeddings, teacher scores, BM25 index, dense index
    model: str
    precision: str
    text: str  # what was encoded or indexed: queries, documents, pairs
    rows: int
    unit: str  # what the rows are
    size: int  # bytes
    created: dt.datetime
    last_used: dt.datetime

    def files(self) -> list[Path]:
        """Everything the entry is made of, its description included."""
        own = (
            list(self.path.rglob("*"))
            if self.path.is_dir()
            else [self.path, self.path.with_name(self.path.name + ".json")]
        )
        return [*own, entry_record(self.path)]


def _described(path: Path, kind: str, rows: int, unit: str, files: list[Path], **defaults: str) -> Entry:
    """An entry with what its record says; an entry from before records were kept reads its files' times."""
    record = entry_record(path)
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
        last_used = dt.datetime.fromtimestamp(record.stat().st_mtime, dt.UTC)
    except (OSError, ValueError):
        info, last_used = {}, None
    info = info if isinstance(info, dict) else {}
    times = [f.stat().st_mtime for f in files if f.exists()] or [path.stat().st_mtime]
    newest = dt.datetime.fromtimestamp(max(times), dt.UTC)
    try:
        created = dt.datetime.fromisoformat(info["created"])
    except (KeyError, TypeError, ValueError):
        created = dt.datetime.fromtimestamp(min(times), dt.UTC)
    return Entry(
        path=path,
        kind=kind,
        model=str(info.get("model") or defaults.get("model", "?")),
        precision=str(info.get("precision") or defaults.get("precision", "-")),
        text=str(info.get("text") or defaults.get("text", "?")),
        rows=rows,
        unit=unit,
        size=sum(f.stat().st_size for f in files if f.is_file()),
        created=created,
        last_used=max(last_used or newest, newest),
    )


def _folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")) if parent.is_dir() else []


def entries(root: Path) -> list[Entry]:
    """Every cache entry under `root`, with what it holds and when it was made and last used."""
    found = []
    embeddings, teacher, bm25, dense = (root / kind for kind in KINDS)
    for folder in _folders(embeddings):
        store = _ShardStore(folder, ("hashes",))
        _, vectors, _ = store.size()
        text = _TEXTS.get(folder.name.rsplit("-", 1)[-1], "?")
        found.append(_described(folder, "embeddings", vectors, "vectors", store.shards(), text=text))
    for folder in _folders(teacher):
        store = _ShardStore(folder, ("scores",))
        _, scores, _ = store.size()
        found.append(_described(folder, "teacher scores", scores, "scores", store.shards(), text="pairs"))
    for folder in _folders(bm25):
        try:
            documents = pq.read_metadata(folder / DOCS_FILE).num_rows
        except OSError:
            documents = 0
        files = [*folder.iterdir(), *sorted(bm25.glob(f"{folder.name}{HITS_INFIX}*.parquet"))]
        found.append(_described(folder, "BM25 index", documents, "documents", files, model="Lucene BM25"))
    for index in sorted(dense.glob("*.faiss")) if dense.is_dir() else []:
        files = [index, index.with_name(index.name + ".json")]
        try:
            vectors = int(json.loads(files[1].read_text(encoding="utf-8"))["vectors"])
        except (OSError, ValueError, KeyError, TypeError):
            vectors = 0
        found.append(_described(index, "dense index", vectors, "vectors", files, text="documents"))
    return found


def parse_age(text: str) -> dt.timedelta:
    """'30d', '12h', '2w', '90m' or '45s' -> that long; an InputError names the option otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if not match:
        raise InputError(
            "--older-than", f"'{text}' is not an age", "give a number and a unit: 30d, 12h, 2w, 90m or 45s"
        )
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
    return dt.timedelta(**{unit: int(match.group(1))})


def clear(root: Path, older_than: dt.timedelta | None = None) -> list[Entry]:
    """Remove what the caches wrote under `root`, and nothing else there; with `older_than`, only the entries not
    used for that long. Returns the entries removed."""
    if older_than is None:
        removed = entries(root)
        for kind in KINDS:
            shutil.rmtree(root / kind, ignore_errors=True)
        return removed
    cutoff = dt.datetime.now(dt.UTC) - older_than
    removed = [entry for entry in entries(root) if entry.last_used < cutoff]
    for entry in removed:
        # The description last: an entry whose files are half gone is still listed, and removed by the next clear.
        if entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        for file in entry.files():
            if file.is_file():
                file.unlink(missing_ok=True)
    return removed
