"""TensorBoard views of what the policy does: a table of sample completions and the sampled entropies."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


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


class CompletionsTable(L.Callback):
    """Every ``every_n_steps`` optimizer steps, writes the module's latest sample completions as a markdown
    table (tag ``completions``) and a histogram of the sampled positions' entropies (``curriculum/sampled_entropy``).

    Args:
        every_n_steps: Steps between two tables.
    """

    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (step - 1) % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                if pl_module.last_samples:
                    writer.add_text("completions", completions_markdown(pl_module.last_samples), step)
                if pl_module.last_sampled_entropies is not None and len(pl_module.last_sampled_entropies):
                    writer.add_histogram("curriculum/sampled_entropy", pl_module.last_sampled_entropies, step)
