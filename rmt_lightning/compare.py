"""``python -m rmt_lightning compare``: the paper's table for your model and corpus.

Each config is trained for the same number of steps on the same data and seed, then its finished model is
evaluated once on the same held-out positions (reasoning mode at the config's final budget, and NTP mode), and
the rows are written as a markdown table, as JSON, and as two pictures (``comparison.png``: accuracy per split
with 95% intervals, argmax accuracy, reasoning length; ``curves.png``: reward, reasoning length and budget
against step, from each run's logs). Arguments after ``--`` are LightningCLI overrides given
to every run, e.g. a corpus or a shorter schedule::

    python -m rmt_lightning compare --configs configs/rmt.yaml configs/rpt_baseline.yaml configs/ntp_only.yaml \\
        --out logs/compare -- --config configs/data/gsm8k.yaml --trainer.max_epochs 2

Runs go one after the other in this process, each built by the same LightningCLI as ``fit``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from .callbacks import HuggingFaceExport, PeriodicCheckpoint
from .charts import write_charts
from .method import TIER_NAMES, nested_tier_masks

DEFAULT_CONFIGS = ("configs/rmt.yaml", "configs/rpt_baseline.yaml", "configs/ntp_only.yaml")
"""The paper's main rows: RMT, the RPT-style baseline and the NTP baseline."""

METHOD_NAMES = {
    "rmt": "RMT",
    "rpt_baseline": "RPT-style",
    "ntp_only": "NTP only",
    "rmt_no_budget": "RMT w/o budget",
    "rmt_no_curriculum": "RMT w/o curriculum",
    "rmt_no_ntp": "RMT w/o NTP",
}
"""Row labels of the configs in ``configs/``; any other config is labelled by its file name."""

BASE_ROW = "base model (untrained)"
"""Label of the row that evaluates the first config's model before any training."""


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def split_positions(data) -> dict[str, int]:
    """Held-out positions in each nested split (the number behind each accuracy), as this process evaluated them."""
    members = nested_tier_masks(data.val_candidates.tier[data.eval_positions()])
    return dict(zip(TIER_NAMES, (int(n) for n in members.sum(0))))


def evaluate_run(config: str, label: str, run_name: str, out_dir: Path, overrides: list[str], train: bool = True,
                 keep_artifacts: bool = False) -> dict:
    """Build ``config`` with ``overrides`` through the project's LightningCLI, fit it (unless ``train`` is
    False), validate the finished model once, and return its row of the table, labelled ``label``. The run
    logs to ``{out_dir}/runs/{run_name}/version_N``."""
    from .cli import build_cli

    args = ["--config", config, *overrides, "--trainer.logger.init_args.save_dir", str(out_dir / "runs"),
            "--trainer.logger.init_args.name", run_name]
    # LightningCLI warns when it gets a list of arguments while sys.argv holds others (compare's own).
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = build_cli(args, run=False)
    finally:
        sys.argv = argv
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if not keep_artifacts:
        # Checkpoints and exports of every row would cost minutes and gigabytes; the table needs neither.
        trainer.callbacks = [c for c in trainer.callbacks
                             if not isinstance(c, (ModelCheckpoint, PeriodicCheckpoint, HuggingFaceExport))]
    # Score the corpus before the clock starts, so a cold entropy cache is not charged to the first row.
    data.prepare_data()
    train_seconds = train_cpu_seconds = 0.0
    if train:
        # The table reads one evaluation of the finished model; validating during fit too would only cost time.
        limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=data)
        # CPU time as well as wall time: on a shared machine, wall time also counts other processes' load.
        train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        trainer.limit_val_batches = limit_val_batches
    started = time.perf_counter()
    trainer.validate(model, datamodule=data, verbose=False)
    eval_seconds = time.perf_counter() - started
    figures = dict(model.last_evaluation)
    scored_by = figures["scored_by"]
    prefix = "val/acc" if scored_by == "reasoning" else "val/ntp_acc"
    row = {
        "method": label,
        "config": config,
        "scored_by": scored_by,
        **{split: _percent(figures.get(f"{prefix}_{split}")) for split in (*TIER_NAMES, "avg")},
        "reasoning_length": figures.get("val/reasoning_length") if scored_by == "reasoning" else None,
        "answer_rate": figures.get("val/answer_rate"),
        "argmax_avg": _percent(figures.get("val/ntp_acc_avg")),
        "eval_budget": figures.get("budget"),
        "positions": figures.get("positions"),
        "split_positions": split_positions(data),
        "steps": int(trainer.global_step),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "eval_seconds": eval_seconds,
        "log_dir": trainer.log_dir,
        "figures": figures,
    }
    del cli, trainer, model, data
    gc.collect()
    return row


def summary(rows: list[dict]) -> dict:
    """RMT against the RPT-style row, when both are there: the relative gain in average accuracy and the
    reasoning-length ratio (the paper: 59.12 vs 35.85, +64.91%; 186 vs 872 tokens, 21%)."""
    by_method = {row["method"]: row for row in rows}
    rmt, rpt = by_method.get(METHOD_NAMES["rmt"]), by_method.get(METHOD_NAMES["rpt_baseline"])
    if rmt is None or rpt is None:
        return {}
    out = {"rmt_avg": rmt["avg"], "rpt_avg": rpt["avg"]}
    if rmt["avg"] is not None and rpt["avg"] is not None:
        out["avg_difference_points"] = rmt["avg"] - rpt["avg"]
        out["avg_relative_gain"] = (rmt["avg"] - rpt["avg"]) / rpt["avg"] if rpt["avg"] > 0 else None
    if rmt["reasoning_length"] is not None and rpt["reasoning_length"]:
        out["reasoning_length_ratio"] = rmt["reasoning_length"] / rpt["reasoning_length"]
    return out


def _number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """The paper-style table: accuracy in %, by nested entropy split, with reasoning length and wall time."""
    columns = ["method", "scored by", "easy", "medium", "hard", "avg", "reasoning length", "answer rate",
               "argmax avg", "eval budget", "steps", "train time (s)", "train CPU time (s)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["method"], row["scored_by"], *(_number(row[s]) for s in (*TIER_NAMES, "avg")),
                 _number(row["reasoning_length"], 1), _number(row["answer_rate"]), _number(row["argmax_avg"]),
                 str(row["eval_budget"] if row["scored_by"] == "reasoning" else "-"), str(row["steps"]),
                 _number(row["train_seconds"], 0), _number(row["train_cpu_seconds"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(configs: list[str], out_dir: str | Path, overrides: list[str] = (), seed: int = 0,
            base: bool = True, keep_artifacts: bool = False) -> dict:
    """Run every config (and the untrained model of the first, with ``base``), write
    ``{out_dir}/comparison.md``, ``comparison.json``, ``comparison.png`` and ``curves.png``, and return the JSON's
    content."""
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        raise FileNotFoundError(f"config file(s) not found: {missing}")
    if not configs:
        raise ValueError("compare needs at least one config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One seed for the data split, the curriculum draws, the validation positions, initialisation and sampling.
    common = [*overrides, "--seed_everything", str(seed), "--data.seed", str(seed), "--model.sample_seed", str(seed)]
    runs = [(configs[0], BASE_ROW, "base", False)] if base else []
    for index, config in enumerate(configs):
        stem = Path(config).stem
        # The same config twice (e.g. with different overrides in a script) still gets distinct rows and folders.
        suffix = f" ({index + 1})" if [Path(c).stem for c in configs].count(stem) > 1 else ""
        runs.append((config, METHOD_NAMES.get(stem, stem) + suffix, stem + suffix.replace(" (", "_").rstrip(")"), True))
    rows = []
    for config, label, run_name, train in runs:
        print(f"compare: {label} ({config}{'' if train else ', untrained'})", file=sys.stderr, flush=True)
        rows.append(evaluate_run(config, label, run_name, out_dir, common, train=train, keep_artifacts=keep_artifacts))
        # Rewritten after every row: a long comparison can be read while it runs, and an interrupted one keeps
        # the rows it finished.
        result, markdown = write_table(rows, out_dir, seed, overrides, pending=len(runs) - len(rows))
        write_charts(rows, out_dir)
    print(markdown)
    return result


def write_table(rows: list[dict], out_dir: Path, seed: int, overrides: list[str], pending: int = 0) -> tuple[dict, str]:
    """Write ``comparison.md`` and ``comparison.json`` for the rows so far; returns the JSON's content and the markdown."""
    trained_steps = {row["steps"] for row in rows if row["method"] != BASE_ROW}
    result = {
        "rows": rows,
        "summary": summary(rows),
        "seed": seed,
        "overrides": list(overrides),
        "same_steps": len(trained_steps) <= 1,
        "pending_rows": pending,
    }
    notes = [f"Accuracy in % on {rows[0]['positions']} held-out positions (nested splits easy H > t0, medium H > t1, "
             f"hard H > t2 under the proxy; avg = their unweighted mean); seed {seed}."]
    if pending:
        notes.append(f"{pending} more row(s) still to run.")
    if not result["same_steps"]:
        notes.append(f"WARNING: the trained rows ran different numbers of steps: {sorted(trained_steps)}.")
    if result["summary"].get("avg_relative_gain") is not None:
        s = result["summary"]
        ratio = s.get("reasoning_length_ratio")
        notes.append(f"RMT vs RPT-style: avg {s['rmt_avg']:.2f} vs {s['rpt_avg']:.2f} "
                     f"({s['avg_relative_gain']:+.1%} relative); reasoning length ratio "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}'}.")
    markdown = markdown_table(rows) + "\n\n" + "\n".join(notes) + "\n"
    (out_dir / "comparison.md").write_text(markdown)
    (out_dir / "comparison.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result, markdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rmt_lightning compare",
        description="Train configs for the same steps on the same data and seed, evaluate each, print the table. "
                    "Arguments after -- are LightningCLI overrides for every run (e.g. -- --config "
                    "configs/data/gsm8k.yaml --trainer.max_epochs 2).",
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="configs to compare, one row each")
    parser.add_argument("--out", default=os.path.join("logs", "compare"), help="folder of comparison.md/json/png, curves.png and runs/")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, positions, initialisation and sampling")
    parser.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                        help="add a row for the untrained model of the first config")
    parser.add_argument("--keep_artifacts", action="store_true", help="keep each run's checkpoint and HF export")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m rmt_lightning compare`` and ``python -m rmt_lightning.compare``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    return compare(args.configs, args.out, overrides, seed=args.seed, base=args.base, keep_artifacts=args.keep_artifacts)


if __name__ == "__main__":
    main()
