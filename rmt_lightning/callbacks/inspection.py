"""TensorBoard views of what the policy does: completions tables, histograms, and charts that pair related curves."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from ..distributed import gather_objects
from ..method import TIER_NAMES


def _cell(text) -> str:
    text = "" if text is None else str(text)
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def completions_markdown(samples: list[dict]) -> str:
    """A markdown table with one row per sample: tier, context tail, completion, target, prediction, reward."""
    columns = ["tier", "context", "completion", "target", "prediction", "reward"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for sample in samples:
        values = [f"{sample[c]:.3f}" if c == "reward" else _cell(sample[c]) for c in columns]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def chart_layout() -> dict:
    """TensorBoard custom-scalars layout: curves a researcher reads together, drawn on one chart each."""
    return {
        "curriculum": {
            f"{name}: scheduled p vs drawn share": ["Multiline", [f"curriculum/p_{name}", f"curriculum/drawn_{name}"]]
            for name in TIER_NAMES
        },
        "budget": {"budget vs reasoning length": ["Multiline", ["train/budget", "train/reasoning_length"]]},
        "evaluation": {
            f"{stage} accuracy ({mode})": ["Multiline", [f"{stage}/{prefix}_{split}" for split in (*TIER_NAMES, "avg")]]
            for stage in ("val", "test")
            for mode, prefix in (("reasoning mode", "acc"), ("argmax", "ntp_acc"))
        },
    }


def _concatenated(tensors) -> torch.Tensor | None:
    present = [torch.as_tensor(t, dtype=torch.float32) for t in tensors if t is not None and len(t)]
    return torch.cat(present) if present else None


def _writers(trainer):
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class CompletionsTable(L.Callback):
    """Writes what a researcher checks while a run goes to TensorBoard, gathered from every rank to rank 0:

    - at every logging step (or every ``every_n_steps`` optimizer steps): the latest completions as a markdown table (text tag
      ``completions``: tier, context tail, completion, target, prediction, reward) and histograms of the
      sampled positions' entropy (``curriculum/sampled_entropy``) and of the reasoning lengths
      (``train/reasoning_length_hist``);
    - after each validation or test: a table of the first held-out completions (``completions/val``,
      ``completions/test``) and a histogram of their reasoning lengths (``val/reasoning_length_hist``);
    - once at the start of ``fit``: charts that draw ``curriculum/p_*`` with ``curriculum/drawn_*``, the budget
      with the reasoning length, and the accuracy splits together (the CUSTOM SCALARS tab).

    The hyperparameters are in the HPARAMS tab with ``hp_metric``, the accuracy the model is scored by.

    Args:
        every_n_steps: Optimizer steps between two tables (None: the trainer's ``log_every_n_steps``, so a table
            goes with every logged step).
    """

    def __init__(self, every_n_steps: int | None = None):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1 (or None: every logging step)")
        self.every_n_steps = every_n_steps

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            for writer in _writers(trainer):
                writer.add_custom_scalars(chart_layout())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps
        if (step - 1) % every != 0:
            return
        # Every rank sends what it saw (a collective); rank 0 alone writes.
        per_rank = gather_objects(
            (pl_module.last_samples, pl_module.last_sampled_entropies, pl_module.last_reasoning_lengths)
        )
        if not trainer.is_global_zero:
            return
        samples = [sample for rank_samples, _, _ in per_rank for sample in rank_samples]
        entropies = _concatenated(entropies for _, entropies, _ in per_rank)
        lengths = _concatenated(lengths for _, _, lengths in per_rank)
        for writer in _writers(trainer):
            if samples:
                writer.add_text("completions", completions_markdown(samples), step)
            if entropies is not None:
                writer.add_histogram("curriculum/sampled_entropy", entropies, step)
            if lengths is not None:
                writer.add_histogram("train/reasoning_length_hist", lengths, step)

    def _evaluation_views(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking:
            return
        per_rank = gather_objects((pl_module.eval_samples, pl_module.eval_reasoning_lengths))
        if not trainer.is_global_zero:
            return
        samples = [sample for rank_samples, _ in per_rank for sample in rank_samples]
        lengths = _concatenated(lengths for _, lengths in per_rank)
        step = trainer.global_step
        for writer in _writers(trainer):
            if samples:
                writer.add_text(f"completions/{stage}", completions_markdown(samples), step)
            if lengths is not None:
                writer.add_histogram(f"{stage}/reasoning_length_hist", lengths, step)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._evaluation_views(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._evaluation_views(trainer, pl_module, "test")

