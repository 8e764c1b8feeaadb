"""Pack token-id lists (or arrays) of different lengths into ``[N, L]`` tensors with their attention masks."""

from __future__ import annotations

import torch
from torch import Tensor


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids ``[N, L]`` and their attention mask, so every sequence ends at the last column."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = _as_ids(seq)
            mask[row, width - len(seq):] = 1
    return ids, mask


def pad_right(sequences: list[list[int]], pad_id: int, min_width: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded ids ``[N, L]`` (L at least ``min_width``) and their attention mask, every sequence at column 0."""
    width = max([min_width] + [len(seq) for seq in sequences])
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, : len(seq)] = _as_ids(seq)
            mask[row, : len(seq)] = 1
    return ids, mask


def _as_ids(seq) -> Tensor:
    # A token store's documents are read-only views of a memory map, which torch would wrap without copying (and
    # warn about); they are copied as int64 here, as lists always were.
    return torch.from_numpy(seq.astype("int64")) if hasattr(seq, "astype") else torch.as_tensor(seq, dtype=torch.long)
