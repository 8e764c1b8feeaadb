"""GRPOModule: the RL training step every task shares, rollout -> rewards -> GRPO -> update or skip, and the
Lightning hooks around it (models, optimizer, checkpoints). A task is a subclass that says what differs: how a
batch becomes prompts and rewards (``collect_trajectory``), what else a step backpropagates and logs
(``finish_rl_backward``), and how a model is evaluated. ``RMTModule`` (``module.py``) is the next-token task of
mid-training; ``PostTrainModule`` (``posttrain.py``) answers questions with a checkable answer."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import lightning as L
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
import numpy as np
import torch
from torch import Tensor

from .checks import check_mini_batches
from .data.sampler import DrawRepeats
from .engine.forward import CompletionBatch, ForwardOptions
from .engine.generation import DecodingOptions, GenerationSettings, Rollout, generate_group
from .engine.models import enable_gradient_checkpointing, load_causal_lm, load_tokenizer, parse_dtype
from .engine.tokens import TokenBytes
from .rl import losses
from .rl.metrics import as_tensors, show_in_progress_bar
from .rl.reuse import RolloutReuse
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


class GRPOModule(L.LightningModule):
    """The GRPO step and the hooks every task shares; a task subclasses it (``RMTModule``, ``PostTrainModule``).

    A subclass calls ``save_hyperparameters()`` and then ``init_rl_state()`` in its ``__init__``; the arguments
    this class reads from ``hparams`` are the subclasses' shared ones (model, optimizer, sampling, GRPO, rollout
    reuse, micro-batches, engine switches).
    """

    def init_rl_state(self) -> None:
        """The state of a run that is not a hyperparameter (models, counters, the kept rollout)."""
        hp = self.hparams
        self.automatic_optimization = False
        self.policy = None
        self.reference = None
        self.tokenizer = None
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_samples: list[dict] = []
        self._policy_sharded = self._reference_sharded = False
        self.reuse = RolloutReuse(hp.updates_per_rollout, hp.mini_batches_per_rollout)
        """Several steps on one rollout: the draw-repeat rule, the kept trajectory and its checkpoint part."""

    # ---- what a task says ------------------------------------------------------------------------------

    @property
    def uses_rl(self) -> bool:
        """Whether the run trains with RL at all (the next-token task's NTP-only baseline does not): without it no
        reference model is loaded and no draw is repeated."""
        return True

    @property
    def format_steps(self) -> int:
        """How many first optimizer steps train on format demonstrations instead of RL (none by default)."""
        return 0

    @property
    def format_lr_factor(self) -> float:
        """Learning rate of the format steps as a multiple of ``lr``."""
        return 1.0

    def finish_rl_backward(self, batch, part: Trajectory, mini_batch: int, terms: dict) -> tuple[float, dict[str, float]]:
        """After the GRPO backward of mini-batch ``mini_batch`` (``part``): backpropagate what else the task trains
        and return its weighted loss and the step's logged figures."""
        raise NotImplementedError

    def _keep_samples(self, batch, rollout: Rollout, rewards: Tensor) -> None:
        """What the CompletionsTable callback shows of this step."""
        raise NotImplementedError

    # ---- the RL step --------------------------------------------------------------------------------

    def rl_step(self, batch, collect: Callable[[], Trajectory]) -> tuple[float, dict[str, float]]:
        """The RL step's backward: the trajectory (``collect``ed, or kept from an earlier step of its rollout), GRPO
        on this step's mini-batch of it, and what else the task trains (``finish_rl_backward``); returns the loss and
        the step's figures."""
        hp, reuse, started = self.hparams, self.reuse, time.perf_counter()
        if reuse.reuses:
            check_mini_batches(hp.mini_batches_per_rollout, batch.size)
        trajectory, fresh = reuse.trajectory_for(batch.drawn_at_step, collect)
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
        extra_loss, metrics = self.finish_rl_backward(batch, part, mini_batch, terms)
        metrics.update({"train/rollout_update": float(update), "timing/generate": generated - started})
        self._keep_samples(batch, trajectory.rollout, trajectory.rewards)
        reuse.finish_step(update)
        return terms["loss_rl"] + extra_loss, metrics

    def update_and_log(self, loss: float, metrics: dict[str, float], shown: dict[str, float], batch_size: int) -> None:
        """The end of every training step: update or skip, then log the step's figures (``train/loss``,
        ``train/skipped_steps``, ``train/lr`` added) to every logger and ``shown`` on the progress bar."""
        self.update_or_skip(loss)
        metrics.update({"train/loss": loss, "train/skipped_steps": float(self.skipped_steps),
                        "train/lr": self.optimizers().param_groups[0]["lr"]})
        self.log_dict(as_tensors(metrics, self.root_device), on_step=True, on_epoch=False, sync_dist=True,
                      batch_size=batch_size)
        show_in_progress_bar(self, shown, batch_size=batch_size)

    def _generate(self, prompts: list[list[int]], settings: GenerationSettings) -> Rollout:
        """The rollout of ``prompts`` under ``settings``, decoded with the module's engine switches."""
        hp = self.hparams
        options = DecodingOptions(share_prompt_attention=hp.share_prompt_attention, prepack_weights=hp.prepack_weights,
                                  gather_weights=hp.gather_weights_for_rollouts)
        # Only sharded weights make a forward a collective that every process must run (not under DDP).
        all_finished = agreement(self._trainer) if self._policy_sharded else None
        return generate_group(self.policy, self.tokenizer, prompts, settings, options, generator=self._generator(),
                              token_bytes=self._token_bytes, all_finished=all_finished)


    def _generator(self) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.hparams.sample_seed, self.global_step, self.global_rank]).generate_state(1)[0])
        return torch.Generator(device=self.root_device).manual_seed(seed)

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
        reference = copy.deepcopy(self.policy).eval().requires_grad_(False) if hp.beta > 0 and self.uses_rl else None
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
        format_factor = self.format_lr_factor
        # A plain function, not an object: LambdaLR's state dict then holds no schedule state (as in checkpoints so far).
        def factor(step: int) -> float:
            return lr_factor(step, self.format_steps, hp.lr_warmup_steps, format_factor)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        # The datamodule's sampler repeats a draw for the steps of one rollout: this module's arguments decide
        # which, so it tells the datamodule (whose setup has run) before the loaders are made.
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "draw_repeats"):
            datamodule.draw_repeats = self.draw_repeats()


    def draw_repeats(self) -> DrawRepeats:
        """Which training steps share a draw: every format step and every step of a run without RL draws its own;
        RL steps come ``steps_per_rollout`` to a draw (``RolloutReuse.draw_repeats``)."""
        return self.reuse.draw_repeats(self.format_steps) if self.uses_rl else DrawRepeats()


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
