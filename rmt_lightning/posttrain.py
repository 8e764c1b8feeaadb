"""PostTrainModule, the question task: GRPO on questions with checkable answers (the paper's post-training, Table
B). Each question is sampled G times, each completion's last ``\\boxed{}`` is verified against the reference by
math-verify in worker processes (``runtime.verification``), and the shared step (``grpo_module.GRPOModule``)
trains on the group-normalised rewards. No NTP term and no token budget: plain GRPO with a maximum response length.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

from .data.question_datamodule import QuestionBatch
from .engine.builtin_models import BUILTIN_SMOLLM2
from .engine.generation import GenerationSettings, Rollout
from .engine.models import parse_dtype
from .evaluation.answer_metrics import AnswerMetrics, answer_record
from .evaluation.tier_metrics import EVAL_STAGES, write_figures
from .grpo_module import GRPOModule
from .method import group_advantages
from .method.answers import ANSWER_FORMATS, answer_rewards, has_answer
from .rl.metrics import question_samples, question_step_metrics
from .rl.trajectory import Trajectory
from .runtime.errors import as_input_error
from .runtime.verification import AnswerVerifier, check_answer

__all__ = ["PostTrainModule"]


class PostTrainModule(GRPOModule):
    """Post-training with GRPO on questions with checkable answers (data: ``QuestionDataModule``).

    Args:
        model_name_or_path: Policy: a hub id, a local Hugging Face folder (a mid-trained model's ``hf_export``), or
            ``builtin:smollm2-135m-instruct``.
        trust_remote_code: Allow custom model code from the hub.
        dtype: Weights' precision: float32, bfloat16 or float16.
        reference_dtype: Precision of the frozen reference's weights (None: ``dtype``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_warmup_steps: Linear learning-rate warm-up steps (0: constant).
        grad_clip: Max gradient norm (0: no clipping).
        group_size: Completions per question, G.
        temperature: Sampling temperature of the rollouts.
        top_p: Nucleus sampling mass (1: off).
        clip_eps: PPO clip range of the ratio ``pi / pi_old`` (acts with several updates per rollout).
        advantage_eps: delta in ``(r - mean) / (std + delta)``.
        beta: Weight of the k3 KL penalty to the frozen initial policy; 0 (TRL's default) loads no reference model.
        max_response_length: Tokens a completion may take (the paper post-trains with 4,096); it stops earlier at
            the end-of-sequence token.
        answer_format: Where a completion's answer is read: ``boxed``, its last ``\\boxed{}`` (the paper, open-r1,
            TRL), or ``last_number``, its last number (verl's "flexible" GSM8K score), for a model that computes but
            does not write the format.
        format_reward_weight: Weight of the format reward, 1 for a completion with a non-empty answer in
            ``answer_format``, added to correctness (open-r1's accuracy + format rewards); 0 is plain correctness,
            as the paper post-trains. A small model may learn to write a box at once and guess inside it.
        verify_timeout_s: Wall-clock seconds one completion's verification may take in its worker process before it
            is given up (scored 0 and counted in ``train/verify_timeouts``).
        verify_workers: Worker processes that verify answers (per training process).
        updates_per_rollout: Passes over each rollout (TRL's ``num_iterations``).
        mini_batches_per_rollout: Mini-batches each rollout's questions are cut into, one optimizer step each.
        rl_micro_batch_size: Completions per forward/backward of the GRPO loss (bounds memory).
        gradient_checkpointing: Recompute each decoder layer's activations in backward to save memory.
        share_prompt_attention: Read each prompt's keys and values once for its G completions.
        prepack_weights: On a CPU, decode with the linear weights reordered once per rollout for oneDNN.
        gather_weights_for_rollouts: Under FSDP, gather the whole model once per rollout.
        sample_seed: Seed of completion sampling (per step and rank).
        log_samples: Completions kept per step for the completions table.
        max_consecutive_skips: Non-finite steps in a row that stop the run.
        val_group_size: Completions per held-out question, k: ``answer_acc`` is their mean (pass@1 estimated from
            k samples) and ``answer_pass_at_k`` the share of questions with one right.
        val_temperature: Sampling temperature of the evaluation (0: greedy; RPT evaluates at 0.6 with k samples).
        val_max_response_length: Tokens an evaluation completion may take (None: ``max_response_length``).
    """

    def __init__(
        self,
        model_name_or_path: str = BUILTIN_SMOLLM2,
        trust_remote_code: bool = False,
        dtype: str = "float32",
        reference_dtype: str | None = None,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        lr_warmup_steps: int = 0,
        grad_clip: float = 1.0,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        clip_eps: float = 0.2,
        advantage_eps: float = 1e-4,
        beta: float = 0.0,
        max_response_length: int = 4096,
        answer_format: str = "boxed",
        format_reward_weight: float = 0.0,
        verify_timeout_s: float = 10.0,
        verify_workers: int = 1,
        updates_per_rollout: int = 1,
        mini_batches_per_rollout: int = 1,
        rl_micro_batch_size: int = 8,
        gradient_checkpointing: bool = False,
        share_prompt_attention: bool = True,
        prepack_weights: bool = True,
        gather_weights_for_rollouts: bool = True,
        sample_seed: int = 0,
        log_samples: int = 4,
        max_consecutive_skips: int = 5,
        val_group_size: int = 1,
        val_temperature: float = 0.0,
        val_max_response_length: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if group_size < 2:
            raise ValueError(f"group_size={group_size}: GRPO needs G >= 2 completions per question")
        for name, value in (("lr", lr), ("temperature", temperature), ("beta", beta), ("clip_eps", clip_eps),
                            ("format_reward_weight", format_reward_weight), ("val_temperature", val_temperature)):
            if value < 0:
                raise ValueError(f"{name}={value!r} must be >= 0")
        for name, value in (("max_response_length", max_response_length), ("val_group_size", val_group_size),
                            ("verify_workers", verify_workers), ("rl_micro_batch_size", rl_micro_batch_size),
                            ("updates_per_rollout", updates_per_rollout),
                            ("mini_batches_per_rollout", mini_batches_per_rollout),
                            ("val_max_response_length", val_max_response_length or 1)):
            if value < 1:
                raise ValueError(f"{name}={value!r} must be >= 1")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format '{answer_format}' is not a format; valid: {list(ANSWER_FORMATS)}")
        if not verify_timeout_s > 0:
            raise ValueError(f"verify_timeout_s={verify_timeout_s!r} must be > 0")
        with as_input_error():
            parse_dtype(dtype)
        if reference_dtype is not None:
            with as_input_error("reference_dtype: "):
                parse_dtype(reference_dtype)
        self.init_rl_state()
        self.verifier = AnswerVerifier(verify_workers, verify_timeout_s,
                                       function=functools.partial(check_answer, answer_format=answer_format))
        """Checks answers in worker processes under a hard time limit (started on first use)."""
        self._timeouts = 0
        self.last_sampled_entropies: Tensor | None = None
        """Not drawn by entropy: None (the completions table's entropy histogram is left out)."""
        self.last_reasoning_lengths: Tensor | None = None
        """Tokens of each completion of the latest step (the completions table's histogram)."""
        self.eval_metrics = torch.nn.ModuleDict({stage: AnswerMetrics() for stage in EVAL_STAGES})
        self.eval_samples: list[dict] = []
        self.eval_reasoning_lengths: list[int] = []
        self.last_evaluation: dict = {}
        """Figures of the latest validation or test, as written to ``<log_dir>/<stage>_metrics.json``."""

    # ---- the step ----------------------------------------------------------------------------------

    def training_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        """One optimizer step: the rollout of the batch's questions (or the kept one), GRPO; then update."""
        started = time.perf_counter()
        loss, metrics = self.rl_step(batch, lambda: self.collect_trajectory(batch.prompts, batch.references))
        started += metrics["timing/generate"]
        metrics["timing/update"] = time.perf_counter() - started
        self.update_and_log(loss, metrics, {"reward": metrics["train/reward"]}, batch.size)

    def collect_trajectory(self, prompts: list[list[int]], references: list[list]) -> Trajectory:
        """G completions per question, verified, rewarded and normalised per group."""
        rollout = self.generate_rollout(prompts)
        correct, answered, self._timeouts = self.verify(rollout, references)
        rewards = answer_rewards(correct, answered, self.hparams.format_reward_weight)
        advantages = group_advantages(rewards, eps=self.hparams.advantage_eps).flatten()
        return Trajectory(prompts, rollout, rewards, correct, answered, advantages)

    def generate_rollout(self, prompts: list[list[int]], group_size: int | None = None, temperature: float | None = None,
                         max_new_tokens: int | None = None) -> Rollout:
        """``group_size`` (default G) completions of each prompt, each until its end-of-sequence token or
        ``max_new_tokens`` (default ``max_response_length``)."""
        hp = self.hparams
        cap = max_new_tokens or hp.max_response_length
        settings = GenerationSettings(group_size or hp.group_size, cap, 0,
                                      temperature=hp.temperature if temperature is None else temperature,
                                      top_p=hp.top_p, budget_forcing=False, response_prefix="", max_new_tokens=cap)
        return self._generate(prompts, settings)

    def verify(self, rollout: Rollout, references: list[list]) -> tuple[Tensor, Tensor, int]:
        """``[P, G]`` correctness and answer presence of the rollout's completions, and how many verifications
        timed out."""
        group = len(rollout.texts) // len(references)
        verdicts = self.verifier.verify([references[r // group] for r in range(len(rollout.texts))], rollout.texts)
        correct = torch.tensor(verdicts.correct, dtype=torch.float32).view(len(references), group)
        answered = torch.tensor([has_answer(t, self.hparams.answer_format) for t in rollout.texts], dtype=torch.float32)
        return correct, answered.view(len(references), group), verdicts.timeouts

    def finish_rl_backward(self, batch: QuestionBatch, part: Trajectory, mini_batch: int,
                           terms: dict) -> tuple[float, dict[str, float]]:
        """Nothing more to train; the step's figures."""
        return 0.0, question_step_metrics(part, terms, self._timeouts)

    def _keep_samples(self, batch: QuestionBatch, rollout: Rollout, rewards: Tensor) -> None:
        self.last_samples = question_samples(batch, rollout, rewards, self.hparams.log_samples, self.hparams.answer_format)
        self.last_reasoning_lengths = rollout.completion_mask.sum(1).float().cpu()

    # ---- validation and test -----------------------------------------------------------------------

    def _evaluate(self, batch: QuestionBatch, batch_idx: int, stage: str) -> None:
        hp = self.hparams
        if batch_idx == 0:
            self.eval_samples, self.eval_reasoning_lengths = [], []
        rollout = self.generate_rollout(batch.prompts, hp.val_group_size, hp.val_temperature,
                                        hp.val_max_response_length)
        correct, answered, _ = self.verify(rollout, batch.references)
        lengths = rollout.completion_mask.sum(1).float().view_as(correct)
        self.eval_metrics[stage].update(correct, answered, lengths)
        self.eval_reasoning_lengths.extend(lengths.flatten().int().tolist())
        if batch_idx == 0:
            self.eval_samples = question_samples(batch, rollout, correct, hp.log_samples, hp.answer_format)

    def _log_evaluation(self, stage: str) -> None:
        hp = self.hparams
        metric = self.eval_metrics[stage]
        figures = metric.compute()
        metric.reset()
        logged = {f"{stage}/{name}": value for name, value in figures.items() if name != "questions"}
        self.log_dict(logged, sync_dist=False)
        self.log("hp_metric", logged[f"{stage}/answer_acc"], sync_dist=False)
        self.last_evaluation = answer_record(stage, self.global_step, self.current_epoch, hp.val_group_size,
                                             hp.val_temperature, figures)
        folder = self.trainer.log_dir  # a collective under DDP: every rank asks, rank 0 writes
        if folder is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            write_figures(folder, stage, self.last_evaluation)

    def validation_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        """Answer accuracy on held-out questions: ``val_group_size`` completions each, verified."""
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        """As ``validation_step``, logged under ``test/``."""
        self._evaluate(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def teardown(self, stage: str) -> None:
        self.verifier.close()

