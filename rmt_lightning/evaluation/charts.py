"""The pictures ``compare`` writes beside its table.

- ``comparison.png``: next-token accuracy per split for each method with 95% Wilson intervals (in the mode the
  method is scored by, as in the table), the argmax accuracy per split beside it, and the mean reasoning length.
- ``curves.png``: reward, reasoning length and budget against the optimizer step, one line per row, read from
  each run's logs.

Each picture is drawn from plain data (``comparison_data``, ``curves_data``), so what a chart shows can be
checked, and redrawn elsewhere, without reading its pixels.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..method import TIER_NAMES
from ..runtime.atomic import staged_file

SPLITS = (*TIER_NAMES, "avg")
"""The accuracy columns of the table, in order."""

CURVES = {"train/reward": "reward", "train/reasoning_length": "reasoning length (tokens)", "train/budget": "budget B"}
"""The scalars ``curves.png`` draws, with their axis labels."""

LINE_STYLES = ("-", "--", "-.", ":")

Z_95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""


def wilson_interval(accuracy: float, positions: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy (a fraction in [0, 1]) measured on ``positions`` positions.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or 1, which small evaluations
    at low accuracy (most RL rows) hit. With several completions per position the accuracy is the mean over
    them, and the interval treats each position as one trial.
    """
    centre = (accuracy + z * z / (2 * positions)) / (1 + z * z / positions)
    half = z / (1 + z * z / positions) * math.sqrt(accuracy * (1 - accuracy) / positions + z * z / (4 * positions**2))
    # Rounding can put an end a hair past the estimate at 0 or 1 (0 of 500 gives a lower end of 4e-19).
    return min(accuracy, max(0.0, centre - half)), max(accuracy, min(1.0, centre + half))


def average_effective_positions(split_positions: dict[str, int]) -> float | None:
    """The effective number of positions (Kish: ``1 / sum_i w_i^2``) behind the avg accuracy, the unweighted
    mean of the nested splits that have positions.

    A position of split ``s`` weighs ``1 / n_s`` in that split's accuracy; as splits nest (a hard position is in
    all three), the avg weighs it ``w_i = (1/k) * sum over the k non-empty splits holding it of 1 / n_s``, and the
    weights add up to 1. The avg is then a weighted mean of per-position hits, whose variance is about
    ``p (1 - p) * sum_i w_i^2``: what ``1 / sum_i w_i^2`` equally weighted positions would give. None when no
    split has positions.
    """
    counts = [int(split_positions.get(split) or 0) for split in TIER_NAMES]
    present = [n for n in counts if n > 0]
    if not present:
        return None
    total, weight = 0.0, 0.0
    for index, n in enumerate(counts):
        if n <= 0:
            continue
        weight += 1.0 / (len(present) * n)
        # Positions in this split but not in the next (the splits nest: easy >= medium >= hard).
        only_here = n - (counts[index + 1] if index + 1 < len(counts) else 0)
        total += only_here * weight * weight
    return 1.0 / total


def _percent_interval(percent: float | None, positions: float | None) -> tuple[float, float] | None:
    if percent is None or not positions:
        return None
    low, high = wilson_interval(percent / 100.0, positions)
    return 100.0 * low, 100.0 * high


def split_intervals(percents: dict[str, float | None], split_positions: dict[str, int]) -> dict:
    """``split -> (low, high)`` in %: the 95% Wilson interval of each accuracy of ``SPLITS``, the avg's on its
    effective number of positions (``average_effective_positions``); None without an accuracy or positions."""
    positions = {split: split_positions.get(split) for split in TIER_NAMES}
    positions["avg"] = average_effective_positions(split_positions)
    return {split: _percent_interval(percents.get(split), positions[split]) for split in SPLITS}


def comparison_data(rows: list[dict]) -> list[dict]:
    """What ``comparison.png`` draws, one entry per row of the table: ``method``, ``scored_by``, ``accuracy`` and
    ``argmax`` (split -> % or None), their 95% Wilson ``accuracy_interval`` and ``argmax_interval`` (split ->
    (low, high) in % or None; see ``split_intervals``), and
    ``reasoning_length`` (None for a row scored by argmax)."""
    data = []
    for row in rows:
        positions = row.get("split_positions") or {}
        figures = row.get("figures") or {}
        argmax = {split: None if figures.get(f"val/ntp_acc_{split}") is None else 100.0 * figures[f"val/ntp_acc_{split}"]
                  for split in TIER_NAMES}
        argmax["avg"] = row.get("argmax_avg")
        accuracy = {split: row.get(split) for split in SPLITS}
        data.append({
            "method": row["method"],
            "scored_by": row.get("scored_by"),
            "accuracy": accuracy,
            "accuracy_interval": split_intervals(accuracy, positions),
            "argmax": argmax,
            "argmax_interval": split_intervals(argmax, positions),
            "reasoning_length": row.get("reasoning_length"),
        })
    return data


def read_scalars(log_dir: str | Path | None, tags=tuple(CURVES)) -> dict[str, tuple[list[int], list[float]]]:
    """``tag -> (steps, values)`` of a run's logged scalars: from its TensorBoard event files, or else from a
    CSVLogger's ``metrics.csv``; a tag never logged (or a run without either) gives empty lists."""
    curves = {tag: ([], []) for tag in tags}
    folder = Path(log_dir) if log_dir else None
    if folder is None or not folder.is_dir():
        return curves
    if any(folder.glob("events.out.tfevents*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in set(tags) & set(events.Tags()["scalars"]):
            points = events.Scalars(tag)
            curves[tag] = ([p.step for p in points], [p.value for p in points])
    elif (folder / "metrics.csv").is_file():
        with open(folder / "metrics.csv") as handle:
            for record in csv.DictReader(handle):
                for tag in tags:
                    if record.get(tag):
                        curves[tag][0].append(int(record["step"]))
                        curves[tag][1].append(float(record[tag]))
    return curves


def read_attempts(log_dirs: list[str | Path], tags=tuple(CURVES)) -> dict[str, tuple[list[int], list[float]]]:
    """``read_scalars`` over the attempts at one run, in order (a run resumed after an interruption logs to a new
    version folder): each attempt's points replace the earlier attempts' from its first logged step on, the steps
    it trained again."""
    merged = {tag: ([], []) for tag in tags}
    for log_dir in log_dirs:
        curves = read_scalars(log_dir, tags)
        firsts = [steps[0] for steps, _ in curves.values() if steps]
        if not firsts:
            continue
        for tag in tags:
            steps, values = merged[tag]
            kept = [i for i, step in enumerate(steps) if step < min(firsts)]
            merged[tag] = ([steps[i] for i in kept] + curves[tag][0], [values[i] for i in kept] + curves[tag][1])
    return merged


def curves_data(rows: list[dict]) -> list[dict]:
    """What ``curves.png`` draws: for every row, ``method`` and ``curves`` (``read_attempts`` of its ``log_dirs``,
    or ``read_scalars`` of its ``log_dir``; empty for the untrained row, which has no training steps)."""
    return [{"method": row["method"], "curves": read_attempts(row.get("log_dirs") or [row.get("log_dir")])} for row in rows]


def _figure(panels: int):
    # A bare Figure draws with the Agg canvas: no pyplot state, no display needed.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.4 * panels, 4.6), layout="constrained")
    return figure, figure.subplots(1, panels)


def _grouped_bars(axis, data: list[dict], key: str, title: str) -> None:
    width = 0.8 / max(1, len(data))
    for index, entry in enumerate(data):
        xs = [s + (index - (len(data) - 1) / 2) * width for s in range(len(SPLITS))]
        values = [math.nan if entry[key][s] is None else entry[key][s] for s in SPLITS]
        intervals = [entry[f"{key}_interval"][s] for s in SPLITS]
        # NaN draws no error bar where there is no interval (no accuracy, or no positions recorded).
        # matplotlib refuses negative error bars: an interval rebuilt from rounded percentages can miss its value.
        below = [math.nan if i is None else max(0.0, v - i[0]) for v, i in zip(values, intervals)]
        above = [math.nan if i is None else max(0.0, i[1] - v) for v, i in zip(values, intervals)]
        axis.bar(xs, values, width, yerr=[below, above], capsize=2, color=f"C{index % 10}", label=entry["method"])
    axis.set_xticks(range(len(SPLITS)), SPLITS)
    axis.set_ylabel("next-token accuracy (%)")
    axis.set_title(title)
    axis.set_ylim(bottom=0)


def _legend(figure, axes) -> None:
    """One legend above the panels, each method once, so it hides no bar or line."""
    entries = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(entries.values(), entries.keys(), loc="outside upper center", ncols=min(len(entries), 5),
                      fontsize="small")


def draw_comparison(data: list[dict], path: str | Path) -> Path:
    """Draw ``comparison_data`` as ``path`` (PNG): the accuracy the table scores each method by, the argmax
    accuracy, and the mean reasoning length, one colour per method in every panel."""
    figure, (scored, argmax, lengths) = _figure(3)
    _grouped_bars(scored, data, "accuracy", "accuracy as scored (95% Wilson intervals)")
    _grouped_bars(argmax, data, "argmax", "argmax (NTP-mode) accuracy")
    _legend(figure, [scored])
    for index, entry in enumerate(data):
        value = entry["reasoning_length"]
        lengths.bar(index, math.nan if value is None else value, color=f"C{index % 10}")
        if value is None:
            lengths.text(index, 0, "n/a", ha="center", va="bottom")
    lengths.set_xticks(range(len(data)), [entry["method"] for entry in data], rotation=30, ha="right", fontsize="small")
    lengths.set_ylabel("tokens inside <think>")
    lengths.set_title("mean reasoning length")
    figure.savefig(path, dpi=100, format="png")
    return Path(path)


def draw_curves(data: list[dict], path: str | Path) -> Path:
    """Draw ``curves_data`` as ``path`` (PNG): one panel per scalar of ``CURVES``, one line per row that logged it."""
    return _draw_lines(data, CURVES, path)


def _draw_lines(data: list[dict], curves: dict[str, str], path: str | Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(len(curves))
    for axis, (tag, label) in zip(axes, curves.items()):
        for index, entry in enumerate(data):
            steps, values = entry["curves"][tag]
            if steps:
                # Rows often share a curve (the budget of two configs with one schedule): a line style per row
                # keeps the one drawn first visible under the next.
                axis.plot(steps, values, marker="." if len(steps) < 50 else None, color=f"C{index % 10}",
                          linestyle=LINE_STYLES[index % len(LINE_STYLES)], label=entry["method"])
        if not axis.lines:
            axis.text(0.5, 0.5, "not logged", transform=axis.transAxes, ha="center")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(label)
        axis.set_title(tag)
    _legend(figure, axes)
    figure.savefig(path, dpi=100, format="png")
    return Path(path)


def write_charts(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``{out_dir}/comparison.png`` and ``{out_dir}/curves.png`` for the rows; returns their paths."""
    out_dir = Path(out_dir)
    drawn = []
    for name, draw, data in (("comparison.png", draw_comparison, comparison_data(rows)), ("curves.png", draw_curves, curves_data(rows))):
        # Drawn beside the picture and renamed over it: a kill while drawing leaves the previous one whole.
        with staged_file(out_dir / name) as staging:
            draw(data, staging)
        drawn.append(out_dir / name)
    return tuple(drawn)


POSTTRAIN_CURVES = {"train/reward_correct": "share of completions right", "val/answer_acc": "held-out answer accuracy"}
"""The scalars Table B's ``curves.png`` draws."""


def draw_posttrain(rows: list[dict], path: str | Path) -> Path:
    """Draw Table B's rows as ``path`` (PNG): each start's held-out answer accuracy before and after post-training
    with its 95% Wilson interval, and the answer rates."""
    figure, (accuracy, rate) = _figure(2)
    starts = list(dict.fromkeys(row["method"] for row in rows))
    for offset, trained, label in ((-0.2, False, "before"), (0.2, True, "after")):
        chosen = {row["method"]: row for row in rows if row["trained"] == trained}
        xs = [i + offset for i, start in enumerate(starts) if start in chosen]
        picked = [chosen[start] for start in starts if start in chosen]
        values = [row["answer_acc"] for row in picked]
        intervals = [row.get("answer_acc_interval") or [v, v] for row, v in zip(picked, values)]
        errors = [[max(0.0, v - i[0]) for v, i in zip(values, intervals)], [max(0.0, i[1] - v) for v, i in zip(values, intervals)]]
        colour = "C0" if not trained else "C1"
        accuracy.bar(xs, values, 0.4, yerr=errors, capsize=3, color=colour, label=label)
        rate.bar(xs, [100.0 * (row["answer_rate"] or 0.0) for row in picked], 0.4, color=colour, label=label)
    for axis, title, unit in ((accuracy, "held-out answer accuracy (95% Wilson intervals)", "answer accuracy (%)"),
                              (rate, "answer rate", "completions with an answer (%)")):
        axis.set_xticks(range(len(starts)), starts, rotation=30, ha="right", fontsize="small")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.set_ylim(bottom=0)
    _legend(figure, [accuracy])
    figure.savefig(path, dpi=100, format="png")
    return Path(path)


def write_posttrain_charts(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write Table B's ``{out_dir}/comparison.png`` (before and after) and ``curves.png`` (each post-training run's
    training correctness and held-out accuracy against step)."""
    out_dir = Path(out_dir)
    trained = [{"method": row["method"], "curves": read_attempts(row.get("log_dirs") or [row.get("log_dir")],
                                                                 tuple(POSTTRAIN_CURVES))}
               for row in rows if row["trained"]]
    with staged_file(out_dir / "comparison.png") as staging:
        draw_posttrain(rows, staging)
    with staged_file(out_dir / "curves.png") as staging:
        _draw_lines(trained, POSTTRAIN_CURVES, staging)
    return out_dir / "comparison.png", out_dir / "curves.png"
