"""One table of every benchmark's ratios, from the JSON files the benchmarks wrote (``results/*.json``).

    python benchmarks/summary.py            # prints markdown and writes results/summary.md

Ratios come first, each with its target and whether it was met; the raw figures follow per benchmark. Where
several files measured the same case, the one later in ``ROLLOUTS`` / ``BUDGET_STEPS`` (the newer run) is shown.
"""

from __future__ import annotations

import json

from common import RESULTS_DIR, budget_row_path, fmt


def _load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


ROLLOUTS = ("rollout", "rollout_p4", "rollout_p1_quiet", "rollout_p1_decode", "rollout_p1_packed")
"""Rollout result files, oldest first: a later file's row replaces an earlier one of the same case."""
BUDGET_STEPS = ("budget_step", "budget_step_quiet", "budget_step_decode", "budget_step_packed", "budget_step_packed_rounds",
                "budget_step_g8")
"""Budget-step result files, oldest first: a later file's row replaces an earlier one of the same case (model, B_0,
P, G, row)."""


def _short(model: str) -> str:
    return model.removeprefix("builtin:")


def main() -> None:
    lines = ["| benchmark | case | ratio | target | met | peak memory (MB), ours / other |", "| --- | --- | --- | --- | --- | --- |"]
    machine = None
    # Targets of SmolLM2's rows (context, new tokens): the tiny model is too small for them to mean anything.
    rollout_targets = {(1024, 32): 4.0, (1024, 256): 2.5, (256, 256): 1.5}
    cases: dict[tuple, dict] = {}
    for name in ROLLOUTS:
        rollout = _load(name)
        if not rollout:
            continue
        machine = rollout["machine"]
        for r in rollout["rows"]:
            cases[r["model"], r["prompts"], r["context"], r["cap"], r["G"]] = {**r, "file": name}
    for r in cases.values():
        goal = rollout_targets.get((r["context"], r["cap"])) if "smollm2" in r["model"] else None
        target = f">= {goal:g}x" if goal else "-"
        met = ("yes" if r["ratio"] >= goal else "no") if goal else "-"
        before = f" (copied cache {r['copied_ratio']:.2f}x)" if "copied_ratio" in r else ""
        if "unpacked_ratio" in r:
            before += f" (unpacked {r['unpacked_ratio']:.2f}x; against generate packed {r['ratio_vs_generate_packed']:.2f}x)"
        lines.append(f"| rollout tokens/s, ours / generate | {_short(r['model'])}, {r['prompts']} prompt(s), context "
                     f"{r['context']}, cap {r['cap']}, G {r['G']} ({r['file']}) | {r['ratio']:.2f}x{before} | {target} | {met} | "
                     f"{fmt(r['ours_peak_mb'], 0)} / {fmt(r['generate_peak_mb'], 0)} |")
    rl = _load("rl_step")
    if rl:
        machine = machine or rl["machine"]
        r = rl["row"]
        lines.append(f"| RL step time, ours / TRL GRPOTrainer | {_short(r['model'])}, P {r['P']}, G {r['G']}, max completion "
                     f"{r['max_completion']} | {r['ratio']:.2f}x | <= 0.5x | {'yes' if r['ratio'] <= 0.5 else 'no'} | "
                     f"{fmt(r['ours_peak_mb'], 0)} / {fmt(r['trl_peak_mb'], 0)} |")
    entropy = _load("entropy")
    if entropy:
        machine = machine or entropy["machine"]
        for r in entropy["rows"]:
            lines.append(f"| entropy scoring tokens/s, ours / bare forward | {_short(r['model'])}, {r['windows']} windows | "
                         f"{r['ratio']:.2f}x | >= 0.8x | {'yes' if r['ratio'] >= 0.8 else 'no'} | "
                         f"{fmt(r['ours_peak_mb'], 0)} / {fmt(r['bare_peak_mb'], 0)} |")
    steps: dict[tuple, tuple[dict, dict, dict, str]] = {}
    for name in BUDGET_STEPS:
        budget = _load(name)
        if not budget:
            continue
        machine = machine or budget["machine"]
        a = budget["args"]
        by_row = {r["row"]: r for r in budget["rows"]}
        for r in budget["rows"]:
            if not r["row"].startswith("RPT"):
                baseline = by_row["RPT, B=B_0" + budget_row_path(r["row"])]
                steps[a["model"], a["b0"], a["prompts"], a["group_size"], r["row"]] = (r, a, baseline, name)
    for r, a, base, name in steps.values():
        case = f"{_short(a['model'])}, B_0 {a['b0']} -> {r['budget']}, P {a['prompts']}, G {a['group_size']} ({name})"
        if "updates per rollout" in r["row"]:
            lines.append(f"| time per trained position, {r['row']} / 1 update | {case} | "
                         f"{r['position_ratio_to_one_update']:.2f}x | < 1x | "
                         f"{'yes' if r['position_ratio_to_one_update'] < 1 else 'no'} | {fmt(r['peak_mb'], 0)} / - |")
            continue
        met = "yes" if r["ratio"] <= 0.35 else "no"
        against = "RPT at B_0" + budget_row_path(r["row"])
        lines.append(f"| step time, {r['row']} / {against} | {case} | {r['ratio']:.2f}x | <= 0.35x | {met} | "
                     f"{fmt(r['peak_mb'], 0)} / {fmt(base['peak_mb'], 0)} |")
    text = "\n".join(lines)
    if machine:
        text = (f"Measured on: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('torch_threads')} torch "
                f"thread(s), torch {machine.get('torch')}, transformers {machine.get('transformers')}"
                + (f", GPU {machine['gpu']}" if machine.get("gpu") else "") + "\n\n" + text)
    print(text)
    (RESULTS_DIR / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
