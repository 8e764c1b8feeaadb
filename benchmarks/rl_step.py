"""Full RL step (generate + rewards + loss + backward + optimizer, NTP off): ``RMTModule`` under Lightning against
TRL's ``GRPOTrainer``, same model, G, prompts, maximum completion length, KL reference, one update per batch.

    pip install -e ".[bench]"          # TRL, for this benchmark only
    python benchmarks/rl_step.py       # SmolLM2-135M; --model builtin:tiny-llama for a quick run

Both train on the same ``P`` prompts (RMT prompts built from corpus contexts, with the budget sentence) and
sample ``G`` completions each at temperature 0.8, up to ``2B + answer_allowance`` new tokens (budget forcing
off, so neither side writes tokens for the model). The reward is the same rule on both sides (exact match of
the boxed answer with the next token, plus the triangular length reward). Each side runs ``warmup + steps``
optimizer steps on a fresh copy of the model; the median step time over the timed steps is reported, and the
ratio ours / TRL (lower is better for us). Written to ``results/rl_step.json``.

What differs by design: RMT prefills each prompt once for its G samples, shares the prompt's forward and
backward across the group in the loss, projects the vocabulary only at sampled tokens, and stops a row at
its closed ``\\boxed{}`` answer; TRL repeats the prompt G times in generation and in the loss and stops a
row at its end-of-sequence token only.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings

import torch

from common import add_common_arguments, apply_threads, PeakMemory, print_table, quiet_transformers, write_json
from harness import corpus_batch, make_module, run_steps
from rmt_lightning.method import exact_match, extract_prediction, length_reward, total_reward
from rmt_lightning.engine.models import BUILTIN_SMOLLM2, load_tokenizer, resolve_model_source
from rmt_lightning.engine.prompts import DEFAULT_INSTRUCTION, build_prompt_ids


def run_ours(args, batch) -> dict:
    torch.manual_seed(args.seed)
    module = make_module(
        model_name_or_path=args.model, lr=1e-6, group_size=args.group_size, beta=args.beta, ntp_weight=0.0,
        temperature=0.8, length_reward_weight=0.1, answer_allowance=args.answer_allowance, budget_forcing=False,
        budget=args.budget, rl_micro_batch_size=args.micro_batch, sample_seed=args.seed, grad_clip=1.0,
    )
    with PeakMemory() as memory:
        timer = run_steps(module, batch, steps=args.warmup + args.steps)
    timed = timer.steps[args.warmup:]
    return {
        "step_s": statistics.median(s["wall"] for s in timed),
        "step_cpu_s": statistics.median(s["cpu"] for s in timed),
        "generate_s": statistics.median(s.get("timing/generate", float("nan")) for s in timed),
        "completion_length": statistics.mean(s.get("train/completion_length", float("nan")) for s in timed),
        "steps": timer.steps,
        "peak_mb": memory.mb,
    }


def run_trl(args, prompt_texts: list[str], targets: list[bytes]) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    source = resolve_model_source(args.model)
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    target_of = {text: target for text, target in zip(prompt_texts, targets)}

    def reward(prompts, completions, **kwargs):
        # The rule RMTModule.score applies: exact match of the boxed answer after </think>, length reward on
        # the tokens inside <think>...</think> (the response starts inside <think>).
        rewards = []
        for prompt, completion in zip(prompts, completions):
            text = "<think>\n" + completion
            prediction = extract_prediction(text)
            thinking = completion.split("</think>", 1)[0]
            reasoning = len(tokenizer(thinking, add_special_tokens=False)["input_ids"])
            correct = float(exact_match(prediction, target_of[prompt]))
            rewards.append(total_reward(correct, length_reward(reasoning, args.budget, 1.0), 0.1))
        return rewards

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_begin(self, targs, state, control, **kwargs):
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, targs, state, control, **kwargs):
            self.steps.append({"wall": time.perf_counter() - self._wall, "cpu": time.process_time() - self._cpu})

    steps = args.warmup + args.steps
    # Each step takes the P prompts (G rows each): the dataset holds them once per step, in order.
    dataset = Dataset.from_dict({"prompt": prompt_texts * steps})
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=len(prompt_texts) * args.group_size,
        num_generations=args.group_size, max_completion_length=2 * args.budget + args.answer_allowance,
        temperature=0.8, top_p=1.0, top_k=0, beta=args.beta, learning_rate=1e-6, max_grad_norm=1.0,
        max_steps=steps, num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1,
        logging_steps=1, report_to="none", save_strategy="no", seed=args.seed, use_cpu=not torch.cuda.is_available(),
        bf16=False, dataloader_num_workers=0, shuffle_dataset=False, disable_dropout=True, log_completions=False,
        loss_type="grpo", scale_rewards="group",
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    timer = Timer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        with PeakMemory() as memory:
            trainer.train()
    history = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    timed = timer.steps[args.warmup:]
    return {
        "step_s": statistics.median(s["wall"] for s in timed),
        "step_cpu_s": statistics.median(s["cpu"] for s in timed),
        "completion_length": statistics.mean(h["completions/mean_length"] for h in history[args.warmup:]) if history else None,
        "steps": timer.steps,
        "peak_mb": memory.mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN_SMOLLM2)
    parser.add_argument("--prompts", type=int, default=2, help="RL positions per step, P")
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--context_tokens", type=int, default=48)
    parser.add_argument("--budget", type=int, default=16, help="B: at most 2B + answer_allowance new tokens")
    parser.add_argument("--answer_allowance", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--micro_batch", type=int, default=16, help="our rl_micro_batch_size (completions)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="ours/TRL blocks, interleaved")
    add_common_arguments(parser)
    parser.add_argument("--out", default="rl_step")
    args = parser.parse_args()
    quiet_transformers()
    apply_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    batch = corpus_batch(tokenizer, args.prompts, args.context_tokens, seed=args.seed)
    prompt_ids = [build_prompt_ids(tokenizer, tokenizer.decode(c), args.budget, DEFAULT_INSTRUCTION) for c in batch.contexts]
    prompt_texts = [tokenizer.decode(ids) for ids in prompt_ids]
    targets = [c[0] for c in batch.continuations]
    retokenized = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompt_texts]

    results = {"ours": [], "trl": []}
    for _ in range(args.rounds):
        results["ours"].append(run_ours(args, batch))
        print(f"  ours: {results['ours'][-1]['step_s']:.2f} s/step", flush=True)
        results["trl"].append(run_trl(args, prompt_texts, targets))
        print(f"  TRL:  {results['trl'][-1]['step_s']:.2f} s/step", flush=True)
    ours = statistics.median(r["step_s"] for r in results["ours"])
    trl = statistics.median(r["step_s"] for r in results["trl"])
    ours_cpu = statistics.median(r["step_cpu_s"] for r in results["ours"])
    trl_cpu = statistics.median(r["step_cpu_s"] for r in results["trl"])
    row = {
        "model": args.model, "P": args.prompts, "G": args.group_size, "max_completion": 2 * args.budget + args.answer_allowance,
        "prompt_tokens": [len(p) for p in prompt_ids], "prompt_tokens_trl": retokenized,
        "ratio": ours / trl, "cpu_ratio": ours_cpu / trl_cpu, "ours_step_s": ours, "trl_step_s": trl,
        "ours_generate_s": statistics.median(r["generate_s"] for r in results["ours"]),
        "ours_completion_length": statistics.mean(r["completion_length"] for r in results["ours"]),
        "trl_completion_length": results["trl"][-1]["completion_length"],
        "ours_peak_mb": max((r["peak_mb"] or 0) for r in results["ours"]),
        "trl_peak_mb": max((r["peak_mb"] or 0) for r in results["trl"]),
    }
    print_table(
        f"full RL step (NTP off), {args.model.removeprefix('builtin:')}, P={args.prompts}, G={args.group_size}, "
        f"max completion {row['max_completion']}: RMTModule vs TRL GRPOTrainer",
        ["ratio (ours/TRL)", "CPU-time ratio", "ours s/step", "TRL s/step", "ours generate s", "ours mean completion",
         "TRL mean completion", "ours peak MB", "TRL peak MB"],
        [[row["ratio"], row["cpu_ratio"], ours, trl, row["ours_generate_s"], row["ours_completion_length"],
          row["trl_completion_length"], row["ours_peak_mb"], row["trl_peak_mb"]]],
    )
    write_json(args.out, {"args": vars(args), "row": row, "runs": results})


if __name__ == "__main__":
    main()
