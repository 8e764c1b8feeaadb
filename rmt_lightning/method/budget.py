"""Dynamic token budget and the triangular length reward (RMT, section 2)."""

from __future__ import annotations

import math

__all__ = ["token_budget", "length_reward", "thinking_cap", "generation_cap"]

# A product such as 800 * 0.2 or 100 * 0.29 can land a hair below the integer
# it stands for; flooring that would lose a whole token of budget.
_INTEGER_SNAP = 1e-9


def _check_progress(progress: float) -> float:
    progress = float(progress)
    if not 0.0 <= progress <= 1.0:  # also rejects NaN
        raise ValueError(f"progress must be t/T in [0, 1], got {progress!r}")
    return progress


def token_budget(progress: float, b0: int, b_min: int, gamma: float, k: float = 1.0) -> int:
    """Reasoning-token budget at training progress ``s = t / T``.

    ``B_t = max(B_min, floor(B_0 * gamma ** (s ** k)))``

    Paper defaults: ``B_0 = 800``, ``B_min = 1``, ``gamma = 0.2``, ``k = 1`` (the
    budget then ends at 160). A value within 1e-9 of an integer is floored to
    that integer, so float error never costs a token.

    Raises ValueError when ``progress`` is outside [0, 1], ``b0 < 1``,
    ``b_min < 1``, ``gamma <= 0`` or ``k <= 0``.
    """
    progress = _check_progress(progress)
    if b0 < 1:
        raise ValueError(f"b0 must be >= 1, got {b0!r}")
    if b_min < 1:
        raise ValueError(f"b_min must be >= 1, got {b_min!r}")
    if not gamma > 0.0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    if not k > 0.0:
        raise ValueError(f"k must be > 0, got {k!r}")
    value = b0 * gamma ** (progress**k)
    nearest = round(value)
    floored = nearest if abs(value - nearest) <= _INTEGER_SNAP * max(1.0, abs(value)) else math.floor(value)
    return max(int(b_min), int(floored))


def length_reward(length: int, budget: int, r_max: float = 1.0) -> float:
    """Triangular reward for a reasoning length ``l`` under budget ``B``.

    ``r = r_max * l / B`` for ``0 <= l <= B``;
    ``r = r_max * (2B - l) / B`` for ``B < l <= 2B``;
    ``r = 0`` for ``l > 2B`` (and ``r = 0`` at ``l = 0``).

    Raises ValueError when ``budget < 1`` or ``length < 0``.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget!r}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length!r}")
    if length <= budget:
        return float(r_max * length / budget)
    if length <= 2 * budget:
        return float(r_max * (2 * budget - length) / budget)
    return 0.0


def thinking_cap(budget: int) -> int:
    """Thinking tokens a completion may write under budget ``B``: ``2B``, where the length reward reaches 0."""
    return 2 * int(budget)


def generation_cap(think_cap: int, answer_allowance: int, scaffold_tokens: int = 0, max_new_tokens: int | None = None) -> int:
    """New tokens a completion may take: ``think_cap + answer_allowance + scaffold_tokens`` (the scaffold budget
    forcing writes, ``</think> \\boxed{``, counts against neither), at most ``max_new_tokens`` when given."""
    cap = int(think_cap) + int(answer_allowance) + int(scaffold_tokens)
    return cap if max_new_tokens is None else min(cap, int(max_new_tokens))
