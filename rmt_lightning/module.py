"""RMTModule: one training step = rollout -> rewards -> GRPO on key positions + NTP on the rest -> optimizer step."""

from __future__ import annotations

import copy
import math
import sys
import time

import lightning as L
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
from lightning.pytorch.trainer.states import TrainerFn
import numpy as np
import torch
from torch import Tensor

from .checks import check_mini_batches, check_module_arguments
from .data.batches import PositionBatch
from .data.datamodule import RMTDataModule
from .data.sampler import DrawRepeats
from .engine.builtin_models import BUILTIN_SMOLLM2
from .engine.forward import CompletionBatch, ForwardOptions
from .engine.generation import DecodingOptions, GenerationSettings, Rollout, generate_group
from .engine.models import enable_gradient_checkpointing, load_causal_lm, load_tokenizer, parse_dtype
from .engine.padding import pad_left, pad_right
from .engine.prompts import DEFAULT_INSTRUCTION, RESPONSE_PREFIX, build_prompt_ids, demonstration_ids
from .engine.tokens import TokenBytes
from .evaluation.tier_metrics import (
    EVAL_STAGES, EvaluationMetrics, argmax_hits, evaluation_budget, evaluation_record, write_figures,
)
from .method import completion_rewards, contiguous_share, group_advantages, thinking_cap
from .rl import losses
from .rl.reuse import RolloutReuse
from .rl.metrics import as_tensors, completion_samples, curriculum_metrics, rl_step_metrics, show_in_progress_bar
from .rl.trajectory import Trajectory
from .runtime.checkpointing import (
    as_batch_end_checkpoint, count_the_next_epoch_after_resume, restore_rng_states, rng_states,
)
from .runtime.distributed import (
    agreement, all_ranks, gather_objects, gradients_finite, is_fsdp1, is_sharded, shard_models, world_size,
)


def lr_factor(step: int, format_warmup_steps: int, lr_warmup_steps: int, format_factor: float) -> float:
    """Learning rate at optimizer step ``step`` as a multiple of ``lr``: ``format_factor`` during the format
    warm-up, then a linear warm-up over ``lr_warmup_steps`` (0: none) to a constant 1."""
    if step < format_warmup_steps:
        return format_factor
    return min(1.0, (step - format_warmup_steps + 1) / max(1, lr_warmup_steps))


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients were NaN/inf on ``max_consecutive_skips`` steps in a row."""


class RMTModule(L.LightningModule):
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
        self.automatic_optimization = False
        self.budget = budget
        """Current reasoning budget B: ``budget``, or where the TokenBudget callback's schedule is (it sets it)."""
        self.final_budget = budget
        """Budget at the end of training (progress 1), what a finished model is evaluated with outside ``fit``:
        ``budget``, or the TokenBudget callback's final budget (it sets it)."""
        self.policy = None
        self.reference = None
        self.tokenizer = None
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_samples: list[dict] = []
        self.last_sampled_entropies: Tensor | None = None
        self.last_reasoning_lengths: Tensor | None = None
        self._policy_sharded = self._reference_sharded = False
        self.reuse = RolloutReuse(updates_per_rollout, mini_batches_per_rollout)
        """Several steps on one rollout: the draw-repeat rule, the kept trajectory and its checkpoint part."""
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
            loss, rl_metrics = self.rl_step(batch, budget)
            started += rl_metrics["timing/generate"]
            metrics.update(rl_metrics)
            shown = {"reward": metrics["train/reward"], "budget": float(budget)}
        metrics["timing/update"] = time.perf_counter() - started
        self.update_or_skip(loss)
        metrics.update({"train/loss": loss, "train/skipped_steps": float(self.skipped_steps),
                        "train/lr": self.optimizers().param_groups[0]["lr"], **curriculum_metrics(batch)})
        self.last_sampled_entropies = batch.entropies.detach().cpu()
        self.log_dict(as_tensors(metrics, self.root_device), on_step=True, on_epoch=False, sync_dist=True,
                      batch_size=len(contexts))
        show_in_progress_bar(self, shown, batch_size=len(contexts))

    def rl_step(self, batch: PositionBatch, budget: int) -> tuple[float, dict[str, float]]:
        """The RL step's backward: the trajectory (collected, or kept from an earlier step of its rollout), GRPO on
        this step's mini-batch of it and lambda NTP on its share of the documents; returns the loss and figures."""
        hp, reuse, started = self.hparams, self.reuse, time.perf_counter()
        if reuse.reuses:
            check_mini_batches(hp.mini_batches_per_rollout, len(batch.contexts))
        trajectory, fresh = reuse.trajectory_for(
            batch.drawn_at_step, lambda: self.collect_trajectory(batch.contexts, batch.continuations, budget))
        generated = time.perf_counter()
        update = batch.rollout_update or 0
        mini_batch = reuse.mini_batch(update)
        if reuse.reuses and fresh:
            # The policy is still the one that sampled this rollout: pi_old of the other mini-batches is taken now,
            # by the loss's own forward (pi_old and pi in one precision and path: the ratio is exactly 1 wherever
            # the policy has not moved). This mini-batch's is its own forward's, below.
            for other in reuse.other_mini_batches(mini_batch):
                trajectory.old_logprobs[other] = self.policy_logprobs(reuse.part(trajectory, other))
        part = reuse.part(trajectory, mini_batch)
        old_logprobs = reuse.old_logprobs(trajectory, mini_batch, fresh)
        terms = self.rl_backward(part, old_logprobs, trajectory.reference_logprobs.get(mini_batch))
        reuse.record(trajectory, mini_batch, update, old_logprobs, terms)
        loss_ntp = self.ntp_backward(*self._ntp_share(batch, mini_batch), hp.ntp_weight) if hp.ntp_weight > 0 else 0.0
        metrics = rl_step_metrics(part, terms, loss_ntp)
        metrics.update({"train/rollout_update": float(update), "timing/generate": generated - started})
        self._keep_samples(batch, trajectory.rollout, trajectory.rewards)
        reuse.finish_step(update)
        return terms["loss_rl"] + hp.ntp_weight * loss_ntp, metrics

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
        options = DecodingOptions(share_prompt_attention=hp.share_prompt_attention, prepack_weights=hp.prepack_weights,
                                  gather_weights=hp.gather_weights_for_rollouts)
        # Only sharded weights make a forward a collective that every process must run (not under DDP).
        all_finished = agreement(self._trainer) if self._policy_sharded else None
        return generate_group(self.policy, self.tokenizer, prompts, settings, options, generator=self._generator(),
                              token_bytes=self._token_bytes, all_finished=all_finished)

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

    def _generator(self) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.hparams.sample_seed, self.global_step, self.global_rank]).generate_state(1)[0])
        return torch.Generator(device=self.root_device).manual_seed(seed)

    # ---- losses (rl/losses.py) and the update --------------------------------------------------------

    def _grpo_settings(self) -> losses.GRPOSettings:
        hp = self.hparams
        return losses.GRPOSettings(hp.clip_eps, hp.beta, hp.rl_micro_batch_size,
                                   ForwardOptions(share_prompt_attention=hp.share_prompt_attention))

    def _completions(self, trajectory: Trajectory) -> CompletionBatch:
        """What the losses read of a trajectory's completions, on the root device."""
        return CompletionBatch.of(trajectory.prompts, trajectory.rollout, self.tokenizer.pad_token_id, self.root_device)

    def rl_backward(self, trajectory: Trajectory, old_logprobs: Tensor | None = None,
                    reference_logprobs: Tensor | None = None) -> dict:
        """GRPO loss over all policy-sampled tokens, backpropagated in micro-batches; returns its logged terms
        and the policy's and reference's log-probs (``losses.rl_backward``). ``old_logprobs`` are pi_old (None: the
        current policy, ratio 1); ``reference_logprobs``, from an earlier update of these completions, stand in
        for the reference's forward."""
        old_logprobs, reference_logprobs = (None if t is None else t.to(self.root_device)
                                            for t in (old_logprobs, reference_logprobs))
        batch = losses.RLBatch(self._completions(trajectory), trajectory.advantages.to(self.root_device),
                               old_logprobs, reference_logprobs)
        return losses.rl_backward(self.policy, self._reference_model(), self._trainer, self.manual_backward, batch,
                                  self._grpo_settings())

    def policy_logprobs(self, trajectory: Trajectory) -> Tensor:
        """The current policy's log-probs of the trajectory's sampled tokens, by the loss's own forward, without
        gradients (``losses.policy_logprobs``)."""
        return losses.policy_logprobs(self.policy, self._trainer, self._completions(trajectory), self._grpo_settings())

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

    def update_or_skip(self, loss: float) -> None:
        """Clip the gradients and step the optimizer and the LR schedule, or, when the loss or a gradient is not
        finite on any rank, drop this update (and stop the run after ``max_consecutive_skips`` in a row)."""
        hp = self.hparams
        optimizer = self.optimizers()
        # One rank's non-finite loss reaches every rank through the gradient all-reduce: all skip together.
        if not all_ranks(self._trainer, math.isfinite(loss) and gradients_finite(self.policy)):
            # A non-finite loss or gradient would poison the weights and the optimizer moments.
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= hp.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"the loss or the gradients were NaN/inf on {self.consecutive_skips} consecutive steps (up to step "
                    f"{self.global_step}, epoch {self.current_epoch}; max_consecutive_skips={hp.max_consecutive_skips}), "
                    f"so the run stops; lower lr (now {hp.lr}), check the corpus, or resume from an earlier checkpoint"
                )
            return
        self.consecutive_skips = 0
        if hp.grad_clip > 0 and is_fsdp1(self.policy):
            # The norm over all shards; Lightning's FSDP1 precision plugin refuses norm clipping.
            self.policy.clip_grad_norm_(hp.grad_clip)
        elif hp.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

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

    # ---- Lightning hooks: models, optimizer, checkpoints -------------------------------------------------

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.model_name_or_path, trust_remote_code=hp.trust_remote_code)
        self._token_bytes = TokenBytes(self.tokenizer)
        self.policy = load_causal_lm(hp.model_name_or_path, dtype=parse_dtype(hp.dtype), trust_remote_code=hp.trust_remote_code)
        self.policy.train()  # from_pretrained returns eval mode; dropout, where a model has it, belongs to training
        if hp.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        reference = copy.deepcopy(self.policy).eval().requires_grad_(False) if hp.beta > 0 and hp.rl else None
        if reference is not None and hp.reference_dtype is not None:
            reference.to(parse_dtype(hp.reference_dtype))
        strategy = self._trainer.strategy if self._trainer is not None else None
        self.policy, reference = shard_models(strategy, self.device_mesh, self.policy, reference)
        if is_fsdp1(self.policy):
            # FSDP1 placed the wrapped models and Lightning leaves a module with FSDP inside it where it is, so the
            # module's own device (what Lightning's own code reads) is set here, without moving anything: a move
            # would put FSDP1's CPU-offloaded parameters on the GPU.
            _update_properties(self, device=strategy.root_device)
        self._policy_sharded = is_sharded(self.policy)
        self._reference_sharded = reference is not None and is_sharded(reference)
        # Not a registered submodule: the frozen initial policy stays out of the state dict (checkpoints, strict
        # loading of sharded checkpoints), out of the DDP wrapper and out of Lightning's precision and device
        # handling. It follows the policy's device when it is used.
        object.__setattr__(self, "reference", reference)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        format_factor = 1.0 if hp.format_warmup_lr is None else hp.format_warmup_lr / hp.lr
        # A plain function, not an object: LambdaLR's state dict then holds no schedule state (as in checkpoints so far).
        def factor(step: int) -> float:
            return lr_factor(step, self.format_steps, hp.lr_warmup_steps, format_factor)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        # The datamodule's sampler repeats a draw for the steps of one rollout: this module's arguments decide
        # which, so it tells the datamodule (whose setup has run) before the loaders are made.
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, RMTDataModule):
            datamodule.draw_repeats = self.draw_repeats()

    def draw_repeats(self) -> DrawRepeats:
        """Which training steps share a draw of positions: every format warm-up step and every NTP-only step
        draws its own; RL steps come ``steps_per_rollout`` to a draw (``RolloutReuse.draw_repeats``)."""
        return self.reuse.draw_repeats(self.format_steps) if self.hparams.rl else DrawRepeats()

    @property
    def format_steps(self) -> int:
        """How many first optimizer steps train on format demonstrations (every one with ``format_only``)."""
        return sys.maxsize if self.hparams.get("format_only") else self.hparams.format_warmup_steps

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps each rollout feeds: ``updates_per_rollout * mini_batches_per_rollout``."""
        return self.reuse.steps_per_rollout

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rmt_skipped_steps"] = self.skipped_steps
        checkpoint["rmt_consecutive_skips"] = self.consecutive_skips
        checkpoint["rng_states"] = rng_states()
        self.reuse.save(checkpoint, gather_objects)
        if self._trainer is not None:
            as_batch_end_checkpoint(checkpoint, self.trainer.num_training_batches)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        as_batch_end_checkpoint(checkpoint)
        self.skipped_steps = checkpoint.get("rmt_skipped_steps", 0)
        self.consecutive_skips = checkpoint.get("rmt_consecutive_skips", 0)
        self.reuse.load(checkpoint, self.global_rank, world_size(self._trainer))
        if "rng_states" in checkpoint:
            # Nothing draws from them between here and the first resumed step (the loaders have their own
            # generators), so the resumed steps see the generators the interrupted run would have.
            restore_rng_states(checkpoint["rng_states"])

    def on_train_start(self) -> None:
        count_the_next_epoch_after_resume(self.trainer)

    def on_fit_start(self) -> None:
        # Runs after the strategy's setup, where the precision plugin casts the weights (bf16-true, 16-true), and
        # before the first step: the dtypes read here are the ones the optimizer updates.
        from .runtime.precision import warn_if_updates_round_away

        if self.global_rank == 0:
            warn_if_updates_round_away(self.policy.parameters(), self.hparams.lr)

    @property
    def root_device(self) -> torch.device:
        """The device this process computes on: the strategy's root device, under every strategy. Everything the
        module creates or moves goes there (``self.device`` is not enough: under FSDP1 the models are wrapped inside
        the module, so Lightning never moves the module itself)."""
        return self._trainer.strategy.root_device if self._trainer is not None else self.device

    def _reference_model(self):
        """The frozen reference, where the policy is: not a registered submodule, so nothing moves it with the
        module; a sharded one was placed by its sharding."""
        if self.reference is not None and not self._reference_sharded:
            policy_device = next(self.policy.parameters()).device
            if next(self.reference.parameters()).device != policy_device:
                self.reference.to(policy_device)
        return self.reference
