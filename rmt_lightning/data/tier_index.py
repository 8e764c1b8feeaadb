"""The curriculum's candidate positions, tier by tier, in memory-mapped files built once from the entropy shards.

A corpus's index holds, for each tier (easy, medium, hard), the positions whose proxy entropy falls in it, as flat
token indices into the corpus's token store (``store.offsets[d] + p``: ``uint32`` while the store holds fewer than
2^32 tokens, else ``int64``) and their entropies (``float32``), in corpus order. The held-out documents (validation)
are never candidates; their entropies are kept whole, beside the tiers, for evaluation. The index is built by
streaming over the shards (memory: one shard), written into a staging folder and renamed into place, under a lock
that lets the processes starting together build it once. Opening it reads its manifest and maps its files: nothing
in proportion to the corpus.

Candidates are named by one id each, counting through the tiers in order: easy's ``0 .. n_easy - 1``, then
medium's, then hard's. The sampler draws ids from the tier sizes alone; ``lookup`` turns them into positions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..method import TIER_NAMES, assign_tiers
from ..runtime.atomic import build_lock, fsync_folder, publish_folder
from .entropy_shards import read_plan, read_shard
from .token_store import TokenStore, remove_stale_staging

INDEX_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
HELD_OUT_FILE = "held_out_entropy.bin"


def index_key(scores_key: str, thresholds: Sequence[float], held_out: dict) -> str:
    """Key of an index: the entropy shards' key (which covers the tokens, the proxy and the scoring settings), the
    tier thresholds and the rule that picks the held-out documents (JSON values)."""
    payload = {"format": INDEX_FORMAT_VERSION, "scores": scores_key,
               "thresholds": [float(t) for t in thresholds], "held_out": held_out}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def index_folder(cache_dir: str | os.PathLike, key: str) -> Path:
    """Folder of the index for ``key`` under ``cache_dir``."""
    return Path(cache_dir).expanduser() / f"index-{key[:24]}"


def position_dtype(num_tokens: int) -> np.dtype:
    """The smallest dtype of the flat token indices of a store of ``num_tokens`` tokens."""
    return np.dtype(np.uint32) if num_tokens <= np.iinfo(np.uint32).max else np.dtype(np.int64)


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    # numpy cannot map an empty file.
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)


class TierIndex:
    """A corpus's candidate positions per tier and its held-out documents' entropies, mapped read-only.

    ``store`` is the token store the positions index into (its offsets turn a flat index into a document and a
    position). Pickles as its folder and its store's, so a data-loader worker maps the files again.
    """

    def __init__(self, folder: Path, store: TokenStore):
        self.folder = Path(folder)
        self.store = store
        self.manifest = json.loads((self.folder / MANIFEST_FILE).read_text())
        dtype = np.dtype(self.manifest["position_dtype"])
        sizes = self.manifest["sizes"]
        self.positions = [_map(self.folder / f"positions-{t}.bin", dtype, n) for t, n in enumerate(sizes)]
        """Per tier: flat token indices into ``store`` of its candidates, in corpus order."""
        self.entropies = [_map(self.folder / f"entropy-{t}.bin", np.float32, n) for t, n in enumerate(sizes)]
        """Per tier: the proxy's entropy (nats) at each of its candidates."""
        self.sizes = np.asarray(sizes, dtype=np.int64)
        """Candidates per tier (easy, medium, hard)."""
        self._starts = np.concatenate([[0], np.cumsum(self.sizes)])

    @classmethod
    def open(cls, folder: str | os.PathLike, store: TokenStore, key: str | None = None) -> TierIndex | None:
        """The index in ``folder`` over ``store``, or None when there is no complete one (for ``key``, when given)."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("format") != INDEX_FORMAT_VERSION or (key is not None and manifest.get("key") != key):
            return None
        if manifest.get("store_digest") != store.manifest.get("digest"):
            return None
        sizes, dtype = manifest["sizes"], np.dtype(manifest["position_dtype"])
        files = [(f"positions-{t}.bin", n * dtype.itemsize) for t, n in enumerate(sizes)]
        files += [(f"entropy-{t}.bin", n * 4) for t, n in enumerate(sizes)] + [(HELD_OUT_FILE, manifest["held_out_tokens"] * 4)]
        if any(not (folder / name).is_file() or (folder / name).stat().st_size != size for name, size in files):
            return None
        return cls(folder, store)

    def __getstate__(self) -> dict:
        return {"folder": str(self.folder), "store": self.store}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Path(state["folder"]), state["store"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def max_entropy(self) -> float | None:
        """The highest entropy of any candidate or below-threshold position (None when every one was NaN)."""
        return self.manifest["max_entropy"]

    @property
    def held_out(self) -> list[int]:
        """The held-out documents, in increasing order."""
        return list(self.manifest["held_out"])

    def held_out_entropies(self) -> dict[int, Tensor]:
        """Each held-out document's entropies (``H[0]`` NaN), by document."""
        flat = torch.from_numpy(np.fromfile(self.folder / HELD_OUT_FILE, dtype=np.float32))
        lengths = [int(self.store.offsets[d + 1] - self.store.offsets[d]) for d in self.held_out]
        return dict(zip(self.held_out, flat.split(lengths)))

    def lookup(self, ids: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(document, position, tier, entropy)`` of each candidate id, as ``[len(ids)]`` tensors."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"candidate ids must be in [0, {len(self)}), got {ids.min()} .. {ids.max()}")
        tiers = np.searchsorted(self._starts, ids, side="right") - 1
        within = ids - self._starts[tiers]
        flat = np.array([self.positions[t][w] for t, w in zip(tiers, within)], dtype=np.int64)
        entropy = np.array([self.entropies[t][w] for t, w in zip(tiers, within)], dtype=np.float32)
        documents = np.searchsorted(self.store.offsets, flat, side="right") - 1
        positions = flat - self.store.offsets[documents]
        return (torch.from_numpy(documents.astype(np.int64)), torch.from_numpy(positions.astype(np.int64)),
                torch.from_numpy(tiers.astype(np.int64)), torch.from_numpy(entropy))

    def tier_positions(self, tier: int) -> tuple[np.ndarray, np.ndarray]:
        """``(documents, positions)`` of every candidate of ``tier``, in corpus order (reads the tier whole)."""
        flat = np.asarray(self.positions[tier], dtype=np.int64)
        documents = np.searchsorted(self.store.offsets, flat, side="right") - 1
        return documents, flat - self.store.offsets[documents]


def _write_index(staging: Path, store: TokenStore, shard_folder: Path, scores_key: str, thresholds: Sequence[float],
                 held_out: Sequence[int], key: str) -> None:
    plan = read_plan(shard_folder, scores_key)
    lengths = store.lengths
    dtype = position_dtype(store.num_tokens)
    held = np.asarray(sorted(set(int(d) for d in held_out)), dtype=np.int64)
    sizes, held_out_tokens, highest = [0] * len(TIER_NAMES), 0, None
    positions = [open(staging / f"positions-{t}.bin", "wb") for t in range(len(TIER_NAMES))]
    entropies = [open(staging / f"entropy-{t}.bin", "wb") for t in range(len(TIER_NAMES))]
    with open(staging / HELD_OUT_FILE, "wb") as held_file:
        try:
            for shard, (first, end) in enumerate(plan):
                entropy = read_shard(shard_folder, shard, (first, end), scores_key, lengths)
                if entropy is None:
                    raise FileNotFoundError(f"entropy shard {shard} of '{shard_folder}' is missing or damaged")
                base = int(store.offsets[first])
                tiers = assign_tiers(entropy, thresholds)
                for d in held[(held >= first) & (held < end)].tolist():
                    lo, hi = int(store.offsets[d]) - base, int(store.offsets[d + 1]) - base
                    held_file.write(entropy[lo:hi].numpy().tobytes())
                    held_out_tokens += hi - lo
                    tiers[lo:hi] = -1
                finite = entropy[~torch.isnan(entropy)]
                if len(finite):
                    highest = max(highest if highest is not None else float("-inf"), float(finite.max()))
                for t in range(len(TIER_NAMES)):
                    members = torch.nonzero(tiers == t).flatten()
                    positions[t].write((members.numpy() + base).astype(dtype).tobytes())
                    entropies[t].write(entropy[members].numpy().tobytes())
                    sizes[t] += len(members)
        finally:
            for handle in positions + entropies:
                handle.close()
    manifest = {
        "format": INDEX_FORMAT_VERSION, "key": key, "scores_key": scores_key, "store_digest": store.manifest.get("digest"),
        "thresholds": [float(t) for t in thresholds], "position_dtype": dtype.name, "sizes": sizes,
        "held_out": held.tolist(), "held_out_tokens": held_out_tokens, "max_entropy": highest,
    }
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    # Written last: a folder without it is not an index.
    with open(staging / MANIFEST_FILE, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_folder(staging)


def open_or_build_index(cache_dir: str | os.PathLike, key: str, store: TokenStore, *, shard_folder: str | os.PathLike,
                        scores_key: str, thresholds: Sequence[float], held_out: Callable[[], Sequence[int]]) -> TierIndex:
    """The index for ``key`` under ``cache_dir``: opened when complete, else built from the finished entropy shards
    in ``shard_folder`` (every shard must be there) and published atomically. ``held_out()`` gives the held-out
    documents; it is called only when building (the rule that chose them is part of ``key``)."""
    folder = index_folder(cache_dir, key)
    index = TierIndex.open(folder, store, key)
    if index is not None:
        return index
    with build_lock(folder):
        index = TierIndex.open(folder, store, key)  # built by another process while this one waited
        if index is not None:
            return index
        remove_stale_staging(folder)
        publish_folder(folder, lambda staging: _write_index(staging, store, Path(shard_folder), scores_key, thresholds, held_out(), key))
    return TierIndex.open(folder, store, key)
