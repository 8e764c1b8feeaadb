"""Post-training, side by side: ``PostTrainModule`` under Lightning against TRL's ``GRPOTrainer`` with the same
model, questions (the built-in set, in the same order), G, constant learning rate, temperature, maximum completion
length, loss aggregation (a token mean over the step, TRL's ``bnpo``) and steps, both rewarded by math-verify against
the reference, the answer read as ``configs/posttrain/builtin.yaml`` reads it (``--answer_format``). Reports the
median time per step and the ratio ours / TRL, then scores both trained models on the same held-out questions with
the same greedy evaluation.

    pip install -e ".[bench]"                 # TRL, for this benchmark only
    python benchmarks/posttrain_vs_trl.py     # SmolLM2-135M, a few steps; --steps 60 for the accuracy reached

Written to ``results/posttrain_vs_trl.json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch

from common import add_common_arguments, apply_threads, PeakMemory, print_table, quiet_transformers, write_json
from harness import StepTimer
from rmt_lightning import PostTrainModule, QuestionDataModule
from rmt_lightning.engine.generation import DecodingOptions, GenerationSettings, generate_group
from rmt_lightning.engine.models import BUILTIN_SMOLLM2, load_causal_lm, load_tokenizer, resolve_model_source
from rmt_lightning.method.answers import verify_parsed


def _datamodule(args) -> QuestionDataModule:
    datamodule = QuestionDataModule(model_name_or_path=args.model, difficulty=args.difficulty,
                                    val_questions=args.val_questions, batch_size=args.questions,
                                    batches_per_epoch=args.warmup + args.steps, seed=args.seed)
    datamodule.setup("fit")
    return datamodule


def run_ours(args, export: str) -> dict:
    torch.manual_seed(args.seed)
    module = PostTrainModule(model_name_or_path=args.model, lr=args.lr, group_size=args.group_size,
                             temperature=args.temperature, beta=0.0, max_response_length=args.max_length,
                             answer_format=args.answer_format, rl_micro_batch_size=args.micro_batch, sample_seed=args.seed)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False, callbacks=[timer])
    with warnings.catch_warnings(), PeakMemory() as memory:
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=_datamodule(args))
    module.policy.save_pretrained(export)
    timed = timer.steps[args.warmup:]
    return {"step_s": statistics.median(s["wall"] for s in timed),
            "generate_s": statistics.median(s.get("timing/generate", float("nan")) for s in timed),
            "completion_length": statistics.mean(s.get("train/completion_length", float("nan")) for s in timed),
            "steps": timer.steps, "peak_mb": memory.mb}


def run_trl(args, export: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    datamodule = _datamodule(args)
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    train = datamodule.train_set
    # The questions our sampler draws, step by step, in its order; each prompt already in the chat template.
    drawn = [i for step in range(args.warmup + args.steps) for i in datamodule.sampler.draw(step, 0)[0]]
    texts = [tokenizer.decode(train.prompts[i]) for i in drawn]
    reference_of = {tokenizer.decode(train.prompts[i]): train.references[i] for i in drawn}

    def accuracy(prompts, completions, **kwargs):
        return [float(verify_parsed(reference_of[p], c, answer_format=args.answer_format)) for p, c in zip(prompts, completions)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_begin(self, targs, state, control, **kwargs):
            self._wall = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            self.steps.append({"wall": time.perf_counter() - self._wall})

    out_dir = tempfile.mkdtemp(prefix="trl-posttrain-")
    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=args.questions * args.group_size,
        num_generations=args.group_size, max_completion_length=args.max_length, temperature=args.temperature, top_p=1.0,
        top_k=0, beta=0.0, learning_rate=args.lr, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=args.warmup + args.steps, num_iterations=1,
        steps_per_generation=1, gradient_accumulation_steps=1, logging_steps=1, report_to="none", save_strategy="no",
        seed=args.seed, use_cpu=not torch.cuda.is_available(), bf16=False, dataloader_num_workers=0,
        shuffle_dataset=False, disable_dropout=True, log_completions=False, loss_type="bnpo", scale_rewards="group",
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_source(args.model), dtype=torch.float32)
    timer = Timer()
    with warnings.catch_warnings(), PeakMemory() as memory:
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=config,
                              train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                              callbacks=[timer])
        trainer.train()
    trainer.model.save_pretrained(export)
    history = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    timed = timer.steps[args.warmup:]
    return {"step_s": statistics.median(s["wall"] for s in timed),
            "completion_length": statistics.mean(h["completions/mean_length"] for h in history[args.warmup:]) if history else None,
            "steps": timer.steps, "peak_mb": memory.mb}


@torch.no_grad()
def held_out_accuracy(args, folder: str, datamodule: QuestionDataModule) -> float:
    """Greedy answer accuracy of the model in ``folder`` on the held-out questions (the same for both sides)."""
    model = load_causal_lm(folder, dtype=torch.float32).eval()
    held = datamodule.val_set
    settings = GenerationSettings(1, args.max_length, 0, temperature=0.0, response_prefix="", max_new_tokens=args.max_length)
    rollout = generate_group(model, datamodule.tokenizer, held.prompts, settings, DecodingOptions())
    return statistics.mean(float(verify_parsed(r, t, answer_format=args.answer_format))
                           for r, t in zip(held.references, rollout.texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN_SMOLLM2)
    parser.add_argument("--difficulty", type=int, default=2)
    parser.add_argument("--questions", type=int, default=8, help="questions per step, P")
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--answer_format", default="last_number", help="boxed or last_number (configs/posttrain/builtin.yaml)")
    parser.add_argument("--max_length", type=int, default=64, help="maximum completion tokens")
    parser.add_argument("--micro_batch", type=int, default=16, help="our rl_micro_batch_size (completions)")
    parser.add_argument("--val_questions", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    add_common_arguments(parser)
    parser.add_argument("--out", default="posttrain_vs_trl")
    args = parser.parse_args()
    quiet_transformers()
    apply_threads(args.threads)

    folder = tempfile.mkdtemp(prefix="posttrain-bench-")
    ours = run_ours(args, f"{folder}/ours")
    print(f"  ours: {ours['step_s']:.2f} s/step", flush=True)
    trl = run_trl(args, f"{folder}/trl")
    print(f"  TRL:  {trl['step_s']:.2f} s/step", flush=True)
    datamodule = _datamodule(args)
    ours["held_out_accuracy"] = held_out_accuracy(args, f"{folder}/ours", datamodule)
    trl["held_out_accuracy"] = held_out_accuracy(args, f"{folder}/trl", datamodule)
    shutil.rmtree(folder, ignore_errors=True)
    row = {"model": args.model, "P": args.questions, "G": args.group_size, "max_completion": args.max_length,
           "steps": args.steps, "ratio": ours["step_s"] / trl["step_s"], "ours_step_s": ours["step_s"],
           "trl_step_s": trl["step_s"], "ours_generate_s": ours["generate_s"],
           "ours_completion_length": ours["completion_length"], "trl_completion_length": trl["completion_length"],
           "ours_held_out_accuracy": ours["held_out_accuracy"], "trl_held_out_accuracy": trl["held_out_accuracy"],
           "ours_peak_mb": ours["peak_mb"], "trl_peak_mb": trl["peak_mb"]}
    print_table(
        f"post-training step, {args.model.removeprefix('builtin:')}, P={args.questions}, G={args.group_size}, "
        f"max completion {args.max_length}, {args.steps} timed steps: PostTrainModule vs TRL GRPOTrainer",
        ["ratio (ours/TRL)", "ours s/step", "TRL s/step", "ours mean completion", "TRL mean completion",
         f"ours held-out acc ({args.val_questions})", "TRL held-out acc", "ours peak MB", "TRL peak MB"],
        [[row["ratio"], ours["step_s"], trl["step_s"], ours["completion_length"], trl["completion_length"],
          ours["held_out_accuracy"], trl["held_out_accuracy"], ours["peak_mb"], trl["peak_mb"]]],
    )
    write_json(args.out, {"args": vars(args), "row": row, "runs": {"ours": ours, "trl": trl}})


if __name__ == "__main__":
    main()
