"""Profile one quickstart-like RL step with ``torch.profiler``: where the time goes, by phase and by operator.

    python benchmarks/profile_step.py                 # SmolLM2-135M, the quickstart's settings
    python benchmarks/profile_step.py --model builtin:tiny-llama

The phases (rollout, rewards, RL loss + backward, NTP loss + backward, optimizer) are marked with
``record_function`` around the module's methods, so the table shows each phase's share of the step, then the
operators with the most self CPU time. Written to ``results/profile_step.json``.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from common import PeakMemory, add_common_arguments, apply_threads, print_table, quiet_transformers, write_json
from harness import corpus_batch, make_module, run_steps

PHASES = ("generate_rollout", "rewards", "rl_backward", "ntp_backward", "update_or_skip")
"""RMTModule methods marked as phases: the rollout, the rewards, the RL and NTP losses with their backward, the
optimizer step (or the skip)."""


def _mark(obj, name: str) -> None:
    method = getattr(obj, name)

    @functools.wraps(method)
    def marked(*args, **kwargs):
        with record_function(f"phase/{name}"):
            return method(*args, **kwargs)

    setattr(obj, name, marked)


class _ProfileStep:
    """Lightning callback: profile the step with index ``step`` (0-based)."""

    def __init__(self, step: int):
        import lightning as L

        class Callback(L.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):
                if batch_idx == step:
                    self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
                    self.prof.__enter__()
                    self.step_ctx = record_function("phase/step")
                    self.step_ctx.__enter__()

            def on_before_optimizer_step(cb, trainer, pl_module, optimizer):
                pass

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx == step:
                    self.step_ctx.__exit__(None, None, None)
                    self.prof.__exit__(None, None, None)

        self.callback = Callback()
        self.prof = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--group_size", type=int, default=4)
    parser.add_argument("--positions", type=int, default=4)
    parser.add_argument("--context_tokens", type=int, default=48)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--answer_allowance", type=int, default=4)
    parser.add_argument("--ntp_weight", type=float, default=0.1)
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    parser.add_argument("--tag", default="", help="suffix of the JSON file (e.g. before/after)")
    add_common_arguments(parser)
    args = parser.parse_args()
    quiet_transformers()
    apply_threads(args.threads)
    torch.manual_seed(args.seed)

    module = make_module(
        model_name_or_path=args.model, lr=2e-5, group_size=args.group_size, beta=0.01, ntp_weight=args.ntp_weight,
        length_reward_weight=0.1, answer_allowance=args.answer_allowance, budget_forcing=True, budget=args.budget,
        rl_micro_batch_size=8,
    )
    for name in PHASES:
        _mark(module, name)
    module.configure_model()
    batch = corpus_batch(module.tokenizer, args.positions, args.context_tokens)
    profiler = _ProfileStep(step=1)  # step 0 warms up allocator and caches
    with PeakMemory() as memory:
        timer = run_steps(module, batch, steps=2, callbacks=[profiler.callback])
    events = profiler.prof.key_averages()
    by_name = {e.key: e for e in events}
    step_us = by_name["phase/step"].cpu_time_total
    phase_rows = []
    for name in PHASES:
        event = by_name.get(f"phase/{name}")
        total = event.cpu_time_total if event else 0.0
        phase_rows.append([name, total / 1e6, 100 * total / step_us])
    phase_rows.append(["step (all)", step_us / 1e6, 100.0])
    print_table(f"phases of one RL step ({args.model}, G={args.group_size}, P={args.positions}, B={args.budget})",
                ["phase", "s", "% of step"], phase_rows)
    ops = sorted((e for e in events if not e.key.startswith("phase/")), key=lambda e: e.self_cpu_time_total, reverse=True)
    op_rows = [[e.key, e.count, e.self_cpu_time_total / 1e6, 100 * e.self_cpu_time_total / step_us] for e in ops[: args.rows]]
    print_table("operators by self CPU time", ["operator", "calls", "self s", "% of step"], op_rows)
    write_json(f"profile_step{('_' + args.tag) if args.tag else ''}", {
        "args": vars(args),
        "steps": timer.steps,
        "peak_rss_mb": memory.mb,
        "phases": [dict(zip(["phase", "seconds", "percent"], row)) for row in phase_rows],
        "operators": [dict(zip(["operator", "calls", "self_seconds", "percent"], row)) for row in op_rows],
    })


if __name__ == "__main__":
    main()
