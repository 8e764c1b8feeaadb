"""Score every position of every document with the proxy model's next-token entropy.

One forward per document window gives all its positions. Logits are produced from the final hidden
states in row chunks, so the ``[tokens, vocab]`` logits never exist in full. The scores are kept on disk
in shards (``entropy_shards``), under a key of everything that determines them (``fingerprint_tokens``:
tokens, proxy weights, window settings, top-k, precision).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..engine.padding import pad_right
from ..method import token_entropy

CACHE_FORMAT_VERSION = 2


def window_plan(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_owned_target)`` per window of a document of ``length`` tokens.

    Window ``[start, end)`` predicts targets ``start+1 .. end-1``; each target is owned by exactly one
    window, the one where it has at least ``window - stride`` tokens of context (all of them in the first).
    """
    if not 0 < stride <= window - 1:
        raise ValueError(f"scoring stride {stride} must be in [1, window - 1] with window {window}")
    plan = [(0, min(window, length), 1)]
    start = 0
    while start + window < length:
        start += stride
        plan.append((start, min(start + window, length), start + window - stride))
    return plan


def _decoder_and_head(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    return decoder, head


def window_batches(documents: Sequence[Sequence[int]], window: int, stride: int, batch_size: int, pad_token_id: int):
    """The scoring windows of ``documents`` (``window_plan``), shortest first, in batches.

    Yields ``(jobs, ids, mask)``: ``jobs`` the batch's ``(document, start, end, owned_from)`` and ``ids``/``mask``
    its windows right-padded to ``[len(jobs), longest window]``.
    """
    jobs = [(d, *span) for d, doc in enumerate(documents) for span in window_plan(len(doc), window, stride)]
    # Similar lengths in one batch keep padding small.
    jobs.sort(key=lambda job: job[2] - job[1])
    for begin in range(0, len(jobs), batch_size):
        batch = jobs[begin : begin + batch_size]
        ids, mask = pad_right([documents[d][start:end] for d, start, end, _ in batch], pad_token_id)
        yield batch, ids, mask


@torch.no_grad()
def score_entropy(
    model,
    documents: Sequence[Sequence[int]],
    window: int = 512,
    stride: int = 256,
    top_k: int | None = None,
    batch_size: int = 8,
    chunk_rows: int = 512,
    pad_token_id: int = 0,
) -> list[Tensor]:
    """Entropy (nats) of the proxy's prediction at every position: ``H[d][p]`` for token ``p`` given ``< p``.

    ``H[d][0]`` is NaN: the first token of a document has no context and is never a candidate.
    """
    device = next(model.parameters()).device
    scores = [torch.full((len(doc),), float("nan")) for doc in documents]
    decoder, head = _decoder_and_head(model)
    was_training = model.training
    model.eval()
    try:
        for batch, ids, mask in window_batches(documents, window, stride, batch_size, pad_token_id):
            width = ids.shape[1]
            ids, mask = ids.to(device), mask.to(device)
            if decoder is not None and head is not None:
                hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                entropy = torch.cat(
                    [token_entropy(head(chunk), top_k=top_k) for chunk in hidden.reshape(-1, hidden.shape[-1]).split(chunk_rows)]
                ).view(len(batch), width)
            else:
                entropy = token_entropy(model(input_ids=ids, attention_mask=mask).logits, top_k=top_k)
            entropy = entropy.float().cpu()
            for row, (d, start, end, owned_from) in enumerate(batch):
                # Logit i predicts token start + i + 1.
                targets = torch.arange(owned_from, end)
                scores[d][targets] = entropy[row, targets - start - 1]
    finally:
        model.train(was_training)
    return scores


def fingerprint_tokens(tokens_digest: str, proxy_identity: str, settings: dict) -> str:
    """Cache key from a digest of the documents' tokens (a token store's ``digest``, computed when it was built:
    a warm start reads no token to find its cache), the proxy's identity and the scoring settings."""
    payload = {"tokens": tokens_digest, "proxy": proxy_identity, "version": CACHE_FORMAT_VERSION, **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def proxy_identity(name_or_path: str, config_json: str) -> str:
    """What identifies a proxy's weights: its name, config, and (for local folders) its weight files' sizes and times."""
    parts = [name_or_path, hashlib.sha256(config_json.encode()).hexdigest()]
    folder = Path(name_or_path)
    if folder.is_dir():
        for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            stat = weights.stat()
            parts.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)
