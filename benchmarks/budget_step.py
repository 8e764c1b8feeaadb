"""What the decaying budget saves: an RMT step at the final budget against an RPT-style step with B fixed at B_0,
on the same batch, same model, same G, in one process.

    python benchmarks/budget_step.py                    # SmolLM2-135M, B_0 64 -> final 12 (gamma 0.2)
    python benchmarks/budget_step.py --b0 8 --gamma 0.25 --b_min 2     # the quickstart's schedule
    python benchmarks/budget_step.py --group_size 8 --micro_batch 16   # the paper's G (two prompts per pass)

The final budget is ``token_budget`` at progress 1 (``max(b_min, floor(b0 * gamma))``), the paper's schedule
scaled to a CPU. Rows:
- ``RPT, B=B_0``: ``configs/rpt_baseline.yaml``'s module settings (no length reward, lambda 0) at B_0;
- ``RMT, final B``: ``configs/rmt.yaml``'s settings (length reward 0.1, NTP lambda 0.1) at the final budget;
- ``RMT, final B, NTP off``: the same without the NTP pass, to show which part of the step the budget acts on;
- ``..., copied cache``: RPT and RMT with ``share_prompt_attention=False`` (each completion reads its own copy of
  the prompt's keys and values: the path before shared-prompt attention), so the ratio before and after is
  measured in the same command;
- ``..., unpacked``: RPT and RMT with ``prepack_weights=False`` (decoding multiplies by the weights as the model
  holds them: the path before the weights were packed once per rollout for oneDNN);
- ``RMT, final B, 2 updates per rollout``: ``updates_per_rollout=2``; its figure is the time per trained position
  (each rollout trains its positions twice) against the one-update RMT row's.
Budget forcing is on in all (as in both configs), so thinking runs to its cap ``2B`` unless the model
closes it. Each row trains ``warmup + steps`` steps on a fresh model; medians of the timed steps. Ratio =
row / RPT step time (target <= 0.35 for RMT). Written to ``results/budget_step.json``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import (PeakMemory, add_common_arguments, apply_threads, budget_row_path, print_table, quiet_transformers,
                    write_json)
from harness import corpus_batch, make_module, run_steps
from rmt_lightning.method import token_budget
from rmt_lightning.engine.models import BUILTIN_SMOLLM2, load_tokenizer


def run(args, batch, budget: int, ntp_weight: float, length_reward_weight: float, share_prompt: bool = True,
        updates: int = 1, prepack: bool = True) -> dict:
    torch.manual_seed(args.seed)
    module = make_module(
        model_name_or_path=args.model, lr=2e-5, group_size=args.group_size, beta=0.01, ntp_weight=ntp_weight,
        length_reward_weight=length_reward_weight, answer_allowance=args.answer_allowance, budget_forcing=True,
        budget=budget, rl_micro_batch_size=args.micro_batch, sample_seed=args.seed, dtype=args.dtype,
        share_prompt_attention=share_prompt, updates_per_rollout=updates, prepack_weights=prepack,
    )
    # Whole rollouts only: the warm-up and the timed steps each cover complete rollouts.
    warmup, steps = args.warmup * updates, args.steps * updates
    with PeakMemory() as memory:
        timer = run_steps(module, batch, steps=warmup + steps)
    timed = timer.steps[warmup:]
    med = lambda key: statistics.median(s.get(key, float("nan")) for s in timed)  # noqa: E731
    return {
        "budget": budget, "step_s": med("wall"), "step_cpu_s": med("cpu"), "generate_s": med("timing/generate"),
        "update_s": med("timing/update"), "completion_length": med("train/completion_length"),
        "reasoning_length": med("train/reasoning_length"), "peak_mb": memory.mb, "steps": timer.steps,
        # A rollout's steps differ (the first generates): the mean over whole rollouts, per trained position.
        "position_s": statistics.mean(s["wall"] for s in timed) / args.prompts,
    }


def summarise(args, runs: dict[str, list[dict]]) -> list[dict]:
    """One row per case run so far, against the RPT row of its own path (cases whose baseline has not run yet are
    left out)."""
    rows = []
    for name, results in runs.items():
        baseline = runs.get("RPT, B=B_0" + budget_row_path(name))
        if not results or not baseline:
            continue
        base = statistics.median(r["step_s"] for r in baseline)
        base_cpu = statistics.median(r["step_cpu_s"] for r in baseline)
        step = statistics.median(r["step_s"] for r in results)
        cpu = statistics.median(r["step_cpu_s"] for r in results)
        position = statistics.median(r["position_s"] for r in results)
        one_update = (statistics.median(r["position_s"] for r in runs["RMT, final B"]) if runs.get("RMT, final B")
                      else float("nan"))
        rows.append({
            "row": name, "budget": results[0]["budget"], "cap": 2 * results[0]["budget"] + args.answer_allowance,
            "ratio": step / base, "cpu_ratio": cpu / base_cpu, "step_s": step, "position_s": position,
            "position_ratio_to_one_update": position / one_update,
            "generate_s": statistics.median(r["generate_s"] for r in results),
            "update_s": statistics.median(r["update_s"] for r in results),
            "completion_length": statistics.mean(r["completion_length"] for r in results),
            "reasoning_length": statistics.mean(r["reasoning_length"] for r in results),
            "peak_mb": max((r["peak_mb"] or 0) for r in results),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN_SMOLLM2)
    parser.add_argument("--b0", type=int, default=64)
    parser.add_argument("--gamma", type=float, default=0.2)
    parser.add_argument("--b_min", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group_size", type=int, default=4)
    parser.add_argument("--context_tokens", type=int, default=48)
    parser.add_argument("--answer_allowance", type=int, default=4)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the rows, interleaved")
    parser.add_argument("--dtype", default="float32", help="the policy's and reference's dtype (bfloat16 on a GPU)")
    parser.add_argument("--only", nargs="+", default=None, metavar="ROW",
                        help="run only these rows (names as in the table; each row's RPT baseline is added)")
    add_common_arguments(parser)
    parser.add_argument("--out", default="budget_step")
    args = parser.parse_args()
    quiet_transformers()
    apply_threads(args.threads)
    final = token_budget(1.0, args.b0, args.b_min, args.gamma)
    cases = {  # name: (budget, ntp weight, length reward weight, shared-prompt attention, updates per rollout,
        # weights packed for decoding)
        "RPT, B=B_0": (args.b0, 0.0, 0.0, True, 1, True),
        "RMT, final B": (final, 0.1, 0.1, True, 1, True),
        "RMT, final B, NTP off": (final, 0.0, 0.1, True, 1, True),
        "RPT, B=B_0, copied cache": (args.b0, 0.0, 0.0, False, 1, True),
        "RMT, final B, copied cache": (final, 0.1, 0.1, False, 1, True),
        "RPT, B=B_0, unpacked": (args.b0, 0.0, 0.0, True, 1, False),
        "RMT, final B, unpacked": (final, 0.1, 0.1, True, 1, False),
        "RMT, final B, 2 updates per rollout": (final, 0.1, 0.1, True, 2, True),
    }
    if args.only:
        unknown = sorted(set(args.only) - set(cases))
        if unknown:
            parser.error(f"--only: unknown row(s) {unknown}; valid: {sorted(cases)}")
        wanted = set(args.only) | {"RPT, B=B_0" + budget_row_path(name) for name in args.only}
        wanted |= {"RMT, final B"} if any("updates per rollout" in name for name in args.only) else set()
        cases = {name: case for name, case in cases.items() if name in wanted}
    batch = corpus_batch(load_tokenizer(args.model), args.prompts, args.context_tokens, seed=args.seed)
    runs = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():
            runs[name].append(run(args, batch, *case))
            print(f"  {name}: {runs[name][-1]['step_s']:.2f} s/step", flush=True)
            write_json(args.out, {"args": vars(args), "final_budget": final, "rows": summarise(args, runs),
                                  "runs": runs}, complete=False)
    rows = summarise(args, runs)
    print_table(
        f"step time at the final budget vs B fixed at B_0 ({args.model.removeprefix('builtin:')}, B_0={args.b0}, "
        f"gamma={args.gamma}, final B={final}, P={args.prompts}, G={args.group_size})",
        ["row", "B", "ratio (to RPT)", "CPU-time ratio", "s/step", "s per trained position", "to 1 update",
         "generate s", "update s", "mean completion", "mean reasoning", "peak MB"],
        [[r["row"], r["budget"], r["ratio"], r["cpu_ratio"], r["step_s"], r["position_s"],
          r["position_ratio_to_one_update"], r["generate_s"], r["update_s"], r["completion_length"],
          r["reasoning_length"], r["peak_mb"]] for r in rows],
    )
    write_json(args.out, {"args": vars(args), "final_budget": final, "rows": rows, "runs": runs})


if __name__ == "__main__":
    main()
