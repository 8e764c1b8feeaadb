"""Score every position of every document with the proxy model's next-token entropy, cached on disk.

One forward per document window gives all its positions. Logits are produced from the final hidden
states in row chunks, so the ``[tokens, vocab]`` logits never exist in full. The cache file is keyed by
everything that determines the scores (tokens, proxy weights, window settings, top-k) and is written
under a temporary name then renamed, so an interrupted run never leaves a file that looks complete. Its
header carries the key and a SHA-256 of its data: a file whose data does not hash to it (cut short,
damaged on disk) is reported, ignored and scored again, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..method import token_entropy
from ..atomic import staged_file
from ..padding import pad_right

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


def cache_path(cache_dir: Path, key: str) -> Path:
    """File holding the scores for ``key``."""
    return Path(cache_dir) / f"entropy-{key[:24]}.safetensors"


def _data_digest(flat: Tensor, lengths: Tensor) -> str:
    digest = hashlib.sha256(flat.contiguous().numpy().tobytes())
    digest.update(lengths.contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_scores(path: Path, key: str, scores: Sequence[Tensor]) -> None:
    """Write flat scores and offsets atomically (temporary file, fsync, rename), tagged with ``key`` and the
    SHA-256 of the data."""
    from safetensors.torch import save_file

    lengths = torch.tensor([len(s) for s in scores], dtype=torch.int64)
    flat = (torch.cat(list(scores)) if scores else torch.zeros(0)).float().contiguous()
    with staged_file(path, f"{path.name}.tmp-{os.getpid()}") as staging:
        save_file({"entropy": flat, "lengths": lengths}, str(staging), metadata={"key": key, "sha256": _data_digest(flat, lengths)})


def load_scores(path: Path, key: str, expected_lengths: Sequence[int]) -> list[Tensor] | None:
    """Scores from ``path`` when it exists, is complete (its data matches its SHA-256), carries ``key`` and fits
    the documents; else None, with a warning when a file was there but could not be used."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            # Copies: the tensors may map the file, which another run could rewrite in place.
            flat, lengths = handle.get_tensor("entropy").clone(), handle.get_tensor("lengths").clone()
    except Exception as error:
        return _rejected(path, f"unreadable ({type(error).__name__})")
    if metadata.get("key") != key:
        return _rejected(path, "made for other documents, proxy or settings")
    if metadata.get("sha256") != _data_digest(flat, lengths):
        return _rejected(path, "incomplete or corrupted (its data does not match its SHA-256)")
    if lengths.tolist() != list(expected_lengths) or int(lengths.sum()) != flat.numel():
        return _rejected(path, "not the shape of the documents")
    return list(flat.split(lengths.tolist()))


def _rejected(path: Path, reason: str) -> None:
    warnings.warn(f"entropy cache '{path}' is {reason}: ignored, the corpus is scored again and the file replaced", stacklevel=3)
    return None
