"""How much the format warm-up lifts the answer rate and reward before any RL: SmolLM2 (or another model) is
warmed up for N steps on demonstrations from the quickstart's corpus, then samples G completions at held-out
positions; the untrained model (N = 0) is the baseline row, run in the same command.

    python benchmarks/format_warmup.py --steps 0 20 --lr 1e-4

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rmt_lightning import RMTDataModule, RMTModule
from rmt_lightning.engine.models import BUILTIN_SMOLLM2


def measure(model: str, steps: int, lr: float, thought: str, budget: int, group_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    module = RMTModule(model_name_or_path=model, lr=lr, group_size=group_size, beta=0.0, answer_allowance=4,
                       budget_forcing=True, format_warmup_thought=thought, budget=budget, sample_seed=seed)
    module.configure_model()
    module.manual_backward = lambda loss: loss.backward()  # no Trainer: plain autograd
    data = RMTDataModule(model_name_or_path=model, corpus="embedded:math", embedded_documents=200, val_documents=16,
                         batch_size=4, batches_per_epoch=7, max_context_tokens=48, val_positions=32, seed=seed)
    data.setup("fit")
    loader = data.train_dataloader()
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=lr)
    started, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        if step % len(loader) == 0:  # the quickstart's 7-batch epochs
            data.sampler.set_epoch(step // len(loader))
            batches = iter(loader)
        batch = next(batches)
        loss = module.format_warmup_backward(batch.contexts, batch.continuations, budget)
        torch.nn.utils.clip_grad_norm_(module.policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    warmup_seconds = time.perf_counter() - started
    correct = answered = samples = 0
    module._generator = lambda: torch.Generator().manual_seed(seed + 1)
    for batch in data.val_dataloader():
        rollout = module.generate_rollout(module._prompts(batch.contexts, budget), budget)
        _, right, _ = module.rewards(rollout, batch.continuations, budget)
        correct += int(right.sum())
        answered += sum(p is not None for p in rollout.predictions)
        samples += right.numel()
    return {"warmup_steps": steps, "lr": lr, "last_warmup_loss": loss, "warmup_seconds": round(warmup_seconds, 1),
            "reward_correct": correct / samples, "correct": correct, "answer_rate": answered / samples,
            "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN_SMOLLM2)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 20], help="warm-up steps per row (0: untrained)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--thought", default="{context_tail}{next_token}")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/format_warmup.json")
    args = parser.parse_args()
    rows = [measure(args.model, n, args.lr, args.thought, args.budget, args.group_size, args.seed) for n in args.steps]
    print("| warm-up steps | lr | reward_correct | correct / samples | answer rate | warm-up s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['warmup_steps']} | {row['lr']:g} | {row['reward_correct']:.3f} | {row['correct']} / {row['samples']} "
              f"| {row['answer_rate']:.2f} | {row['warmup_seconds']} |")
    with open(args.out, "w") as handle:
        json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
