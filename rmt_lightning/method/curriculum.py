"""Entropy tiers and the curriculum tier distribution (RMT, sections 1 and 4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["TIER_NAMES", "tier_probabilities", "assign_tiers", "nested_tier_masks", "renormalise_over_nonempty"]

TIER_NAMES: tuple[str, str, str] = ("easy", "medium", "hard")

_SUM_TOLERANCE = 1e-6


def _check_distribution(name: str, probs: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(p) for p in probs)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 entries (easy, medium, hard), got {len(values)}: {values!r}")
    if any(not p >= 0.0 for p in values):
        raise ValueError(f"{name} entries must be non-negative, got {values!r}")
    if abs(sum(values) - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"{name} must sum to 1 (within {_SUM_TOLERANCE}), got sum {sum(values)!r} for {values!r}")
    return values  # type: ignore[return-value]


def tier_probabilities(
    progress: float,
    p1: Sequence[float],
    p2: Sequence[float],
    t1: float,
    t2: float,
) -> tuple[float, float, float]:
    """Tier distribution (easy, medium, hard) at training progress ``s = t / T``.

    ``p(s) = p1`` for ``s < t1``;
    ``p(s) = (1 - a) * p1 + a * p2`` with ``a = (s - t1) / (t2 - t1)`` for ``t1 <= s < t2``;
    ``p(s) = p2`` for ``s >= t2``.

    Paper: ``t1 = 0.3``, ``t2 = 0.7``. Raises ValueError unless
    ``0 < t1 < t2 < 1``, ``0 <= progress <= 1`` and ``p1``, ``p2`` each hold 3
    non-negative entries summing to 1 (tolerance 1e-6).
    """
    progress = float(progress)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be t/T in [0, 1], got {progress!r}")
    if not 0.0 < t1 < t2 < 1.0:
        raise ValueError(f"thresholds must satisfy 0 < t1 < t2 < 1, got t1={t1!r}, t2={t2!r}")
    q1 = _check_distribution("p1", p1)
    q2 = _check_distribution("p2", p2)
    if progress < t1:
        return q1
    if progress >= t2:
        return q2
    a = (progress - t1) / (t2 - t1)
    return tuple((1.0 - a) * x + a * y for x, y in zip(q1, q2))  # type: ignore[return-value]


def assign_tiers(entropy: Tensor, thresholds: Sequence[float] = (0.5, 1.0, 1.5)) -> Tensor:
    """Curriculum tier of every position from its entropy ``H`` and thresholds ``(t0, t1, t2)``.

    ``-1`` for ``H <= t0`` (never an RL candidate, NTP only);
    ``0`` easy for ``t0 < H <= t1``; ``1`` medium for ``t1 < H <= t2``;
    ``2`` hard for ``H > t2``.

    Returns an int64 tensor of the same shape. NaN entropies get ``-1``.
    Raises ValueError unless there are 3 strictly increasing thresholds.
    """
    bounds = tuple(float(t) for t in thresholds)
    if len(bounds) != 3 or not bounds[0] < bounds[1] < bounds[2]:
        raise ValueError(f"thresholds must be 3 strictly increasing values (t0, t1, t2), got {bounds!r}")
    tiers = torch.full(entropy.shape, -1, dtype=torch.int64, device=entropy.device)
    for tier, bound in enumerate(bounds):
        tiers[entropy > bound] = tier
    return tiers


def nested_tier_masks(tiers: Tensor) -> Tensor:
    """Membership of each position in the nested evaluation splits of RPT: ``[..., 3]`` booleans.

    Split ``t`` holds the positions with ``H > t_t``: easy ``H > t0``, medium ``H > t1``, hard ``H > t2``, so a
    hard position counts in all three splits. ``tiers`` are the disjoint tiers of :func:`assign_tiers`
    (-1 .. 2), and ``H > t_t`` is exactly ``tier >= t``.
    """
    return torch.stack([tiers >= t for t in range(len(TIER_NAMES))], dim=-1)


def renormalise_over_nonempty(probs: Sequence[float], nonempty: Sequence[bool]) -> tuple[float, ...]:
    """Tier distribution restricted to tiers that still have candidates.

    ``q_i = p_i * 1[nonempty_i] / sum_j p_j * 1[nonempty_j]``

    When every non-empty tier has probability 0 the result is uniform over the
    non-empty tiers, so sampling can go on. Raises ValueError when all tiers
    are empty or the lengths differ.
    """
    values = tuple(float(p) for p in probs)
    flags = tuple(bool(f) for f in nonempty)
    if len(values) != len(flags):
        raise ValueError(f"probs and nonempty must have the same length, got {len(values)} and {len(flags)}")
    if not any(flags):
        raise ValueError("all tiers are empty: there is no candidate position to sample")
    kept = tuple(p if f else 0.0 for p, f in zip(values, flags))
    total = sum(kept)
    if total <= 0.0:
        count = sum(flags)
        return tuple(1.0 / count if f else 0.0 for f in flags)
    return tuple(p / total for p in kept)
