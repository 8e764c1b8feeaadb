"""The batch the datamodule makes and the module, the evaluation and the callbacks read."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class PositionBatch:
    """``B`` positions of the corpus (for RL, or held out for evaluation) and the ``D`` documents they lie in (for
    the NTP loss). Lightning moves its tensors to the device like a dict's."""

    position_documents: Tensor
    """``[B]`` corpus index of the document each position lies in."""
    positions: Tensor
    """``[B]`` index, in its document, of the token each position predicts."""
    next_token_ids: Tensor
    """``[B]`` that token's id."""
    tiers: Tensor
    """``[B]`` curriculum tier of each position (0 easy, 1 medium, 2 hard; -1 below every threshold)."""
    entropies: Tensor
    """``[B]`` the proxy model's entropy at each position, in nats."""
    contexts: list[list[int]]
    """The token ids before each position, cut on the left to ``max_context_tokens``."""
    continuations: list[list[bytes]]
    """The bytes of the next ``continuation_tokens`` tokens from each position, token by token."""
    documents: Tensor
    """``[D, T]`` token ids of the documents the positions lie in, right-padded."""
    document_attention_mask: Tensor
    """``[D, T]`` 1 for a token of ``documents``, 0 for padding."""
    ntp_mask: Tensor
    """``[D, T]`` True where NTP trains: every token but the first, the padding and the batch's positions."""
    document_indices: Tensor
    """``[D]`` corpus index of each row of ``documents``."""
    curriculum_progress: float | None = None
    """Training progress the batch was drawn at (training batches only)."""
    curriculum_probabilities: Tensor | None = None
    """``[3]`` tier mix the batch was drawn from, after empty tiers are dropped (training batches only)."""
    curriculum_epoch: int | None = None
    """Epoch of the sampler that drew the batch (training batches only)."""
    curriculum_batch: int | None = None
    """Index of the batch within that epoch (training batches only)."""
