"""Completions tables and histograms in the form each Lightning logger shows them.

- TensorBoard: a table as text (markdown) under its tag; a histogram under its tag.
- Weights & Biases: a ``wandb.Table`` under the tag; a ``wandb.Histogram`` under the tag.
- MLflow: a table artifact ``{tag}/step_{step}.json``; a JSON artifact ``histograms/{tag}/step_{step}.json``.
- CSV: lines of ``completions.jsonl`` and ``histograms.jsonl`` beside ``metrics.csv``.

Every writer takes one logging step's views at once (``tables``: tag -> rows, ``histograms``: tag -> values), so
W&B gets them as one history row at the step. Any other logger gets only the scalars Lightning logs itself.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

COLUMNS = ("tier", "context", "completion", "target", "prediction", "reward")
"""Columns of a completions table, in order; each row is a dict with these keys."""

HISTOGRAM_BINS = 30
"""Equal-width bins between the smallest and largest value, for the loggers that store bin counts we compute."""

SUPPORTED = (TensorBoardLogger, WandbLogger, MLFlowLogger, CSVLogger)
"""The loggers that get completions tables and histograms."""


def _cell(text) -> str:
    text = "" if text is None else str(text)
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def completions_markdown(samples: list[dict]) -> str:
    """A markdown table with one row per sample: tier, context tail, completion, target, prediction, reward."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for sample in samples:
        values = [f"{sample[c]:.3f}" if c == "reward" else _cell(sample[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def histogram_record(tag: str, values: torch.Tensor, step: int) -> dict:
    """One histogram as plain JSON: the tag, the step, count, min, max, mean, and ``counts`` in ``HISTOGRAM_BINS``
    equal bins between ``edges`` (numpy's convention: the last bin includes its right edge)."""
    array = values.double().numpy()
    counts, edges = np.histogram(array, bins=HISTOGRAM_BINS)
    return {"step": int(step), "tag": tag, "count": int(array.size), "min": float(array.min()),
            "max": float(array.max()), "mean": float(array.mean()), "edges": edges.tolist(), "counts": counts.tolist()}


def _tensorboard(logger: TensorBoardLogger, step: int, tables: dict, histograms: dict) -> None:
    writer = logger.experiment
    for tag, rows in tables.items():
        writer.add_text(tag, completions_markdown(rows), step)
    for tag, values in histograms.items():
        writer.add_histogram(tag, values, step)


def _wandb(logger: WandbLogger, step: int, tables: dict, histograms: dict) -> None:
    import wandb

    views = {tag: wandb.Table(columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in rows])
             for tag, rows in tables.items()}
    views.update({tag: wandb.Histogram(values.numpy()) for tag, values in histograms.items()})
    logger.log_metrics(views, step=step)


def _mlflow(logger: MLFlowLogger, step: int, tables: dict, histograms: dict) -> None:
    client, run_id = logger.experiment, logger.run_id
    # One file per step: MLflow's log_table appends to an existing file, which would merge the steps.
    for tag, rows in tables.items():
        client.log_table(run_id, data={c: [row[c] for row in rows] for c in COLUMNS}, artifact_file=f"{tag}/step_{step:07d}.json")
    for tag, values in histograms.items():
        client.log_dict(run_id, histogram_record(tag, values, step), f"histograms/{tag}/step_{step:07d}.json")


def _csv(logger: CSVLogger, step: int, tables: dict, histograms: dict) -> None:
    folder = logger.log_dir
    os.makedirs(folder, exist_ok=True)
    lines = {
        "completions.jsonl": [{"step": int(step), "tag": tag, **{c: row[c] for c in COLUMNS}}
                              for tag, rows in tables.items() for row in rows],
        "histograms.jsonl": [histogram_record(tag, values, step) for tag, values in histograms.items()],
    }
    for name, records in lines.items():
        if records:
            with open(os.path.join(folder, name), "a") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)


def write_views(logger: Logger, step: int, tables: dict[str, list[dict]], histograms: dict[str, torch.Tensor]) -> None:
    """Write one step's completions tables (tag -> rows with the ``COLUMNS`` keys) and histograms (tag -> values)
    to ``logger`` in its own form; a logger not in ``SUPPORTED`` gets nothing. Call on rank 0 only."""
    if isinstance(logger, TensorBoardLogger):
        _tensorboard(logger, step, tables, histograms)
    elif isinstance(logger, WandbLogger):
        _wandb(logger, step, tables, histograms)
    elif isinstance(logger, MLFlowLogger):
        _mlflow(logger, step, tables, histograms)
    elif isinstance(logger, CSVLogger):
        _csv(logger, step, tables, histograms)
