"""From scored positions to batches: the table of candidate positions, the batch type the module, the evaluation
and the callbacks read, and the dataset and sampler wrapper that make one batch per draw of the curriculum."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..engine.padding import pad_right
from ..engine.tokens import TokenBytes
from ..method import TIER_NAMES, assign_tiers
from .sampler import CurriculumBatchSampler
from .tier_index import TierIndex


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
    drawn_at_step: int | None = None
    """The run's step (counted from 0) that drew these positions: this batch's own step, or, for a step that
    trains again on an earlier step's rollout, that step's (training batches only). It names the rollout."""
    rollout_update: int | None = None
    """How many steps after ``drawn_at_step`` this batch's step is: 0 collects the rollout, 1 and on reuse it
    (training batches only)."""

    @property
    def size(self) -> int:
        """How many positions the batch holds."""
        return len(self.contexts)


@dataclass(frozen=True)
class Candidates:
    """Flat table of scored positions: document index, position, entropy and tier (-1: not an RL candidate)."""

    doc: Tensor
    pos: Tensor
    entropy: Tensor
    tier: Tensor

    @classmethod
    def from_scores(cls, scores, doc_indices: list[int], thresholds) -> "Candidates":
        """The positions of ``doc_indices``, whose entropies are ``scores[d]`` (a list or a dict by document)."""
        docs, positions, entropies = [], [], []
        for d in doc_indices:
            entropy = scores[d]
            docs.append(torch.full((len(entropy),), d, dtype=torch.long))
            positions.append(torch.arange(len(entropy)))
            entropies.append(entropy)
        entropy = torch.cat(entropies) if entropies else torch.zeros(0)
        return cls(
            doc=torch.cat(docs) if docs else torch.zeros(0, dtype=torch.long),
            pos=torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long),
            entropy=entropy,
            tier=assign_tiers(entropy, thresholds),
        )

    def tier_members(self) -> list[Tensor]:
        """Candidate indices of each tier (easy, medium, hard)."""
        return [torch.nonzero(self.tier == t).flatten() for t in range(len(TIER_NAMES))]

    def __len__(self) -> int:
        return len(self.doc)

    def lookup(self, ids) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(document, position, tier, entropy)`` of each candidate index in ``ids`` (as ``TierIndex.lookup``)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        return self.doc[ids], self.pos[ids], self.tier[ids], self.entropy[ids]


class DrawsWithProgress(Sampler):
    """Pairs each sampled batch with where it was drawn: progress, tier probabilities, epoch and batch index, and
    the step whose draw it is (a repeat of an earlier step's draw names that step, see ``DrawRepeats``).

    The values travel inside the batch because Lightning fetches one batch ahead: the sampler's
    attributes already describe the next batch when the module sees this one.
    """

    def __init__(self, sampler: CurriculumBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        for ids in self.sampler:
            sampler = self.sampler
            yield list(ids), {
                "curriculum_progress": float(sampler.last_progress),
                "curriculum_probabilities": torch.tensor(sampler.last_probabilities, dtype=torch.float32),
                "curriculum_epoch": sampler.epoch,
                "curriculum_batch": sampler.state_dict()["batches_yielded"] - 1,
                "drawn_at_step": sampler.last_drawn_at,
                "rollout_update": sampler.last_update,
            }

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def _ids(tokens) -> list[int]:
    """Token ids as a list of ints, from a list or an array mapped from a token store."""
    return tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)


class PositionBatches(Dataset):
    """Turns a list of candidate ids into one batch: contexts and continuations for RL, documents for NTP. The
    candidates are a ``TierIndex`` (training: mapped from disk) or a ``Candidates`` table (held-out positions)."""

    def __init__(self, documents, candidates: Candidates | TierIndex, token_bytes: TokenBytes, pad_token_id: int, max_context_tokens: int, continuation_tokens: int):
        self.documents = documents
        self.candidates = candidates
        self.token_bytes = token_bytes
        self.pad_token_id = pad_token_id
        self.max_context_tokens = max_context_tokens
        self.continuation_tokens = continuation_tokens

    def __getitem__(self, draw) -> PositionBatch:
        ids, where = draw if isinstance(draw, tuple) else (draw, {})
        doc, pos, tiers, entropies = self.candidates.lookup(ids)
        contexts, continuations = [], []
        for d, p in zip(doc.tolist(), pos.tolist()):
            tokens = self.documents[d]
            contexts.append(_ids(tokens[max(0, p - self.max_context_tokens) : p]))
            continuations.append(self.token_bytes.many(_ids(tokens[p : p + self.continuation_tokens])))
        unique_docs = sorted(set(doc.tolist()))
        documents, attention = pad_right([self.documents[d] for d in unique_docs], self.pad_token_id)
        ntp_mask = attention.bool()
        ntp_mask[:, 0] = False  # token 0 has no context to be predicted from
        row_of = {d: row for row, d in enumerate(unique_docs)}
        for d, p in zip(doc.tolist(), pos.tolist()):
            ntp_mask[row_of[d], p] = False  # RL positions are trained by RL only
        return PositionBatch(
            position_documents=doc,
            positions=pos,
            next_token_ids=torch.tensor([int(self.documents[d][p]) for d, p in zip(doc.tolist(), pos.tolist())], dtype=torch.long),
            tiers=tiers,
            entropies=entropies,
            contexts=contexts,
            continuations=continuations,
            documents=documents,
            document_attention_mask=attention,
            ntp_mask=ntp_mask,
            document_indices=torch.tensor(unique_docs, dtype=torch.long),
            **where,
        )

    def __len__(self) -> int:
        return len(self.candidates)
