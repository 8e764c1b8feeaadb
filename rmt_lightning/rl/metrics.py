"""What a training step logs: the RL figures, the curriculum's mix, the progress bar and the completions table's rows."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..data.batches import PositionBatch
from ..engine.generation import Rollout
from ..method import TIER_NAMES, zero_std_groups
from .trajectory import Trajectory

PROGRESS_BAR_KEYS = frozenset({"warmup_loss", "ntp_loss", "reward", "budget"})
"""What the progress bar shows: the loss of a format warm-up step, of an NTP-only step, or an RL step's reward and budget."""


def rl_step_metrics(trajectory: Trajectory, terms: dict[str, float], loss_ntp: float) -> dict[str, float]:
    """The figures of an RL step: its loss terms, the trajectory's rewards (total and the correctness and length
    parts), lengths and the canaries (clipped, forced, zero-std)."""
    rollout, rewards = trajectory.rollout, trajectory.rewards
    return {
        "train/loss_rl": terms["loss_rl"],
        "train/loss_ntp": loss_ntp,
        "train/kl": terms["kl"],
        "train/ppo_clip_fraction": terms["ppo_clip_fraction"],
        "train/reward": float(rewards.mean()),
        "train/reward_correct": float(trajectory.correct.mean()),
        "train/reward_length": float(trajectory.length.mean()),
        "train/reasoning_length": float(np.mean(rollout.reasoning_lengths)),
        "train/completion_length": float(rollout.completion_mask.sum(1).float().mean()),
        "train/frac_reward_zero_std": float(zero_std_groups(rewards).float().mean()),
        "train/clipped_ratio": float(np.mean(rollout.clipped)),
        "train/forced_ratio": float(np.mean(rollout.forced)),
        "train/answer_rate": float(np.mean([p is not None for p in rollout.predictions])),
    }


def question_step_metrics(trajectory: Trajectory, terms: dict[str, float], verify_timeouts: int) -> dict[str, float]:
    """The figures of a question task's RL step: its loss terms, the rewards (total, correctness), the share of
    completions with an answer, lengths and the canaries (clipped, zero-std, verifications timed out)."""
    rollout, rewards = trajectory.rollout, trajectory.rewards
    return {
        "train/loss_rl": terms["loss_rl"],
        "train/kl": terms["kl"],
        "train/ppo_clip_fraction": terms["ppo_clip_fraction"],
        "train/reward": float(rewards.mean()),
        "train/reward_correct": float(trajectory.correct.mean()),
        "train/answer_rate": float(trajectory.length.mean()),
        "train/completion_length": float(rollout.completion_mask.sum(1).float().mean()),
        "train/frac_reward_zero_std": float(zero_std_groups(rewards).float().mean()),
        "train/clipped_ratio": float(np.mean(rollout.clipped)),
        "train/verify_timeouts": float(verify_timeouts),
    }


def curriculum_metrics(batch: PositionBatch) -> dict[str, float]:
    """The tier mix scheduled for the batch, the mix drawn, and the curriculum's progress."""
    probabilities, tiers = batch.curriculum_probabilities.tolist(), batch.tiers
    metrics = {"curriculum/progress": float(batch.curriculum_progress)}
    for t, name in enumerate(TIER_NAMES):
        metrics[f"curriculum/p_{name}"] = probabilities[t]
        metrics[f"curriculum/drawn_{name}"] = float((tiers == t).float().mean())
    return metrics


def as_tensors(figures: dict[str, float], device: torch.device) -> dict[str, Tensor]:
    """``figures`` as scalar tensors on ``device``, in one copy: what a step logs, on the device its reduction
    across processes runs on (Lightning would put plain numbers on the module's own device)."""
    values = torch.tensor([float(v) for v in figures.values()], dtype=torch.float32).to(device)
    return dict(zip(figures, values.unbind()))


def show_in_progress_bar(module, shown: dict[str, float], batch_size: int) -> None:
    """Show what this step trained on the progress bar, and nothing left from a step of another kind."""
    # Lightning keeps showing a key after the last step that logged it (and the warm-up is over once RL starts),
    # so keys of the other kinds of step are dropped from its step results and its progress-bar dict.
    for key in PROGRESS_BAR_KEYS - shown.keys():
        module.trainer._results.pop(f"training_step.{key}", None)
        module.trainer.progress_bar_metrics.pop(key, None)
    module.log_dict(as_tensors(shown, module.root_device), prog_bar=True, logger=False, on_step=True, on_epoch=False,
                    batch_size=batch_size)


def completion_samples(tokenizer, batch: PositionBatch, rollout: Rollout, rewards: Tensor, limit: int) -> list[dict]:
    """Up to ``limit`` rows for the completions table: the first completion of each position."""
    group = len(rollout.texts) // len(batch.contexts)
    rows = [p * group for p in range(len(batch.contexts))][:limit]
    return [
        {
            "tier": TIER_NAMES[int(batch.tiers[r // group])],
            "context": tokenizer.decode(batch.contexts[r // group][-24:]),
            "completion": rollout.texts[r],
            "target": batch.continuations[r // group][0].decode("utf-8", errors="replace"),
            "prediction": rollout.predictions[r],
            "reward": float(rewards.flatten()[r]),
        }
        for r in rows
    ]


def question_samples(batch, rollout: Rollout, rewards: Tensor, limit: int, answer_format: str = "boxed") -> list[dict]:
    """Up to ``limit`` rows for the completions table of the question task: the first completion of each question
    (``batch`` is a ``QuestionBatch``), with the answer read in ``answer_format``."""
    from ..method.answers import extract_answer

    group = len(rollout.texts) // batch.size
    return [
        {
            "tier": "question",
            "context": batch.texts[r // group][-200:],
            "completion": rollout.texts[r],
            "target": " | ".join(batch.answers[r // group]),
            "prediction": extract_answer(rollout.texts[r], answer_format),
            "reward": float(rewards.flatten()[r]),
        }
        for r in [q * group for q in range(batch.size)][:limit]
    ]
