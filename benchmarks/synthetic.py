"""Corpora of any size made up fast, for the scale benchmark and the memory test: text of random words (to measure
tokenizing and scoring), or a token store and its entropy shards written straight in their formats (to measure the
index and the training side at sizes no CPU can tokenize or score in a benchmark's time)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rmt_lightning.data.entropy_shards import entropy_folder, write_shards
from rmt_lightning.data.token_store import TokenStore, write_token_store

BATCH_TOKENS = 1 << 22


def random_text_corpus(path: Path, tokens: int, tokenizer, seed: int = 0, document_words: int = 300) -> Path:
    """A jsonl corpus (``text`` field) of about ``tokens`` tokens of ``tokenizer``: documents of random words from a
    fixed list of 5,000 made-up words, in a seeded order."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(5000)])

    def document() -> str:
        return " ".join(words[rng.integers(0, len(words), size=document_words)])

    sample = [document() for _ in range(20)]
    per_document = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in sample) / len(sample)
    count = max(1, round(tokens / per_document))
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"text": sample[i] if i < len(sample) else document()}) + "\n")
    return path


def synthetic_store(folder: Path, tokenizer, tokens: int, document_tokens: int = 512, seed: int = 0) -> TokenStore:
    """A token store of ``tokens`` random ids (documents of ``document_tokens``), written without tokenizing."""
    vocabulary = len(tokenizer)
    rng = np.random.default_rng(seed)
    per_batch = max(1, BATCH_TOKENS // document_tokens)

    def batches():
        left = tokens // document_tokens
        while left > 0:
            count = min(per_batch, left)
            left -= count
            yield rng.integers(3, vocabulary, size=count * document_tokens), np.full(count, document_tokens, dtype=np.int64)

    return write_token_store(batches(), tokenizer, folder, description=f"synthetic:{tokens}:{seed}",
                             max_document_tokens=document_tokens)


def synthetic_entropy(datamodule, store: TokenStore, seed: int = 0, high: float = 3.0) -> Path:
    """Entropy shards for ``store`` under ``datamodule``'s cache and key, as if its proxy had scored it: uniform in
    ``[0, high)`` nats (NaN at each document's first token), seeded per shard. Returns the shard folder."""
    key = datamodule.scores_key(store)
    folder = entropy_folder(datamodule.cache_folder, key)
    offsets = np.asarray(store.offsets)

    def entropies(start: int, end: int) -> torch.Tensor:
        values = np.random.default_rng([seed, start]).uniform(0.0, high, size=end - start).astype(np.float32)
        first = np.searchsorted(offsets, start)
        starts = offsets[first : np.searchsorted(offsets, end)]
        values[starts - start] = np.nan
        return torch.from_numpy(values)

    write_shards(folder, key, np.diff(offsets), datamodule.hparams.scoring_shard_tokens, entropies)
    return folder
