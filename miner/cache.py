"""Content-addressed cache of embeddings: (model fingerprint, query|document) -> text hash -> vector.

A re-run with other filter or sampling settings, or over a corpus with a few new documents, encodes only
texts it has not seen with that model. Entries are shards written to a temporary name and renamed, so
concurrent runs never read a half-written shard; each shard carries a checksum, and a shard that fails
it is discarded with a warning and its texts are encoded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from miner.export import atomic_write

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINER_CACHE_DIR", Path.home() / ".cache" / "hardneg-miner"))


def _checksum(hashes: np.ndarray, vectors: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\n".join(hashes.tolist()).encode())
    digest.update(np.ascontiguousarray(vectors).tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, model: str, kind: str) -> Path:
        return self.root / "embeddings" / f"{model}-{kind}"

    def _shards(self, folder: Path) -> list[Path]:
        return sorted(folder.glob("shard-*.npz")) if folder.is_dir() else []

    def lookup(self, model: str, kind: str, hashes: list[str], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for `hashes` (rows of zeros where absent) and a mask of the ones found."""
        wanted: dict[str, list[int]] = {}
        for row, text_hash in enumerate(hashes):
            wanted.setdefault(text_hash, []).append(row)
        vectors = np.zeros((len(hashes), dim), dtype=np.float32)
        found = np.zeros(len(hashes), dtype=bool)
        for shard in self._shards(self._folder(model, kind)):
            try:
                with np.load(shard, allow_pickle=False) as stored:
                    shard_hashes, shard_vectors = stored["hashes"], stored["vectors"]
                    valid = str(stored["checksum"]) == _checksum(shard_hashes, shard_vectors)
            except (OSError, ValueError, KeyError, EOFError) as error:
                valid, shard_hashes, shard_vectors = False, None, None
                log.warning("cache shard %s is unreadable (%s); discarding it", shard, error)
            if not valid or shard_vectors is None or shard_vectors.shape[1:] != (dim,):
                log.warning("cache shard %s failed its checksum; discarding it and encoding again", shard)
                shard.unlink(missing_ok=True)
                continue
            for row, text_hash in enumerate(shard_hashes.tolist()):
                for index in wanted.get(text_hash, ()):
                    if not found[index]:
                        vectors[index] = shard_vectors[row]
                        found[index] = True
        return vectors, found

    def store(self, model: str, kind: str, hashes: list[str], vectors: np.ndarray) -> None:
        if not hashes:
            return
        folder = self._folder(model, kind)
        folder.mkdir(parents=True, exist_ok=True)
        stored_hashes = np.asarray(hashes, dtype=str)
        checksum = _checksum(stored_hashes, vectors)
        with atomic_write(folder / f"shard-{checksum}.npz") as temporary, temporary.open("wb") as handle:
            np.savez(handle, hashes=stored_hashes, vectors=vectors.astype(np.float32), checksum=checksum)

    def summary(self) -> list[tuple[str, int, int, int]]:
        """(model-kind folder, shards, vectors, bytes) per folder."""
        rows = []
        folder_root = self.root / "embeddings"
        for folder in sorted(p for p in folder_root.iterdir() if p.is_dir()) if folder_root.is_dir() else []:
            shards = self._shards(folder)
            vectors = 0
            for shard in shards:
                with np.load(shard, allow_pickle=False) as stored:
                    vectors += len(stored["hashes"])
            rows.append((folder.name, len(shards), vectors, sum(s.stat().st_size for s in shards)))
        return rows

    def clear(self) -> None:
        """Remove the cached embeddings (only what this cache wrote: the `embeddings` folder)."""
        import shutil

        shutil.rmtree(self.root / "embeddings", ignore_errors=True)
