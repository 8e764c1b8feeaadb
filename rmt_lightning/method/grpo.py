"""GRPO advantages and the clipped, KL-regularised token loss (RMT, section 5)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GRPOLossTerms",
    "group_advantages",
    "zero_std_groups",
    "grpo_token_loss_terms",
    "grpo_token_loss",
]


def _check_groups(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"each group needs G >= 2 completions, got G={rewards.shape[1]}")


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages ``A_i = (r_i - mean(r)) / (std(r) + eps)``.

    ``rewards`` is ``[groups, G]`` with ``G >= 2``; mean and unbiased std are
    taken per group, so a group of equal rewards gets all-zero advantages.
    Returns a floating tensor of the same shape.
    """
    _check_groups(rewards)
    r = rewards if rewards.is_floating_point() else rewards.float()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    return (r - mean) / (std + eps)


def zero_std_groups(rewards: Tensor) -> Tensor:
    """Bool ``[groups]``: True where every reward of the group is equal (no learning signal).

    Its mean is the ``frac_reward_zero_std`` statistic.
    """
    _check_groups(rewards)
    return (rewards == rewards[:, :1]).all(dim=1)


class GRPOLossTerms(NamedTuple):
    """The token loss and two detached scalars for logging."""

    loss: Tensor
    kl: Tensor
    clipped_fraction: Tensor


def grpo_token_loss_terms(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
) -> GRPOLossTerms:
    """Clipped GRPO surrogate with a k3 KL penalty, averaged over masked tokens.

    Per token, with ``rho = exp(logp - logp_old)`` and ``d = logp_ref - logp``:
    ``l = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + beta * (exp(d) - d - 1)``;
    ``loss = sum(l * m) / sum(m)`` over the whole batch (0, still attached to
    the graph, when the mask is empty).

    ``kl`` is the masked mean of the k3 term (0 without a reference), and
    ``clipped_fraction`` the share of masked tokens whose clip is active
    (``A > 0`` and ``rho > 1 + eps``, or ``A < 0`` and ``rho < 1 - eps``); both
    are detached. Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs``,
    ``mask`` are ``[N, T]``, ``advantages`` is ``[N]``.

    Raises ValueError on mismatched shapes, ``beta < 0``, ``clip_eps < 0``, or
    ``beta > 0`` without ``ref_logprobs``.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} must have shape {tuple(logprobs.shape)}, got {tuple(tensor.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must have shape ({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta!r} > 0 needs ref_logprobs; pass them or set beta=0")

    m = mask.bool()
    # Old, reference and advantage values are targets of the update, never
    # paths for the gradient.
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)

    # clamp(min=1) keeps an empty mask at 0 without a host sync on the count.
    count = m.sum().clamp(min=1).to(per_token.dtype)

    if ref_logprobs is not None:
        delta = ref_logprobs.detach() - logprobs
        k3 = torch.exp(delta) - delta - 1.0
        if beta > 0:
            per_token = per_token + beta * k3
        kl = torch.where(m, k3.detach(), torch.zeros_like(k3)).sum() / count
    else:
        kl = torch.zeros((), dtype=per_token.dtype, device=per_token.device)

    loss = torch.where(m, per_token, torch.zeros_like(per_token)).sum() / count

    with torch.no_grad():
        active = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
        clipped_fraction = (active & m).sum().to(per_token.dtype) / count

    return GRPOLossTerms(loss=loss, kl=kl, clipped_fraction=clipped_fraction)


def grpo_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
) -> Tensor:
    """Scalar GRPO loss; see :func:`grpo_token_loss_terms` for the formula.

    ``l = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + beta * k3``,
    ``loss = sum over masked tokens / number of masked tokens``.
    """
    return grpo_token_loss_terms(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_eps=clip_eps,
        ref_logprobs=ref_logprobs,
        beta=beta,
    ).loss
