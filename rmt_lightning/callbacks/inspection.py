"""Views of what the policy does, in every logger of the run: completions tables, histograms, and (TensorBoard)
charts that pair related curves."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from ..method import TIER_NAMES
from ..runtime.distributed import gather_objects
from .writers import SUPPORTED, write_views


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


class CompletionsTable(L.Callback):
    """Writes what a researcher checks while a run goes, gathered from every rank to rank 0, to every logger of the
    run that can show it: TensorBoard, Weights & Biases, MLflow and CSV (see ``writers`` for each one's form).

    - at every logging step (or every ``every_n_steps`` optimizer steps): the latest completions as a table (tag
      ``completions``: tier, context tail, completion, target, prediction, reward) and histograms of the
      sampled positions' entropy (``curriculum/sampled_entropy``) and of the reasoning lengths
      (``train/reasoning_length_hist``);
    - after each validation or test: a table of the first held-out completions (``completions/val``,
      ``completions/test``) and a histogram of their reasoning lengths (``val/`` or ``test/reasoning_length_hist``);
    - once at the start of ``fit``, TensorBoard only: charts that draw ``curriculum/p_*`` with
      ``curriculum/drawn_*``, the budget with the reasoning length, and the accuracy splits together (the CUSTOM
      SCALARS tab).

    A logger of another kind gets the scalars alone, and one warning per run that names what it does not get.
    In TensorBoard the hyperparameters are in the HPARAMS tab with ``hp_metric``, the accuracy the model is scored by.

    Args:
        every_n_steps: Optimizer steps between two tables (None: the trainer's ``log_every_n_steps``, so a table
            goes with every logged step).
    """

    def __init__(self, every_n_steps: int | None = None):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1 (or None: every logging step)")
        self.every_n_steps = every_n_steps
        self._warned = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        unknown = sorted({type(logger).__name__ for logger in trainer.loggers if not isinstance(logger, SUPPORTED)})
        # fit, then validate or test on the same trainer is one run: one warning.
        if unknown and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{', '.join(unknown)} get(s) the scalars only: CompletionsTable writes the completions tables "
                "(completions, completions/val, completions/test) and the histograms (curriculum/sampled_entropy, "
                "train/, val/ and test/reasoning_length_hist) to "
                f"{', '.join(cls.__name__ for cls in SUPPORTED)} only"
            )

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_custom_scalars(chart_layout())

    def _write(self, trainer, tables: dict, histograms: dict) -> None:
        tables = {tag: rows for tag, rows in tables.items() if rows}
        histograms = {tag: values for tag, values in histograms.items() if values is not None}
        if tables or histograms:
            for logger in trainer.loggers:
                write_views(logger, trainer.global_step, tables, histograms)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        if (trainer.global_step - 1) % every != 0:
            return
        # Every rank sends what it saw (a collective); rank 0 alone writes.
        per_rank = gather_objects(
            (pl_module.last_samples, pl_module.last_sampled_entropies, pl_module.last_reasoning_lengths)
        )
        if not trainer.is_global_zero:
            return
        self._write(
            trainer,
            {"completions": [sample for rank_samples, _, _ in per_rank for sample in rank_samples]},
            {"curriculum/sampled_entropy": _concatenated(entropies for _, entropies, _ in per_rank),
             "train/reasoning_length_hist": _concatenated(lengths for _, _, lengths in per_rank)},
        )

    def _evaluation_views(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking:
            return
        per_rank = gather_objects((pl_module.eval_samples, pl_module.eval_reasoning_lengths))
        if not trainer.is_global_zero:
            return
        self._write(
            trainer,
            {f"completions/{stage}": [sample for rank_samples, _ in per_rank for sample in rank_samples]},
            {f"{stage}/reasoning_length_hist": _concatenated(lengths for _, lengths in per_rank)},
        )

    def on_validation_end(self, trainer, pl_module) -> None:
        self._evaluation_views(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._evaluation_views(trainer, pl_module, "test")
