"""Entropy scoring cut into shards of whole documents, shared by every process and resumable after a kill.

The corpus is cut into shards of consecutive documents of about ``shard_tokens`` tokens (``plan_shards``); the
plan depends on the document lengths and ``shard_tokens`` only, so every process, whatever their number, sees
the same shards. Process ``rank`` of ``world_size`` scores the shards ``i`` with ``i % world_size == rank``
(``score_shards``), each with ``scoring.score_entropy`` over that shard's documents alone, so a shard's scores
are the same bits whoever scores it and whenever. Each finished shard is one file, ``shard-{i:06d}.safetensors``,
written under a staging name and renamed into place: the rename is the done-marker. The file carries the
folder's key, its index, its document range and a SHA-256 of its data, so a file cut short or damaged on disk is
treated as missing and scored again, never used.

The folder holds ``manifest.json`` (key and plan). A folder whose manifest carries another key or plan is
refused with ``ShardFolderError`` rather than rebuilt: deleting shards in a folder that another run may be
writing at the same moment could destroy that run's work, and a caller that names the folder after the key
never meets the case.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..runtime.atomic import staged_file
from .scoring import score_entropy

SHARD_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ShardFolderError(ValueError):
    """The shard folder was made for another key (proxy, settings or corpus) or another shard plan."""


def plan_shards(lengths: Sequence[int], shard_tokens: int) -> list[tuple[int, int]]:
    """Cut documents of ``lengths`` tokens into shards ``[first, end)`` of consecutive whole documents.

    Each shard takes documents while its total stays within ``shard_tokens``; a document longer than that is a
    shard by itself. The plan is a function of ``lengths`` and ``shard_tokens`` only (never of the number of
    processes), so every process of every run cuts the corpus the same way.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens!r}")
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if (sizes < 0).any():
        raise ValueError("document lengths must be >= 0")
    # cumulative[j] = tokens of documents [0, j): one binary search per shard instead of a Python step per document.
    cumulative = np.concatenate([[0], np.cumsum(sizes)])
    plan, first, count = [], 0, len(sizes)
    while first < count:
        end = int(np.searchsorted(cumulative, cumulative[first] + shard_tokens, side="right")) - 1
        end = min(max(end, first + 1), count)
        plan.append((first, end))
        first = end
    return plan


def entropy_folder(cache_dir: str | os.PathLike, key: str) -> Path:
    """The shard folder of the scores for ``key`` under ``cache_dir``."""
    return Path(cache_dir).expanduser() / f"entropy-{key[:24]}"


def shard_path(folder: str | os.PathLike, index: int) -> Path:
    """The file of shard ``index`` in ``folder``."""
    return Path(folder) / f"shard-{index:06d}.safetensors"


def _manifest(key: str, plan: Sequence[tuple[int, int]], lengths: np.ndarray) -> dict:
    return {
        "format": SHARD_FORMAT_VERSION,
        "key": key,
        "documents": len(lengths),
        "tokens": int(lengths.sum()),
        "plan": [[int(first), int(end)] for first, end in plan],
    }


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ShardFolderError(f"entropy shard folder '{folder}': {MANIFEST_NAME} is unreadable ({type(error).__name__})") from error


def _check_manifest(folder: Path, manifest: dict, key: str, plan: Sequence[tuple[int, int]] | None) -> None:
    if manifest.get("format") != SHARD_FORMAT_VERSION or manifest.get("key") != key:
        raise ShardFolderError(
            f"entropy shard folder '{folder}' was made for another proxy, settings or corpus (key "
            f"{str(manifest.get('key'))[:16]}..., expected {key[:16]}...): refused; use a folder named after the key"
        )
    if plan is not None and [tuple(span) for span in manifest.get("plan", [])] != [tuple(span) for span in plan]:
        raise ShardFolderError(
            f"entropy shard folder '{folder}' was cut into other shards (another shard_tokens): refused; "
            "use the same shard_tokens or another folder"
        )


def _unique_suffix() -> str:
    # Processes on different nodes share the folder on a network filesystem and may share a pid.
    return f"{socket.gethostname()}-{os.getpid()}"


def ensure_manifest(folder: Path, key: str, plan: Sequence[tuple[int, int]], lengths: np.ndarray) -> None:
    existing = _read_manifest(folder)
    if existing is not None:
        _check_manifest(folder, existing, key, plan)
        return
    path = folder / MANIFEST_NAME
    # Every process may get here at once; each writes the same content under its own staging name, and the
    # renames are atomic, so a reader sees one whole manifest whichever lands last.
    with staged_file(path, f".{MANIFEST_NAME}.partial-{_unique_suffix()}") as staging:
        staging.write_text(json.dumps(_manifest(key, plan, lengths), indent=1))
    _check_manifest(folder, _read_manifest(folder), key, plan)


def _digest(flat: Tensor, lengths: Tensor) -> str:
    digest = hashlib.sha256(flat.contiguous().numpy().tobytes())
    digest.update(lengths.contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_shard(folder: Path, index: int, span: tuple[int, int], key: str, scores: list[Tensor]) -> None:
    from safetensors.torch import save_file

    lengths = torch.tensor([len(s) for s in scores], dtype=torch.int64)
    flat = (torch.cat(scores) if scores else torch.zeros(0)).float().contiguous()
    metadata = {
        "format": str(SHARD_FORMAT_VERSION), "key": key, "shard": str(index),
        "first": str(span[0]), "end": str(span[1]), "sha256": _digest(flat, lengths),
    }
    path = shard_path(folder, index)
    with staged_file(path, f".{path.name}.partial-{_unique_suffix()}") as staging:
        save_file({"entropy": flat, "lengths": lengths}, str(staging), metadata=metadata)


def read_shard(folder: Path, index: int, span: tuple[int, int], key: str, lengths: np.ndarray | None) -> Tensor | None:
    """Shard ``index``'s flat entropies when its file is there and whole and made for ``key``, ``span`` and (when
    given) ``lengths`` of the whole corpus; else None, with a warning when a file was there but could not be used."""
    from safetensors import safe_open

    path = shard_path(folder, index)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            flat, stored = handle.get_tensor("entropy"), handle.get_tensor("lengths")
    except Exception as error:  # a cut-short file fails in the header or in the data
        return _rejected(path, f"unreadable ({type(error).__name__})")
    expected = {"format": str(SHARD_FORMAT_VERSION), "key": key, "shard": str(index), "first": str(span[0]), "end": str(span[1])}
    if any(metadata.get(name) != value for name, value in expected.items()):
        return _rejected(path, "made for another key, plan or shard")
    if metadata.get("sha256") != _digest(flat, stored):
        return _rejected(path, "incomplete or corrupted (its data does not match its SHA-256)")
    fits = len(stored) == span[1] - span[0] and (lengths is None or np.array_equal(stored.numpy(), lengths[span[0] : span[1]]))
    if not fits or int(stored.sum()) != flat.numel():
        return _rejected(path, "not the shape of its documents")
    return flat


def read_plan(folder: str | os.PathLike, key: str) -> list[tuple[int, int]]:
    """The shard plan recorded in ``folder``'s manifest; ``ShardFolderError`` when there is none or it was made
    for another key."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise ShardFolderError(f"entropy shard folder '{folder}' has no {MANIFEST_NAME}")
    _check_manifest(folder, manifest, key, None)
    return [(int(first), int(end)) for first, end in manifest.get("plan", [])]


def _rejected(path: Path, reason: str) -> None:
    warnings.warn(f"entropy shard '{path}' is {reason}: ignored, the shard is scored again", stacklevel=3)


def _lengths(documents: Sequence) -> np.ndarray:
    return np.fromiter((len(documents[i]) for i in range(len(documents))), dtype=np.int64, count=len(documents))


def missing_shards(folder: str | os.PathLike, key: str, plan: Sequence[tuple[int, int]], lengths: Sequence[int] | None = None) -> list[int]:
    """Indices of the shards of ``plan`` that ``folder`` does not hold whole for ``key``.

    A shard counts as done only when its file is there, reads, carries ``key`` and its place in the plan, and its
    data matches its SHA-256 (a file cut short or damaged counts as missing); with ``lengths`` (every document's
    token count) its document lengths are checked against them too. Raises ``ShardFolderError`` when the folder's
    manifest carries another key or plan. Reads every shard file that is there: the cost is reading the scores.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        return list(range(len(plan)))
    _check_manifest(folder, manifest, key, plan)
    sizes = None if lengths is None else np.asarray(lengths, dtype=np.int64)
    return [index for index, span in enumerate(plan) if read_shard(folder, index, span, key, sizes) is None]


@dataclass(frozen=True)
class ShardScoring:
    """How a scoring pass runs: the proxy's windows and batches (``score_entropy``), the shards' size, and which
    shards this process takes."""

    window: int
    stride: int
    top_k: int | None
    batch_size: int
    pad_token_id: int
    shard_tokens: int
    """Tokens per shard (``plan_shards``)."""
    rank: int = 0
    world_size: int = 1


def score_shards(proxy: torch.nn.Module | Callable[[], torch.nn.Module], documents: Sequence,
                 folder: str | os.PathLike, key: str, scoring: ShardScoring, *, stop: Callable[[], bool] | None = None,
                 progress: Callable[[int], None] | None = None, lengths: Sequence[int] | None = None) -> int:
    """Score this process's share of the shards that ``folder`` does not hold yet; returns how many it scored.

    ``proxy`` is the scoring model, or a function without arguments that loads it (called only when this process
    has a shard to score, so a process whose shards are all done loads nothing). ``documents[i]`` is document
    ``i``'s token ids (a list or 1-D array). Process ``rank`` of ``world_size`` (``scoring``'s) takes the shards ``i``
    with ``i % world_size == rank`` of ``plan_shards(lengths, shard_tokens)`` and scores each with ``score_entropy``
    over that shard's documents, then writes it atomically. ``folder`` gets a manifest with ``key`` and the plan
    on first use; a folder made for another key or plan raises ``ShardFolderError`` before any work.

    The pass runs in rounds, one shard per process each, and every process runs the same number of rounds
    (``ceil(shards / world_size)``) whatever it has left to do: ``stop()`` is asked at the start of each round
    on every process, so it may be a collective (the processes agreeing to stop together); when it returns True
    the pass ends, keeping every finished shard. ``progress(tokens)`` is called once with the tokens of this
    process's shards that an earlier pass finished, then after each shard scored here.
    ``lengths``, every document's token count when the caller has them (a token store's offsets), saves asking
    each document for its length.

    A shard is written by a background thread while the next one is scored, so on a GPU the write does not
    stall the proxy; at most one write is pending, all are finished before returning, and a failed write is
    raised here.
    """
    rank, world_size = scoring.rank, scoring.world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size {world_size})")
    folder = Path(folder)
    lengths = _lengths(documents) if lengths is None else np.asarray(lengths, dtype=np.int64).reshape(-1)
    if len(lengths) != len(documents):
        raise ValueError(f"{len(lengths)} lengths for {len(documents)} documents")
    plan = plan_shards(lengths, scoring.shard_tokens)
    ensure_manifest(folder, key, plan, lengths)
    todo = {i for i in range(rank, len(plan), world_size) if read_shard(folder, i, plan[i], key, lengths) is None}
    if progress is not None:
        progress(sum(int(lengths[plan[i][0] : plan[i][1]].sum()) for i in range(rank, len(plan), world_size) if i not in todo))
    model = proxy if isinstance(proxy, torch.nn.Module) or not callable(proxy) else None
    scored = 0
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="entropy-shard-writer") as writer:
        try:
            for round_ in range(-(-len(plan) // world_size)):
                if stop is not None and stop():
                    break
                index = round_ * world_size + rank
                if index not in todo:
                    continue
                if model is None:
                    model = proxy()
                first, end = plan[index]
                shard_documents = [documents[d] for d in range(first, end)]
                scores = score_entropy(model, shard_documents, window=scoring.window, stride=scoring.stride,
                                       top_k=scoring.top_k, batch_size=scoring.batch_size,
                                       pad_token_id=scoring.pad_token_id)
                if pending is not None:
                    pending.result()
                pending = writer.submit(write_shard, folder, index, (first, end), key, scores)
                scored += 1
                if progress is not None:
                    progress(int(lengths[first:end].sum()))
        finally:
            # A shard already scored is kept even when the pass stops or fails; a failed write is raised here.
            if pending is not None:
                pending.result()
    return scored


def write_shards(folder: str | os.PathLike, key: str, lengths: Sequence[int], shard_tokens: int,
                 entropies: Callable[[int, int], Tensor]) -> int:
    """Write every shard of ``plan_shards(lengths, shard_tokens)`` from scores computed elsewhere (or made up for a
    benchmark): ``entropies(start, end)`` gives the flat float32 entropies of the corpus's tokens ``[start, end)``.
    Returns the number of shards written."""
    folder = Path(folder)
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    plan = plan_shards(sizes, shard_tokens)
    ensure_manifest(folder, key, plan, sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for index, (first, end) in enumerate(plan):
        flat = entropies(int(offsets[first]), int(offsets[end])).float()
        write_shard(folder, index, (first, end), key, list(flat.split(sizes[first:end].tolist())))
    return len(plan)


def load_shards_flat(folder: str | os.PathLike, key: str, lengths: Sequence[int]) -> tuple[Tensor, Tensor] | None:
    """Every document's entropies as one flat float32 tensor and int64 offsets (``len(lengths) + 1``), document
    ``d`` at ``flat[offsets[d]:offsets[d+1]]``; None when any shard is missing or not whole (or no manifest).

    The shards are read one at a time into the flat tensor, so memory is the result plus one shard. Raises
    ``ShardFolderError`` when the folder was made for another key, or its plan does not cover ``lengths``.
    """
    folder = Path(folder)
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    manifest = _read_manifest(folder)
    if manifest is None:
        return None
    _check_manifest(folder, manifest, key, None)
    plan = [(int(first), int(end)) for first, end in manifest.get("plan", [])]
    covers = all(a[1] == b[0] for a, b in pairwise(plan)) and (plan[0][0] == 0 and plan[-1][1] == len(sizes) if plan else len(sizes) == 0)
    if not covers:
        raise ShardFolderError(f"entropy shard folder '{folder}': its plan does not cover the {len(sizes)} documents")
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.from_numpy(np.cumsum(sizes))
    flat = torch.empty(int(offsets[-1]), dtype=torch.float32)
    for index, span in enumerate(plan):
        shard = read_shard(folder, index, span, key, sizes)
        if shard is None:
            return None
        flat[int(offsets[span[0]]) : int(offsets[span[1]])] = shard
    return flat, offsets


def load_shards(folder: str | os.PathLike, key: str, lengths: Sequence[int]) -> list[Tensor] | None:
    """Every document's entropies, in order (``H[d][0]`` NaN, as ``score_entropy``), as views of one flat
    tensor; None when any shard is missing or not whole. See ``load_shards_flat``."""
    loaded = load_shards_flat(folder, key, lengths)
    if loaded is None:
        return None
    flat, offsets = loaded
    return list(flat.split(torch.diff(offsets).tolist()))
