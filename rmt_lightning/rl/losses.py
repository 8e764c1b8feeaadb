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

import torch
from torch import Tensor

from ..engine.forward import completion_logprobs, head_positions
from ..method import grpo_token_loss_terms, token_logprobs
from ..runtime.distributed import agreement, is_sharded, max_over_ranks, world_size


def model_logprobs(model, trainer, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                   completion_mask: Tensor, group_size: int = 1, logprob_mask: Tensor | None = None,
                   share_prompt_attention: bool = True) -> Tensor:
    """``forward.completion_logprobs`` of ``model``, sharing each prompt's keys and values with its group unless
    activation checkpointing (which turns the key/value cache off) is on; stored once for the group with
    ``share_prompt_attention``."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    # Under FSDP every forward is a collective: the processes agree on which passes they run (the shared prompt
    # prefix as a pass of its own, the pass over the completions after their first token). Under DDP they need not.
    all_agree = agreement(trainer) if is_sharded(model) else None
    return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size,
                               not checkpointing, logprob_mask=logprob_mask, all_agree=all_agree,
                               share_prompt_attention=share_prompt_attention)


def _micro_batches(prompts: int, group_size: int, micro_batch_size: int):
    """``(owners, rows)`` of each pass over ``prompts`` prompts with ``group_size`` completions each: the prompts'
    slice and their completions' slice, ``micro_batch_size`` completions (whole groups) per pass."""
    prompts_per_pass = max(1, micro_batch_size // group_size)
    for first in range(0, prompts, prompts_per_pass):
        yield slice(first, first + prompts_per_pass), slice(first * group_size, (first + prompts_per_pass) * group_size)


@torch.no_grad()
def policy_logprobs(policy, trainer, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                    completion_mask: Tensor, sampled_mask: Tensor, *, group_size: int, micro_batch_size: int,
                    share_prompt_attention: bool = True) -> Tensor:
    """Log-probs ``[P * G, C]`` of the sampled tokens under ``policy``, without gradients, by the passes
    ``rl_backward`` makes over the same tensors (same micro-batches, forward and precision): taken before the
    policy moves, they are the ``old_logprobs`` of later updates, whose ratio is then exactly 1 wherever the
    policy has not changed."""
    out = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    for owners, rows in _micro_batches(prompt_ids.shape[0], group_size, micro_batch_size):
        if int(sampled_mask[rows].sum()) == 0 and world_size(trainer) == 1:
            continue
        out[rows] = model_logprobs(policy, trainer, prompt_ids[owners], prompt_mask[owners], completion_ids[rows],
                                   completion_mask[rows], group_size, logprob_mask=sampled_mask[rows],
                                   share_prompt_attention=share_prompt_attention)
    return out


def rl_backward(policy, reference, trainer, backward: Callable[[Tensor], None], prompt_ids: Tensor, prompt_mask: Tensor,
                completion_ids: Tensor, completion_mask: Tensor, sampled_mask: Tensor, advantages: Tensor, *,
                group_size: int, micro_batch_size: int, clip_eps: float, beta: float,
                old_logprobs: Tensor | None = None, share_prompt_attention: bool = True,
                reference_logprobs: Tensor | None = None) -> dict:
    """GRPO loss (``method.grpo_token_loss_terms``) over the policy-sampled tokens of ``P`` prompts with ``G``
    completions each, ``micro_batch_size`` completions per pass; the loss of each pass is weighted by its share of
    the sampled tokens, so the sum is the loss over all of them. Returns ``loss_rl``, ``kl`` and
    ``ppo_clip_fraction``, and under ``"policy_logprobs"`` the policy's log-probs ``[P * G, C]`` (detached).

    ``old_logprobs`` (``[P * G, C]``) is pi_old of the ratio, for updates that reuse a rollout: the log-probs the
    policy that sampled the completions gave by this same forward (``policy_logprobs``, or ``"policy_logprobs"``
    of the rollout's first update). None: the current policy's own, detached, so the ratio is exactly 1.

    ``reference_logprobs`` (``[P * G, C]``) are the reference model's log-probs of these completions from an
    earlier update of the same rollout (the reference is frozen, so they are what its forward would give); None:
    the reference runs. Where a reference is given, the result holds under ``"reference_logprobs"`` the ones
    used, for the next update to reuse."""
    total_tokens = max(1, int(sampled_mask.sum()))
    sums = {"loss_rl": 0.0, "kl": 0.0, "ppo_clip_fraction": 0.0}
    used_policy = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    used_reference = None
    if reference is not None:
        used_reference = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device) \
            if reference_logprobs is None else reference_logprobs
    for owners, rows in _micro_batches(prompt_ids.shape[0], group_size, micro_batch_size):
        tokens = int(sampled_mask[rows].sum())
        if tokens == 0 and world_size(trainer) == 1:
            continue
        args = (prompt_ids[owners], prompt_mask[owners], completion_ids[rows], completion_mask[rows], group_size)
        # Log-probs only where the loss reads them: tokens written by budget forcing are context, not actions.
        options = {"logprob_mask": sampled_mask[rows], "share_prompt_attention": share_prompt_attention}
        logprobs = model_logprobs(policy, trainer, *args, **options)
        used_policy[rows] = logprobs.detach()
        if reference is not None and reference_logprobs is None:
            with torch.no_grad():
                used_reference[rows] = model_logprobs(reference, trainer, *args, **options)
        old = logprobs.detach() if old_logprobs is None else old_logprobs[rows]
        terms = grpo_token_loss_terms(logprobs, old, advantages[rows], sampled_mask[rows], clip_eps=clip_eps,
                                      ref_logprobs=None if used_reference is None else used_reference[rows], beta=beta)
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


def demonstrations_backward(policy, trainer, backward: Callable[[Tensor], None], prompt_ids: Tensor, prompt_mask: Tensor,
                            response_ids: Tensor, response_mask: Tensor) -> float:
    """NLL of the response tokens of demonstrations after their prompts, backpropagated; returns it."""
    logprobs = model_logprobs(policy, trainer, prompt_ids, prompt_mask, response_ids, response_mask)
    mask = response_mask.float()
    loss = -(logprobs * mask).sum() / mask.sum()
    backward(loss)
    return float(loss.detach())
