"""Randomly initialised cross-encoders over the bundled tokenizer, for tests and benchmarks.

No cross-encoder with weights ships on PyPI; these have no useful judgement, but they exercise the real
loading and scoring code with a real model of a chosen size, offline.
"""

from __future__ import annotations

from pathlib import Path


def random_cross_encoder(folder: Path, tokenizer_path: Path | str, *, layers: int = 2, hidden: int = 32) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        intermediate_size=hidden * 4 if hidden >= 128 else hidden * 2,
        max_position_embeddings=512,
        num_labels=1,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def minilm_cross_encoder(folder: Path, bundled_path: Path | str) -> Path:
    """all-MiniLM-L6-v2's own encoder under a randomly initialised one-score head: a MiniLM-sized cross-encoder
    whose scores follow what the texts say (through the pretrained encoder), spread as a real reranker's are,
    where a random encoder's scores are all but equal."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as transformers_logging

    torch.manual_seed(0)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the head is missing from the checkpoint on purpose
    try:
        model = BertForSequenceClassification.from_pretrained(str(bundled_path), num_labels=1)
    finally:
        transformers_logging.set_verbosity(verbosity)
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(bundled_path)).save_pretrained(str(folder))
    return folder
