"""The losses of a training step, each backpropagated micro-batch by micro-batch as it is computed (so only one
micro-batch's activations are alive at a time): GRPO on a trajectory's sampled tokens, next-token prediction on
the documents, and the format warm-up's demonstrations.

``backward`` is Lightning's ``manual_backward``. ``trainer`` tells how many processes run: under DDP and FSDP every
rank must run as many forward/backward passes as the others (each is a collective), so a rank with nothing to
add runs its passes at weight 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..engine.forward import CompletionBatch, ForwardOptions, completion_logprobs, head_positions
from ..method import grpo_token_loss_terms, token_logprobs
from ..runtime.distributed import agreement, is_sharded, max_over_ranks, world_size


@dataclass(frozen=True)
class GRPOSettings:
    """How the GRPO loss is computed (``method.grpo_token_loss_terms``) and how its passes run."""

    clip_eps: float
    """PPO clip range of the ratio ``pi / pi_old``."""
    beta: float
    """Weight of the k3 KL penalty to the reference."""
    micro_batch_size: int
    """Completions per forward/backward (whole groups, at least one)."""
    forward: ForwardOptions = ForwardOptions()
    """How the log-prob forward runs (``forward.ForwardOptions``)."""


@dataclass(frozen=True)
class RLBatch:
    """What the GRPO loss reads of (part of) a trajectory, on the device the losses run on."""

    completions: CompletionBatch
    """The prompts and their ``G`` completions each, scored at the policy's samples."""
    advantages: Tensor
    """``[P * G]`` group-normalised advantages."""
    old_logprobs: Tensor | None = None
    """``[P * G, C]`` pi_old of the ratio, for updates that reuse a rollout: the log-probs the policy that sampled
    the completions gave by this same forward (``policy_logprobs``, or ``"policy_logprobs"`` of the rollout's
    first update). None: the current policy's own, detached, so the ratio is exactly 1."""
    reference_logprobs: Tensor | None = None
    """``[P * G, C]`` the reference model's log-probs of these completions from an earlier update of the same
    rollout (the reference is frozen, so they are what its forward would give); None: the reference runs."""


def model_logprobs(model, trainer, batch: CompletionBatch, options: ForwardOptions = ForwardOptions()) -> Tensor:
    """``forward.completion_logprobs`` of ``model``, each prompt prefilled once for its group unless activation
    checkpointing (which turns the key/value cache off) is on."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    # Under FSDP every forward is a collective: the processes agree on which passes they run (the shared prompt
    # prefix as a pass of its own, the pass over the completions after their first token). Under DDP they need not.
    all_agree = agreement(trainer) if is_sharded(model) else None
    return completion_logprobs(model, batch, replace(options, prefill_prompts_once=not checkpointing), all_agree)


@torch.no_grad()
def policy_logprobs(policy, trainer, batch: CompletionBatch, settings: GRPOSettings) -> Tensor:
    """Log-probs ``[P * G, C]`` of the sampled tokens under ``policy``, without gradients, by the passes
    ``rl_backward`` makes over the same batch (same micro-batches, forward and precision): taken before the
    policy moves, they are the ``old_logprobs`` of later updates, whose ratio is then exactly 1 wherever the
    policy has not changed."""
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.completion_ids.device)
    for rows, part in batch.groups(settings.micro_batch_size):
        if int(part.scored().sum()) == 0 and world_size(trainer) == 1:
            continue
        out[rows] = model_logprobs(policy, trainer, part, settings.forward)
    return out


def rl_backward(policy, reference, trainer, backward: Callable[[Tensor], None], batch: RLBatch,
                settings: GRPOSettings) -> dict:
    """GRPO loss (``method.grpo_token_loss_terms``) over the policy-sampled tokens of ``P`` prompts with ``G``
    completions each, ``settings.micro_batch_size`` completions per pass; the loss of each pass is weighted by its
    share of the sampled tokens, so the sum is the loss over all of them. Returns ``loss_rl``, ``kl`` and
    ``ppo_clip_fraction``, and under ``"policy_logprobs"`` the policy's log-probs ``[P * G, C]`` (detached); with a
    reference, under ``"reference_logprobs"`` the reference's ones used (``batch.reference_logprobs`` or its
    forward's), for the rollout's next update to reuse."""
    completions = batch.completions
    shape, device = completions.completion_ids.shape, completions.completion_ids.device
    total_tokens = max(1, int(completions.scored().sum()))
    sums = {"loss_rl": 0.0, "kl": 0.0, "ppo_clip_fraction": 0.0}
    used_policy = torch.zeros(shape, dtype=torch.float32, device=device)
    used_reference = None
    if reference is not None:
        used_reference = batch.reference_logprobs
        if used_reference is None:
            used_reference = torch.zeros(shape, dtype=torch.float32, device=device)
    for rows, part in completions.groups(settings.micro_batch_size):
        # Log-probs only where the loss reads them: tokens written by budget forcing are context, not actions.
        scored = part.scored()
        tokens = int(scored.sum())
        if tokens == 0 and world_size(trainer) == 1:
            continue
        logprobs = model_logprobs(policy, trainer, part, settings.forward)
        used_policy[rows] = logprobs.detach()
        if reference is not None and batch.reference_logprobs is None:
            with torch.no_grad():
                used_reference[rows] = model_logprobs(reference, trainer, part, settings.forward)
        old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs[rows]
        terms = grpo_token_loss_terms(logprobs, old, batch.advantages[rows], scored, clip_eps=settings.clip_eps,
                                      ref_logprobs=None if used_reference is None else used_reference[rows],
                                      beta=settings.beta)
        share = tokens / total_tokens
        backward(terms.loss * share)
        sums["loss_rl"] += float(terms.loss.detach()) * share
        sums["kl"] += float(terms.kl) * share
        sums["ppo_clip_fraction"] += float(terms.clipped_fraction) * share
    sums["policy_logprobs"] = used_policy
    if used_reference is not None:
        sums["reference_logprobs"] = used_reference
    return sums


def ntp_backward(policy, trainer, backward: Callable[[Tensor], None], documents: Tensor, attention: Tensor,
                 ntp_mask: Tensor, weight: float, micro_batch_size: int) -> float:
    """Teacher-forced NLL over the ``ntp_mask`` positions of the documents, ``micro_batch_size`` documents per pass,
    backpropagated times ``weight``; returns the NLL."""
    targets = ntp_mask[:, 1:]
    total = max(1, int(targets.sum()))
    nll = 0.0
    passes = math.ceil(documents.shape[0] / micro_batch_size)
    # Ranks hold different numbers of documents: a rank that runs out repeats its first rows at weight 0.
    for index in range(max_over_ranks(trainer, passes)):
        rows = slice(index * micro_batch_size, (index + 1) * micro_batch_size) if index < passes else slice(0, micro_batch_size)
        count = int(targets[rows].sum()) if index < passes else 0
        if count == 0 and world_size(trainer) == 1:
            continue
        # The head projects only the positions that predict a target (not padding, not RL positions), so
        # no [N, T, V] logits tensor is built. A rank with nothing to add runs one position at weight 0.
        select = torch.zeros_like(ntp_mask[rows])
        if count:
            select[:, :-1] = targets[rows]
        else:
            select[0, 0] = True
        with head_positions(policy, select) as pick:
            logits = pick(policy(input_ids=documents[rows], attention_mask=attention[rows]).logits)
        logprobs = token_logprobs(logits, documents[rows][:, 1:][select[:, :-1]] if count else documents[rows][:1, 1])
        loss = -logprobs.sum() / max(1, count)
        backward(loss * (count / total) * weight)
        nll += float(loss.detach()) * count / total
    return nll


def demonstrations_backward(policy, trainer, backward: Callable[[Tensor], None], batch: CompletionBatch) -> float:
    """NLL of the demonstrations (``batch``'s completions) after their prompts, backpropagated; returns it."""
    logprobs = model_logprobs(policy, trainer, batch)
    mask = batch.completion_mask.float()
    loss = -(logprobs * mask).sum() / mask.sum()
    backward(loss)
    return float(loss.detach())
