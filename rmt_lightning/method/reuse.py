"""Several optimizer steps on one rollout (TRL's ``num_iterations``; PPO's epochs and mini-batches): which update
of its rollout a step is, and which part of a rollout (or of its documents) a mini-batch is.

Steps are counted run-wide from 0, one per optimizer step. The first ``single_draw_steps`` steps (the format
warm-up) each draw positions of their own; after them, every ``steps_per_rollout`` consecutive steps train on
one draw, whose rollout the first of them collects.
"""

from __future__ import annotations

__all__ = ["rollout_update", "contiguous_share"]


def rollout_update(step: int, single_draw_steps: int, steps_per_rollout: int) -> int:
    """Which of the ``steps_per_rollout`` steps on one rollout step ``step`` is: 0 for the step that draws the
    positions and collects the rollout, up to ``steps_per_rollout - 1``; 0 for each of the first
    ``single_draw_steps`` steps. ``step - rollout_update(step, ...)`` is the step that drew ``step``'s positions."""
    if step < 0 or single_draw_steps < 0:
        raise ValueError(f"step and single_draw_steps must be >= 0, got {step!r} and {single_draw_steps!r}")
    if steps_per_rollout < 1:
        raise ValueError(f"steps_per_rollout must be >= 1, got {steps_per_rollout!r}")
    if step < single_draw_steps:
        return 0
    return (step - single_draw_steps) % steps_per_rollout


def contiguous_share(count: int, parts: int, index: int) -> slice:
    """Part ``index`` of ``count`` items cut into ``parts`` contiguous parts whose sizes differ by at most one,
    the first ``count % parts`` parts one larger (as ``torch.tensor_split``); empty parts when ``count < parts``."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts!r}")
    if not 0 <= index < parts:
        raise ValueError(f"index must satisfy 0 <= index < parts={parts}, got {index!r}")
    size, larger = divmod(count, parts)
    start = index * size + min(index, larger)
    return slice(start, start + size + int(index < larger))
