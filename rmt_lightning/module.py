"""RMTModule, the next-token task of mid-training: one training step = rollout -> rewards -> GRPO on key positions
+ NTP on the rest -> optimizer step (the step itself and the shared hooks: ``grpo_module.GRPOModule``)."""

from __future__ import annotations

import sys
import time

from lightning.pytorch.trainer.states import TrainerFn
import torch
from torch import Tensor

from .checks import check_module_arguments
from .data.batches import PositionBatch
from .engine.builtin_models import BUILTIN_SMOLLM2
from .engine.forward import CompletionBatch
from .engine.generation import GenerationSettings, Rollout
from .engine.padding import pad_left, pad_right
from .engine.prompts import DEFAULT_INSTRUCTION, RESPONSE_PREFIX, build_prompt_ids, demonstration_ids
from .evaluation.tier_metrics import (
    EVAL_STAGES, EvaluationMetrics, argmax_hits, evaluation_budget, evaluation_record, write_figures,
)
from .grpo_module import GRPOModule, NonFiniteLossError, lr_factor
from .method import completion_rewards, contiguous_share, group_advantages, thinking_cap
from .rl import losses
from .rl.metrics import completion_samples, curriculum_metrics, rl_step_metrics
from .rl.trajectory import Trajectory

__all__ = ["RMTModule", "NonFiniteLossError", "lr_factor"]


class RMTModule(GRPOModule):
    """Reinforcement Mid-Training: GRPO on curriculum-selected key tokens plus next-token prediction on the rest.

    Args:
        model_name_or_path: Policy: a hub id, a local Hugging Face folder, or ``builtin:smollm2-135m-instruct``.
        trust_remote_code: Allow custom model code from the hub.
        dtype: Weights' precision: float32, bfloat16 or float16.
        reference_dtype: Precision of the frozen reference's weights (None: ``dtype``); the reference only runs
            forwards under ``no_grad``, so ``bfloat16`` halves its memory at little cost to the KL term.
        lr: AdamW learning rate (paper: 1e-6).
        weight_decay: AdamW weight decay.
        lr_warmup_steps: Linear learning-rate warm-up steps, counted after the format warm-up (0: constant).
        grad_clip: Max gradient norm (0: no clipping).
        group_size: Completions per RL position, G (paper: 8).
        temperature: Sampling temperature (RPT: 0.8).
        top_p: Nucleus sampling mass (1: off).
        clip_eps: PPO clip range of the ratio ``pi / pi_old``. With one update per rollout the ratio is 1 and
            the clip never acts (``train/ppo_clip_fraction`` stays 0); it acts once several updates reuse one
            rollout (``updates_per_rollout``, ``mini_batches_per_rollout``).
        advantage_eps: delta in ``(r - mean) / (std + delta)``.
        beta: Weight of the k3 KL penalty to the frozen initial policy; 0 loads no reference model.
        ntp_weight: lambda in ``L = L_RL + lambda * L_NTP``; 0 skips the NTP pass.
        rl: Train with RL; False trains next-token prediction on every position only (the NTP baseline).
        length_reward_weight: w in ``r = (1 - w) * r_correct + w * r_len``.
        length_reward_only_when_correct: Count the length reward for correct completions only. Off is the
            paper's formula. When correct answers are rare, most groups differ only in length, and GRPO's
            per-group normalisation turns the small length term into full-size advantages; a small model then
            learns the shortest thought and a constant answer (SmolLM2-135M on GSM8K: ``\\boxed{.}``). On, such
            groups carry no signal and only correct completions are told apart by length.
        r_max: Peak of the triangular length reward.
        correctness: ``exact`` (RMT: the prediction is the next token) or ``prefix`` (RPT: whole tokens of the continuation).
        budget: Reasoning budget B when no TokenBudget callback sets one (a fixed budget, as in RPT).
        answer_allowance: Tokens the model may write after the thinking cap of 2B to close its answer (the scaffold budget forcing writes is not counted).
        max_response_length: Hard cap on new tokens per completion (paper: 2048).
        budget_forcing: Write ``</think> \\boxed{`` for the model when its thinking hits 2B tokens or ends without an answer.
        instruction: Prompt template with ``{budget}`` and ``{context}`` placeholders.
        response_prefix: Text the response starts from, appended after the chat template (e.g. ``<think>\\n``).
        use_chat_template: Wrap the instruction in the tokenizer's chat template when it has one.
        format_warmup_steps: First optimizer steps trained on format demonstrations instead of RL (0: off).
        format_only: Train on format demonstrations at every step, however long the schedule: the format stage on
            its own (``configs/format_sft.yaml``); ``format_warmup_steps`` is then not read.
        format_warmup_lr: Learning rate of the format warm-up steps (None: ``lr``); a format is learnt in a
            few steps only at a rate well above the one RL can take.
        format_warmup_thought: Thought of the demonstrations ``<think>thought</think> \\boxed{next token}``;
            ``{context_tail}`` stands for the context's last B tokens and ``{next_token}`` for the true next
            token, so ``{context_tail}{next_token}`` demonstrates "continue the text, then box the new token".
        format_warmup_budgets: Budgets the demonstrations cycle through, one per demonstration, in the
            instruction and the ``{context_tail}`` alike (None: the step's budget B). With the budgets RL and
            evaluation will ask for (e.g. ``[8, 4, 2]`` for B_0 8 decaying to 2), the format is learnt at each
            of them, not only at the budget of the warm-up steps.
        updates_per_rollout: Passes over each rollout (TRL's ``num_iterations``, PPO's epochs): every pass
            trains each of its mini-batches once. With more than one update per rollout, pi_old of the ratio is
            the policy that sampled the completions (their log-probs taken by the loss's own forward before the
            first update, so pi_old and pi share one path and precision), so the ratio moves away from 1 and
            ``clip_eps`` acts. With several mini-batches, that costs one forward without gradients over the
            other mini-batches at the rollout's first step.
        mini_batches_per_rollout: Mini-batches each rollout's positions are cut into (whole groups of G
            completions, with an equal share of the NTP documents), one optimizer step each; it must divide
            ``data.batch_size``. A rollout feeds ``updates_per_rollout * mini_batches_per_rollout`` optimizer
            steps, each one Lightning training step on the same draw of positions (the datamodule repeats it),
            so ``global_step``, ``max_steps``, the budget, curriculum and LR schedules and periodic
            checkpoints all count optimizer steps. The format warm-up and NTP-only steps draw once per step.
        rl_micro_batch_size: Completions per forward/backward of the RL loss (bounds memory).
        ntp_micro_batch_size: Documents per forward/backward of the NTP loss.
        gradient_checkpointing: Recompute each decoder layer's activations in backward to save memory (Hugging
            Face activation checkpointing, non-reentrant; works under every strategy, FSDP included).
        share_prompt_attention: Rollouts and the loss forward read each prompt's keys and values once for its G
            completions (two-part attention merged by log-sum-exp, ``engine/attention.py``), instead of a copy per
            completion; models whose attention it does not cover (sliding windows, linear attention) keep the
            copies with one logged line. False: always the copies (same samples and gradients, slower).
        prepack_weights: On a CPU, rollouts' decoding steps multiply by the linear layers' weights reordered once
            per rollout for oneDNN (``engine/prepacked.py``): about 40% off the matmuls of a float32 decoding step,
            at the memory of one more copy of those weights while a rollout runs. Results equal the unpacked
            path's within float32 rounding. No effect on GPUs, other dtypes or FSDP-sharded weights.
        gather_weights_for_rollouts: Under FSDP1/FSDP2, a rollout gathers the whole model's weights on every process
            once (``engine/decoding_weights.py``), so its decoding steps are not collectives: every process then holds the
            full weights while it generates (under ``bf16-mixed`` as gathered, and once more in bf16). False keeps
            them sharded and gathers them layer by layer at every decoding step (slower; for models whose full
            weights do not fit on one device). No effect without FSDP.
        sample_seed: Seed of completion sampling (per step and rank).
        log_samples: Completions kept per step for the completions table.
        max_consecutive_skips: A step whose loss or gradients are not finite (NaN/inf) is skipped (no update,
            gradients zeroed, counted in ``train/skipped_steps``); this many skips in a row stop the run
            with an error, since the weights or the data are then broken rather than unlucky.
        val_reasoning: Score held-out positions in reasoning mode too (generate, extract, match), not only by
            the argmax (NTP mode); False saves the generation time.
        val_budget: Budget of reasoning-mode validation and test outside ``fit`` (None: the TokenBudget
            callback's final budget, at progress 1, or ``budget`` without one). During ``fit``, validation
            uses the current budget.
        val_group_size: Completions per held-out position in reasoning mode; accuracy is their mean.
        val_temperature: Sampling temperature in reasoning-mode evaluation (0: greedy, the default).
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
        temperature: float = 0.8,
        top_p: float = 1.0,
        clip_eps: float = 0.2,
        advantage_eps: float = 1e-4,
        beta: float = 0.01,
        ntp_weight: float = 0.1,
        rl: bool = True,
        length_reward_weight: float = 0.1,
        length_reward_only_when_correct: bool = False,
        r_max: float = 1.0,
        correctness: str = "exact",
        budget: int = 800,
        answer_allowance: int = 16,
        max_response_length: int = 2048,
        budget_forcing: bool = False,
        instruction: str = DEFAULT_INSTRUCTION,
        response_prefix: str = RESPONSE_PREFIX,
        use_chat_template: bool = True,
        format_warmup_steps: int = 0,
        format_only: bool = False,
        format_warmup_lr: float | None = None,
        format_warmup_thought: str = "The next token continues the text.",
        format_warmup_budgets: list[int] | None = None,
        updates_per_rollout: int = 1,
        mini_batches_per_rollout: int = 1,
        rl_micro_batch_size: int = 8,
        ntp_micro_batch_size: int = 4,
        gradient_checkpointing: bool = False,
        share_prompt_attention: bool = True,
        prepack_weights: bool = True,
        gather_weights_for_rollouts: bool = True,
        sample_seed: int = 0,
        log_samples: int = 4,
        max_consecutive_skips: int = 5,
        val_reasoning: bool = True,
        val_budget: int | None = None,
        val_group_size: int = 1,
        val_temperature: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_module_arguments(self.hparams)
        self.init_rl_state()
        self.budget = budget
        """Current reasoning budget B: ``budget``, or where the TokenBudget callback's schedule is (it sets it)."""
        self.final_budget = budget
        """Budget at the end of training (progress 1), what a finished model is evaluated with outside ``fit``:
        ``budget``, or the TokenBudget callback's final budget (it sets it)."""
        self.last_sampled_entropies: Tensor | None = None
        self.last_reasoning_lengths: Tensor | None = None
        self.eval_metrics = torch.nn.ModuleDict({stage: EvaluationMetrics() for stage in EVAL_STAGES})
        self.eval_samples: list[dict] = []
        """A few completions of the latest evaluation, for the completions table."""
        self.eval_reasoning_lengths: list[int] = []
        """Reasoning length of every completion of the latest evaluation on this rank (for a histogram)."""
        self.last_evaluation: dict = {}
        """Figures of the latest validation or test, as written to ``<log_dir>/<stage>_metrics.json``."""

    # ---- the step: format warm-up, NTP only, or RL -----------------------------------------------------

    def training_step(self, batch: PositionBatch, batch_idx: int) -> None:
        """One optimizer step: format warm-up, NTP only, or RL (trajectory, GRPO + lambda NTP); then update."""
        hp = self.hparams
        budget, started = int(self.budget), time.perf_counter()
        contexts, continuations = batch.contexts, batch.continuations
        documents, attention = batch.documents, batch.document_attention_mask
        in_warmup = self.global_step < self.format_steps
        # Every key is logged every step: Lightning repeats a key's last value on steps that skip it.
        metrics = {"train/budget": float(budget), "train/format_warmup": float(in_warmup), "train/rollout_update": 0.0}
        if in_warmup:
            loss = self.format_warmup_backward(contexts, continuations, budget)
            shown = {"warmup_loss": loss}
        elif not hp.rl:
            # NTP only: every position of the documents, the sampled ones included.
            loss = metrics["train/loss_ntp"] = self.ntp_backward(documents, attention, attention.bool(), 1.0)
            shown = {"ntp_loss": loss}
        else:
            loss, rl_metrics = self.rl_step(
                batch, lambda: self.collect_trajectory(contexts, continuations, budget))
            started += rl_metrics["timing/generate"]
            metrics.update(rl_metrics)
            shown = {"reward": metrics["train/reward"], "budget": float(budget)}
        metrics["timing/update"] = time.perf_counter() - started
        metrics.update(curriculum_metrics(batch))
        self.last_sampled_entropies = batch.entropies.detach().cpu()
        self.update_and_log(loss, metrics, shown, len(contexts))

    # ---- a rollout and its rewards --------------------------------------------------------------------

    def collect_trajectory(self, contexts: list[list[int]], continuations: list[list[bytes]], budget: int) -> Trajectory:
        """Prompts, G completions each, their rewards and their group-normalised advantages."""
        prompts = self._prompts(contexts, budget)
        rollout = self.generate_rollout(prompts, budget)
        rewards, correct, length = self.rewards(rollout, continuations, budget)
        advantages = group_advantages(rewards, eps=self.hparams.advantage_eps).flatten()
        return Trajectory(prompts, rollout, rewards, correct, length, advantages)

    def generate_rollout(self, prompts: list[list[int]], budget: int, group_size: int | None = None,
                         temperature: float | None = None) -> Rollout:
        """The rollout of ``prompts``: G completions each under budget ``budget`` (thinking cap 2B, plus the answer
        allowance); ``group_size`` and ``temperature`` replace the training values (evaluation uses its own)."""
        hp = self.hparams
        settings = GenerationSettings(
            group_size or hp.group_size, thinking_cap(budget), hp.answer_allowance,
            temperature=hp.temperature if temperature is None else temperature, top_p=hp.top_p,
            budget_forcing=hp.budget_forcing, response_prefix=hp.response_prefix, max_new_tokens=hp.max_response_length)
        return self._generate(prompts, settings)

    def rewards(self, rollout: Rollout, continuations: list[list[bytes]], budget: int) -> tuple[Tensor, Tensor, Tensor]:
        """Rewards ``[P, G]``: total, correctness and length parts (``method.completion_rewards``)."""
        hp = self.hparams
        return completion_rewards(rollout.predictions, rollout.reasoning_lengths, continuations, budget, hp.correctness,
                                  hp.r_max, hp.length_reward_weight, hp.length_reward_only_when_correct)

    def _prompts(self, contexts: list[list[int]], budget: int | list[int]) -> list[list[int]]:
        """The prompt of each context at ``budget`` (one for all, or one per context)."""
        hp = self.hparams
        budgets = budget if isinstance(budget, list) else [budget] * len(contexts)
        return [
            build_prompt_ids(self.tokenizer, self.tokenizer.decode(ctx), b, hp.instruction, hp.response_prefix, hp.use_chat_template)
            for ctx, b in zip(contexts, budgets)
        ]

    # ---- the other losses (rl/losses.py) -------------------------------------------------------------

    def finish_rl_backward(self, batch: PositionBatch, part: Trajectory, mini_batch: int,
                           terms: dict) -> tuple[float, dict[str, float]]:
        """lambda NTP on the mini-batch's share of the documents; the RL step's figures."""
        hp = self.hparams
        loss_ntp = self.ntp_backward(*self._ntp_share(batch, mini_batch), hp.ntp_weight) if hp.ntp_weight > 0 else 0.0
        return hp.ntp_weight * loss_ntp, rl_step_metrics(part, terms, loss_ntp)

    def ntp_backward(self, documents: Tensor, attention: Tensor, ntp_mask: Tensor, weight: float) -> float:
        """Teacher-forced NLL over the masked positions of the documents, scaled by ``weight``; returns the NLL."""
        return losses.ntp_backward(self.policy, self._trainer, self.manual_backward, documents, attention, ntp_mask,
                                   weight, self.hparams.ntp_micro_batch_size)

    def format_warmup_backward(self, contexts: list[list[int]], continuations: list[list[bytes]], budget: int) -> float:
        """NLL of demonstrations ``thought</think> \\boxed{next token}`` after each prompt (response tokens only),
        each at ``budget`` or at its turn of ``format_warmup_budgets``."""
        hp = self.hparams
        budgets = [budget] * len(contexts)
        if hp.format_warmup_budgets:
            # Counted over the global batch, so the budgets take turns across steps and ranks alike.
            first = (self.global_step * self._trainer.world_size + self.global_rank) * len(contexts) if self._trainer else 0
            cycle = list(hp.format_warmup_budgets)
            budgets = [cycle[(first + i) % len(cycle)] for i in range(len(contexts))]
        responses = demonstration_ids(self.tokenizer, contexts, continuations, hp.format_warmup_thought, budgets)
        pad = self.tokenizer.pad_token_id
        tensors = (*pad_left(self._prompts(contexts, budgets), pad), *pad_right(responses, pad))
        batch = CompletionBatch(*(t.to(self.root_device) for t in tensors))
        return losses.demonstrations_backward(self.policy, self._trainer, self.manual_backward, batch)

    def _ntp_share(self, batch: PositionBatch, mini_batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """Documents, attention mask and NTP mask of mini-batch ``mini_batch``'s share of the batch's documents
        (cut into ``mini_batches_per_rollout`` contiguous parts, so a pass over a rollout trains NTP on each
        document once, as a step of one mini-batch does)."""
        share = contiguous_share(len(batch.documents), self.hparams.mini_batches_per_rollout, mini_batch)
        documents, attention, mask = batch.documents[share], batch.document_attention_mask[share], batch.ntp_mask[share]
        if len(documents) == 0:
            # Fewer documents than mini-batches: this one trains no NTP, but still runs the passes (at weight 0)
            # that the other ranks run.
            documents, attention, mask = batch.documents[:1], batch.document_attention_mask[:1], torch.zeros_like(batch.ntp_mask[:1])
        return documents, attention, mask

    def _keep_samples(self, batch: PositionBatch, rollout: Rollout, rewards: Tensor) -> None:
        """What the CompletionsTable callback shows of this step: a few completions and every reasoning length."""
        self.last_samples = completion_samples(self.tokenizer, batch, rollout, rewards, self.hparams.log_samples)
        self.last_reasoning_lengths = torch.tensor(rollout.reasoning_lengths, dtype=torch.float32)

    # ---- validation and test -----------------------------------------------------------------------

    def evaluation_budget(self) -> int:
        """Budget of reasoning-mode evaluation (``evaluation.tier_metrics.evaluation_budget``)."""
        fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        return evaluation_budget(fitting, int(self.budget), int(self.final_budget), self.hparams.val_budget)

    def _evaluate(self, batch: PositionBatch, batch_idx: int, stage: str) -> None:
        """Score one batch of held-out positions in NTP mode and, with ``val_reasoning``, in reasoning mode."""
        hp = self.hparams
        metrics = self.eval_metrics[stage]
        if batch_idx == 0:
            self.eval_samples, self.eval_reasoning_lengths = [], []
        hits = argmax_hits(self.policy, batch.contexts, batch.next_token_ids, self.tokenizer.pad_token_id)
        metrics.ntp.update(hits, batch.tiers)
        if not hp.val_reasoning:
            return
        budget = self.evaluation_budget()
        rollout = self.generate_rollout(self._prompts(batch.contexts, budget), budget, hp.val_group_size,
                                        hp.val_temperature)
        rewards, correct, _ = self.rewards(rollout, batch.continuations, budget)
        metrics.update_reasoning(correct, rollout.predictions, rollout.reasoning_lengths, batch.tiers)
        self.eval_reasoning_lengths.extend(rollout.reasoning_lengths)
        if batch_idx == 0:
            self.eval_samples = completion_samples(self.tokenizer, batch, rollout, rewards, self.hparams.log_samples)

    def _log_evaluation(self, stage: str) -> None:
        """Log the stage's figures (reduced across ranks) and write them as JSON next to the TensorBoard run."""
        hp = self.hparams
        metrics = self.eval_metrics[stage]
        figures, positions = metrics.compute(stage, reasoning=hp.val_reasoning)
        metrics.reset()
        # Already reduced across ranks by torchmetrics: a second reduction would be wasted communication.
        self.log_dict(figures, sync_dist=False)
        headline = "acc_avg" if hp.val_reasoning and hp.rl else "ntp_acc_avg"
        # The TensorBoard logger shows hp_metric next to the hparams: the accuracy the paper scores this model by.
        self.log("hp_metric", figures[f"{stage}/{headline}"], sync_dist=False)
        budget = self.evaluation_budget() if hp.val_reasoning else None
        self.last_evaluation = evaluation_record(stage, self.global_step, self.current_epoch, positions, budget,
                                                 headline, figures)
        folder = self.trainer.log_dir  # a collective under DDP: every rank asks, rank 0 writes
        if folder is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            write_figures(folder, stage, self.last_evaluation)

    def validation_step(self, batch: PositionBatch, batch_idx: int) -> None:
        """Next-token accuracy at held-out positions on the nested tiers H > 0.5, 1.0, 1.5, in both modes."""
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: PositionBatch, batch_idx: int) -> None:
        """As ``validation_step``, logged under ``test/``."""
        self._evaluate(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # ---- what the shared step reads of this task ---------------------------------------------------

    @property
    def uses_rl(self) -> bool:
        return bool(self.hparams.rl)

    @property
    def format_steps(self) -> int:
        """How many first optimizer steps train on format demonstrations (every one with ``format_only``)."""
        return sys.maxsize if self.hparams.get("format_only") else self.hparams.format_warmup_steps

    @property
    def format_lr_factor(self) -> float:
        hp = self.hparams
        return 1.0 if hp.format_warmup_lr is None else hp.format_warmup_lr / hp.lr
