"""``python -m rmt_lightning compare``: the paper's table for your model and corpus.

Each config is trained for the same number of steps on the same data and seed, then its finished model is
evaluated once on the same held-out positions (reasoning mode at the config's final budget, and NTP mode), and
the rows are written as a markdown table, as JSON, and as two pictures (``comparison.png``: accuracy per split
with 95% intervals, argmax accuracy, reasoning length; ``curves.png``: reward, reasoning length and budget
against step, from each run's logs). Arguments after ``--`` are LightningCLI overrides given
to every run, e.g. a corpus or a shorter schedule::

    python -m rmt_lightning compare --configs configs/rmt.yaml configs/rpt_baseline.yaml configs/ntp_only.yaml \\
        --out logs/compare -- --config configs/data/gsm8k.yaml --trainer.max_epochs 2

``--start`` gives every row (and the untrained row) one starting model, a Hugging Face folder or a checkpoint
this project wrote, so the rows differ only in their method. Runs go one after the other in this process, each
built by the same LightningCLI as ``fit``. A comparison resumes: run the same command again and the rows it
finished are kept, an interrupted row goes on from its last checkpoint, and a row recorded with other inputs
stops the command before any work.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from ..callbacks import HuggingFaceExport, Preempted
from ..method import TIER_NAMES, nested_tier_masks
from ..runtime.atomic import staged_file
from ..runtime.errors import InputError
from ..evaluation.charts import split_intervals, write_charts, write_posttrain_charts
from .compare_rows import (
    BASE_ROW, METHOD_NAMES, ROWS_FOLDER, Row, build_run, check_records, check_start, check_start_tokenizer,
    export_start, now_utc, plan_posttrain_rows, plan_rows, starting_models, write_json,
)

DEFAULT_CONFIGS = ("configs/rmt.yaml", "configs/rpt_baseline.yaml", "configs/ntp_only.yaml")
"""The paper's main rows: RMT, the RPT-style baseline and the NTP baseline."""


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def split_positions(data) -> dict[str, int]:
    """Held-out positions in each nested split (the number behind each accuracy), as this process evaluated them."""
    members = nested_tier_masks(data.val_candidates.tier[data.eval_positions()])
    return dict(zip(TIER_NAMES, (int(n) for n in members.sum(0))))


class _FirstStep(L.Callback):
    """The optimizer step training starts from: 0, or the step of the checkpoint a resumed row restored."""

    step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = int(trainer.global_step)


def _version_folders(run_root: Path) -> list[Path]:
    """The run's ``version_N`` folders in the order they were made: one per attempt at the row."""
    found = [p for p in run_root.glob("version_*") if p.is_dir() and p.name[8:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[8:]))


def tier_figures(figures: dict, data) -> dict:
    """A mid-training row's figures: accuracy in % by nested split (reasoning mode, else the argmax), reasoning
    length, answer rate, argmax accuracy, the evaluation budget and the positions behind each split."""
    scored_by = figures["scored_by"]
    prefix = "val/acc" if scored_by == "reasoning" else "val/ntp_acc"
    return {
        **{split: _percent(figures.get(f"{prefix}_{split}")) for split in (*TIER_NAMES, "avg")},
        "reasoning_length": figures.get("val/reasoning_length") if scored_by == "reasoning" else None,
        "answer_rate": figures.get("val/answer_rate"),
        "argmax_avg": _percent(figures.get("val/ntp_acc_avg")),
        "eval_budget": figures.get("budget"),
        "positions": figures.get("positions"),
        "split_positions": split_positions(data),
    }


def answer_figures(figures: dict) -> dict:
    """A post-training row's figures: held-out answer accuracy and pass@k in %, with their 95% intervals, the
    answer rate, the response length and the number of questions."""
    percent = {name: _percent(figures.get(f"val/{name}")) for name in ("answer_acc", "answer_pass_at_k")}
    intervals = {f"{name}_interval": [100.0 * end for end in figures[f"val/{name}_interval"]]
                 for name in ("answer_acc", "answer_pass_at_k") if figures.get(f"val/{name}_interval")}
    return {**percent, **intervals, "answer_rate": figures.get("val/answer_rate"),
            "response_length": figures.get("val/response_length"), "questions": figures.get("questions")}


def evaluate_run(config: str, label: str, run_name: str, out_dir: Path, overrides: list[str], train: bool = True,
                 keep_artifacts: bool = False, resume: bool = False) -> dict:
    """Build ``config`` with ``overrides`` through the project's LightningCLI, fit it (unless ``train`` is
    False), validate the finished model once, and return its row of the table, labelled ``label``. The run
    logs to ``{out_dir}/runs/{run_name}/version_N``; with ``resume``, training goes on from the newest
    checkpoint in any of those version folders (the CLI's ``--ckpt_path last``)."""
    from ..cli import find_last_checkpoint

    args = ["--config", config, *overrides, "--trainer.logger.init_args.save_dir", str(out_dir / "runs"),
            "--trainer.logger.init_args.name", run_name]
    cli = build_run(args)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if not keep_artifacts:
        # Epoch-end checkpoints and exports of every row would cost minutes and gigabytes, and the table needs
        # neither. The periodic and preemption checkpoints stay: an interrupted row resumes from them.
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, (ModelCheckpoint, HuggingFaceExport))]
    first_step = _FirstStep()
    trainer.callbacks.append(first_step)
    # Score the corpus before the clock starts, so a cold entropy cache is not charged to the first row (with
    # several processes they score it together inside fit).
    data.prepare_data()
    if trainer.world_size == 1 and hasattr(data, "score_corpus"):
        data.trainer = trainer  # the device that scores decides the proxy's precision, so the key fit will use
        data.score_corpus()
    train_seconds = train_cpu_seconds = 0.0
    resumed_from = None
    if train:
        resumed_from = find_last_checkpoint(trainer) if resume else None
        # The table reads one evaluation of the finished model; validating during fit too would only cost time.
        limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=data, ckpt_path=resumed_from)
        # CPU time as well as wall time: on a shared machine, wall time also counts other processes' load.
        train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        trainer.limit_val_batches = limit_val_batches
    started = time.perf_counter()
    trainer.validate(model, datamodule=data, verbose=False)
    eval_seconds = time.perf_counter() - started
    figures = dict(model.last_evaluation)
    row = {
        "method": label,
        "config": config,
        "trained": train,
        "scored_by": figures["scored_by"],
        **(answer_figures(figures) if figures["scored_by"] == "answer" else tier_figures(figures, data)),
        "steps": int(trainer.global_step),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "eval_seconds": eval_seconds,
        "model": model.hparams.model_name_or_path,
        "proxy": getattr(data, "proxy_source", None),
        "resumed_from": resumed_from,
        "resumed_at_step": first_step.step if resumed_from else None,
        "log_dir": trainer.log_dir,
        "log_dirs": [str(p) for p in _version_folders(out_dir / "runs" / run_name)],
        "figures": figures,
    }
    del cli, trainer, model, data
    gc.collect()
    return row


def run_row(row: Row, record: dict | None, out_dir: Path, keep_artifacts: bool) -> dict:
    """Run one row, resuming it when ``record`` says an earlier attempt did not finish; its record is written
    before it starts and again, with its figures, when it has finished. Returns the table's row."""
    path = out_dir / ROWS_FOLDER / f"{row.run_name}.json"
    attempts = (record or {}).get("attempts", 0) + 1
    write_json(path, {"run_name": row.run_name, "method": row.label, "config": row.config, "status": "running",
                       "attempts": attempts, "started": now_utc(), "definition": row.definition})
    resume = record is not None and row.train
    note = ", untrained" if not row.train else f", resuming (attempt {attempts})" if resume else ""
    print(f"compare: {row.label} ({row.config}{note})", file=sys.stderr, flush=True)
    result = evaluate_run(row.config, row.label, row.run_name, out_dir, row.arguments, train=row.train,
                          keep_artifacts=keep_artifacts, resume=resume)
    write_json(path, {"run_name": row.run_name, "method": row.label, "config": row.config, "status": "finished",
                       "attempts": attempts, "finished": now_utc(), "definition": row.definition, "row": result})
    if not keep_artifacts:
        # After the record: a kill in between leaves checkpoints of a finished row, never a row without them.
        for folder in (out_dir / "runs" / row.run_name).glob("version_*/checkpoints"):
            shutil.rmtree(folder, ignore_errors=True)
    return result


# ---- the comparison ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableB:
    """The paper's Table B: every start post-trained by one config."""

    config: str
    """The post-training config (``configs/posttrain/``)."""
    starts: tuple[str, ...]
    """The starting models, ``NAME=MODEL`` (or ``MODEL``)."""


def compare(configs: list[str], out_dir: str | Path, overrides: list[str] = (), seed: int = 0,
            base: bool = True, keep_artifacts: bool = False, start: str | None = None,
            table_b: TableB | None = None) -> dict:
    """Run every config (and the untrained model of the first, with ``base``), each from ``start`` when given,
    write ``{out_dir}/comparison.md``, ``comparison.json``, ``comparison.png`` and ``curves.png``, and return the
    JSON's content. Rows an earlier run of the same comparison finished are kept; an unfinished one resumes.

    With ``table_b``, Table B instead: each of its starts is evaluated, post-trained by its config and evaluated
    again, and the table gives each start's answer accuracy before and after (``configs`` is not read)."""
    posttrain = table_b.config if table_b is not None else None
    if posttrain is not None:
        configs = [posttrain]
    if not configs:
        raise InputError("compare needs at least one config (--configs)")
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        raise InputError(f"config file(s) not found: {missing} (relative paths are read from {os.getcwd()}); give "
                         "existing YAML files, e.g. the configs/ of this repository")
    out_dir = Path(out_dir)
    if posttrain is not None and start is not None:
        raise InputError("--start gives the mid-training rows one model; with --posttrain, give the models as --starts")
    started = check_start(start, out_dir) if start is not None else None
    # One seed for the data split, the curriculum draws, the validation positions, initialisation and sampling.
    common = [*overrides, "--seed_everything", str(seed), "--data.seed", str(seed), "--model.sample_seed", str(seed)]
    if posttrain is not None:
        rows = plan_posttrain_rows(posttrain, starting_models(list(table_b.starts)), common)
    else:
        rows = plan_rows(list(configs), common, base, started)
    records = check_records(out_dir, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    if started is not None:
        export_start(started)
        check_start_tokenizer(started, [row.proxy for row in rows])
    finished = []
    for row in rows:
        record = records[row.run_name]
        if record is not None and record.get("status") == "finished":
            # Its run folder is left as it is: what an earlier --keep_artifacts kept stays.
            print(f"compare: {row.label}: kept, finished {record['finished']} ({ROWS_FOLDER}/{row.run_name}.json)",
                  file=sys.stderr, flush=True)
            finished.append(record["row"])
        else:
            finished.append(run_row(row, record, out_dir, keep_artifacts))
        # Rewritten after every row: a long comparison can be read while it runs, and an interrupted one keeps
        # the rows it finished.
        if posttrain is not None:
            result, markdown = write_posttrain_table(finished, out_dir, seed, overrides, pending=len(rows) - len(finished))
            write_posttrain_charts(finished, out_dir)
        else:
            result, markdown = write_table(finished, out_dir, seed, overrides, pending=len(rows) - len(finished),
                                           start=started)
            write_charts(finished, out_dir)
    print(markdown)
    return result


def summary(rows: list[dict]) -> dict:
    """RMT against the RPT-style row, when both are there: the relative gain in average accuracy, whether the two
    avg accuracies' 95% intervals are disjoint, and the reasoning-length ratio (the paper: 59.12 vs 35.85,
    +64.91%; 186 vs 872 tokens, 21%)."""
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
    ours, theirs = (split_intervals(row, row.get("split_positions") or {})["avg"] for row in (rmt, rpt))
    if ours is not None and theirs is not None:
        # Disjoint 95% intervals: a difference beyond the noise of either row's positions.
        out["avg_intervals_disjoint"] = ours[1] < theirs[0] or theirs[1] < ours[0]
    return out


def _number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _with_interval(value: float | None, interval: tuple[float, float] | None) -> str:
    if value is None or interval is None:
        return _number(value)
    return f"{_number(value)} [{interval[0]:.1f}, {interval[1]:.1f}]"


def markdown_table(rows: list[dict]) -> str:
    """The paper-style table: accuracy in %, by nested entropy split, each with its 95% Wilson interval in
    brackets (``charts.split_intervals``), with reasoning length and wall time."""
    columns = ["method", "scored by", "easy", "medium", "hard", "avg", "reasoning length", "answer rate",
               "argmax avg", "eval budget", "steps", "train time (s)", "train CPU time (s)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        positions = row.get("split_positions") or {}
        intervals = split_intervals(row, positions)
        argmax_interval = split_intervals({"avg": row["argmax_avg"]}, positions)["avg"]
        cells = [row["method"], row["scored_by"], *(_with_interval(row[s], intervals[s]) for s in (*TIER_NAMES, "avg")),
                 _number(row["reasoning_length"], 1), _number(row["answer_rate"]),
                 _with_interval(row["argmax_avg"], argmax_interval),
                 str(row["eval_budget"] if row["scored_by"] == "reasoning" else "-"), str(row["steps"]),
                 _number(row["train_seconds"], 0), _number(row["train_cpu_seconds"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(rows: list[dict], out_dir: Path, seed: int, overrides: list[str], pending: int = 0,
                start: dict | None = None) -> tuple[dict, str]:
    """Write ``comparison.md`` and ``comparison.json`` for the rows so far; returns the JSON's content and the markdown."""
    trained_steps = {row["steps"] for row in rows if row.get("trained", row["method"] != BASE_ROW)}
    result = {
        "rows": rows,
        "summary": summary(rows),
        "seed": seed,
        "overrides": list(overrides),
        "start": start,
        "same_steps": len(trained_steps) <= 1,
        "pending_rows": pending,
    }
    notes = [f"Accuracy in % on {rows[0]['positions']} held-out positions (nested splits easy H > t0, medium H > t1, "
             f"hard H > t2 under the proxy; avg = their unweighted mean); seed {seed}. In brackets: the 95% Wilson "
             "interval, on the split's positions (the avg's on its effective number of positions, 1 / sum of its "
             "squared weights per position)."]
    if start is not None:
        proxies = sorted({row["proxy"] for row in rows if row.get("proxy")})
        notes.append(f"Every row starts from {start['given']} ({start['kind']}, SHA-256 {start['sha256'][:12]}); "
                     f"entropy proxy: {', '.join(proxies)}.")
    for row in rows:
        if row.get("resumed_from"):
            notes.append(f"{row['method']} resumed from step {row['resumed_at_step']} ({row['resumed_from']}): its "
                         "train times count the steps since.")
    if pending:
        notes.append(f"{pending} more row(s) still to run.")
    if not result["same_steps"]:
        notes.append(f"WARNING: the trained rows ran different numbers of steps: {sorted(trained_steps)}.")
    if result["summary"].get("avg_relative_gain") is not None:
        s = result["summary"]
        ratio = s.get("reasoning_length_ratio")
        disjoint = s.get("avg_intervals_disjoint")
        beyond = "" if disjoint is None else "; their 95% intervals are disjoint" if disjoint else "; their 95% intervals overlap"
        notes.append(f"RMT vs RPT-style: avg {s['rmt_avg']:.2f} vs {s['rpt_avg']:.2f} "
                     f"({s['avg_relative_gain']:+.1%} relative{beyond}); reasoning length ratio "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}'}.")
    markdown = markdown_table(rows) + "\n\n" + "\n".join(notes) + "\n"
    with staged_file(out_dir / "comparison.md") as staging:
        staging.write_text(markdown)
    write_json(out_dir / "comparison.json", result)
    return result, markdown


def posttrain_table(rows: list[dict]) -> str:
    """Table B: each starting model's held-out answer accuracy (%) before and after post-training, with 95% Wilson
    intervals over the questions, the answer rates and the steps."""
    columns = ["start", "before: answer acc", "after: answer acc", "gain (points)", "answer rate before / after",
               "pass@k after", "steps", "train time (s)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    by_start: dict[str, dict] = {}
    for row in rows:
        by_start.setdefault(row["method"], {})["after" if row["trained"] else "before"] = row
    for start, pair in by_start.items():
        before, after = pair.get("before"), pair.get("after")
        acc = [None if r is None else _with_interval(r["answer_acc"], r.get("answer_acc_interval")) for r in (before, after)]
        gain = (after["answer_acc"] - before["answer_acc"]) if before and after else None
        rates = " / ".join(_number(None if r is None else r["answer_rate"]) for r in (before, after))
        cells = [start, acc[0] or "pending", acc[1] or "pending", _number(gain), rates,
                 _with_interval(after["answer_pass_at_k"], after.get("answer_pass_at_k_interval")) if after else "pending",
                 str(after["steps"]) if after else "-", _number(after["train_seconds"], 0) if after else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_posttrain_table(rows: list[dict], out_dir: Path, seed: int, overrides: list[str], pending: int = 0) -> tuple[dict, str]:
    """Write Table B's ``comparison.md`` and ``comparison.json`` for the rows so far."""
    result = {"rows": rows, "seed": seed, "overrides": list(overrides), "pending_rows": pending, "table": "posttrain"}
    questions = rows[0].get("questions")
    notes = [f"Answer accuracy in % on {questions} held-out questions, before and after post-training each start with "
             f"{rows[0]['config']} (same data, steps and seed {seed}). In brackets: the 95% Wilson interval over the "
             "questions. Answer rate: the share of completions with a boxed answer at all."]
    if pending:
        notes.append(f"{pending} more row(s) still to run.")
    markdown = posttrain_table(rows) + "\n\n" + "\n".join(notes) + "\n"
    with staged_file(out_dir / "comparison.md") as staging:
        staging.write_text(markdown)
    write_json(out_dir / "comparison.json", result)
    return result, markdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rmt_lightning compare",
        description="Train configs for the same steps on the same data and seed, evaluate each, print the table. "
                    "Arguments after -- are LightningCLI overrides for every run (e.g. -- --config "
                    "configs/data/gsm8k.yaml --trainer.max_epochs 2). Run the same command again to resume: "
                    "finished rows are kept, an interrupted row goes on from its last checkpoint.",
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="configs to compare, one row each")
    parser.add_argument("--out", default=os.path.join("logs", "compare"),
                        help="folder of comparison.md/json/png, curves.png, rows/ (one record per row) and runs/")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, positions, initialisation and sampling")
    parser.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                        help="add a row for the untrained model of the first config (the --start model with --start)")
    parser.add_argument("--start", default=None, metavar="MODEL",
                        help="model every row starts from: a Hugging Face folder (e.g. a format stage's hf_export) or a "
                             ".ckpt file this project wrote (its policy is exported once to OUT/start/model); the "
                             "entropy proxy stays the one the configs name")
    parser.add_argument("--posttrain", default=None, metavar="CONFIG",
                        help="Table B: post-train every --starts model with this post-training config (configs/posttrain/) "
                             "and tabulate its answer accuracy before and after; --configs is not read")
    parser.add_argument("--starts", nargs="+", default=[], metavar="NAME=MODEL",
                        help="with --posttrain: the starting models (Hugging Face folders such as a mid-trained run's "
                             "hf_export, built-in models or hub ids), each named for its rows")
    parser.add_argument("--keep_artifacts", action="store_true",
                        help="keep each run's checkpoints and HF export (otherwise a row's checkpoints are deleted once it has finished)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m rmt_lightning compare`` and ``python -m rmt_lightning.compare``: a bad input ends
    with one line and exit status 2, a preemption signal with one line naming the checkpoint and 128 + the
    signal's number."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    try:
        return compare(args.configs, args.out, overrides, seed=args.seed, base=args.base,
                       keep_artifacts=args.keep_artifacts, start=args.start,
                       table_b=TableB(args.posttrain, tuple(args.starts)) if args.posttrain else None)
    except InputError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
    except Preempted as stopped:
        sys.stderr.write(f"{signal.Signals(stopped.signum).name} received: stopped after step {stopped.step}; checkpoint "
                         f"written to {stopped.path}; run the same compare command again to resume\n")
        sys.exit(stopped.exit_status)


if __name__ == "__main__":
    main()
