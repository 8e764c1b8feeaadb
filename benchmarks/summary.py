"""One table of every benchmark's ratios, from the JSON files the benchmarks wrote (``results/*.json``).

    python benchmarks/summary.py            # prints markdown and writes results/summary.md

Ratios come first, each with its target and whether it was met; the raw figures follow per benchmark.
"""

from __future__ import annotations

import json

from common import RESULTS_DIR, fmt


def _load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _short(model: str) -> str:
    return model.removeprefix("builtin:")


def main() -> None:
    lines = ["| benchmark | case | ratio | target | met | peak memory (MB), ours / other |", "| --- | --- | --- | --- | --- | --- |"]
    machine = None
    rollout = _load("rollout")
    if rollout:
        machine = rollout["machine"]
        for r in rollout["rows"]:
            target = ">= 2x" if r["context"] == 1024 else "-"
            met = ("yes" if r["ratio"] >= 2 else "no") if r["context"] == 1024 else "-"
            lines.append(f"| rollout tokens/s, ours / generate | {_short(r['model'])}, context {r['context']}, cap {r['cap']}, "
                         f"G {r['G']} | {r['ratio']:.2f}x | {target} | {met} | {fmt(r['ours_peak_mb'], 0)} / {fmt(r['generate_peak_mb'], 0)} |")
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
    budget = _load("budget_step")
    if budget:
        machine = machine or budget["machine"]
        a = budget["args"]
        base = next(r for r in budget["rows"] if r["row"].startswith("RPT"))
        for r in budget["rows"]:
            if r is base:
                continue
            met = "yes" if r["ratio"] <= 0.35 else "no"
            lines.append(f"| step time, {r['row']} / RPT at B_0 | {_short(a['model'])}, B_0 {a['b0']} -> {r['budget']}, "
                         f"P {a['prompts']}, G {a['group_size']} | {r['ratio']:.2f}x | <= 0.35x | {met} | "
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
