"""Several optimizer steps per rollout (``updates_per_rollout`` U, ``mini_batches_per_rollout`` M) on the tiny model:
after the first update the ratio leaves 1 and the clip acts; the U*M steps of a rollout train on one draw, each on
its mini-batch and share of the documents, and every counter counts optimizer steps; a checkpoint written inside a
rollout's steps resumes exactly; bad values are refused. U = M = 1 is today's step, pinned by test_recipe.py."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from test_configs import CONFIG_DIR, _differences
from test_training import make_run

from rmt_lightning import PeriodicCheckpoint, RMTModule, TokenBudget
from rmt_lightning.rl import losses
from rmt_lightning.runtime.errors import InputError
from rmt_lightning.method import token_budget
from rmt_lightning.module import lr_factor
from rmt_lightning.rl.reuse import CHECKPOINT_KEY as REUSED_TRAJECTORIES

G = 4


class Steps(L.Callback):
    """What each training step saw and logged, in order."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append({
            "step": trainer.global_step, "draw": (tuple(batch.position_documents.tolist()), tuple(batch.positions.tolist())),
            "documents": batch.documents.clone(), "drawn_at": batch.drawn_at_step, "update": batch.rollout_update,
            "progress": batch.curriculum_progress, "budget": pl_module.budget,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[-1].update({tag: float(value) for tag, value in trainer.callback_metrics.items() if tag.startswith("train/")})

    def logged(self, tag: str) -> list[float]:
        return [step.get(tag) for step in self.seen]


def fit(tmp_path, model: dict, data: dict | None = None, callbacks=(), ckpt_path=None, **trainer):
    """A run of the tiny model (test_training's); its module, trainer and the ``Steps`` it recorded."""
    steps = Steps()
    module, datamodule, run = make_run(tmp_path, model=model, data=data, callbacks=[*callbacks, steps], **trainer)
    run.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, run, steps


def record_log_ratios(monkeypatch) -> list[float]:
    """The largest |log pi - log pi_old| over the sampled tokens of every GRPO loss computed, in order."""
    seen, original = [], losses.grpo_token_loss_terms

    def recording(logprobs, old_logprobs, advantages, mask, **kwargs):
        seen.append(float(((logprobs.detach() - old_logprobs).abs() * mask).max()))
        return original(logprobs, old_logprobs, advantages, mask, **kwargs)

    monkeypatch.setattr(losses, "grpo_token_loss_terms", recording)
    return seen


# ---- the ratio and the clip ----------------------------------------------------------------------------------


def test_the_second_update_of_a_rollout_sees_a_ratio_away_from_one(tmp_path, monkeypatch):
    """pi_old is the sampling policy, by the loss's own forward: at the rollout's first update the ratio is
    exactly 1, at its second the first update has moved the policy. With one update per rollout pi_old is the
    current policy itself: the ratio is exactly 1."""
    L.seed_everything(0)
    ratios = record_log_ratios(monkeypatch)
    fit(tmp_path / "two", {"updates_per_rollout": 2, "rl_micro_batch_size": 2 * G}, max_steps=2)
    first, second = ratios
    assert first == 0.0 and second > 1e-2, ratios

    ratios.clear()
    fit(tmp_path / "one", {"rl_micro_batch_size": 2 * G}, max_steps=2)
    assert ratios == [0.0, 0.0]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_pi_old_comes_from_the_losss_forward_so_the_ratio_is_exactly_one_while_the_policy_has_not_moved(
        precision, tmp_path, monkeypatch):
    """U = M = 2 at lr 0: the policy never moves, so every update of the rollout, of either mini-batch, sees a
    ratio of exactly 1, also under bf16-mixed, where the rollout decodes in bf16 and the loss runs in autocast:
    pi_old is taken by the loss's own forward (mini-batch 1's before the first optimizer step), never by the
    decoding's."""
    ratios = record_log_ratios(monkeypatch)
    L.seed_everything(0)
    fit(tmp_path, {"updates_per_rollout": 2, "mini_batches_per_rollout": 2, "lr": 0.0}, {"batches_per_epoch": 4},
        max_steps=4, precision=precision)
    assert len(ratios) >= 4 and ratios == [0.0] * len(ratios), ratios


def spread_rewards(module, rollout, continuations, budget):
    """Rewards 0, 1, ..., G-1 in every group: non-zero advantages from a model that earns no reward."""
    rewards = torch.arange(G, dtype=torch.float32).repeat(len(continuations), 1)
    return rewards, rewards, torch.zeros_like(rewards)


def test_the_clip_acts_on_the_second_update_of_a_rollout(tmp_path, monkeypatch):
    """With advantages and clip_eps 1e-6, the second update of a rollout finds tokens whose ratio the first
    update pushed out of [1 - eps, 1 + eps] in the direction of their advantage: train/ppo_clip_fraction > 0.
    With one update per rollout it stays 0."""
    monkeypatch.setattr(RMTModule, "rewards", spread_rewards)
    L.seed_everything(0)
    _, _, reused = fit(tmp_path / "two", {"updates_per_rollout": 2, "clip_eps": 1e-6}, max_steps=2)
    assert reused.logged("train/ppo_clip_fraction")[1] > 0.1, reused.seen
    _, _, single = fit(tmp_path / "one", {"clip_eps": 1e-6}, max_steps=2)
    assert single.logged("train/ppo_clip_fraction") == [0.0, 0.0]


def test_the_reference_runs_once_per_mini_batch_of_a_rollout_and_reusing_it_changes_nothing(tmp_path, monkeypatch):
    """U = M = 2, one rollout of 4 steps (mini-batches 0, 1, 0, 1): the frozen reference runs at each mini-batch's
    first update only, and every logged figure equals a run whose reference runs at every update."""
    reference_passes, original_logprobs = [], losses.model_logprobs

    def counting(model, *args, **kwargs):
        if not model.training:  # the reference's forward (the policy's, pi_old's among them, run in training mode)
            reference_passes[-1] += 1
        return original_logprobs(model, *args, **kwargs)

    class CountPerStep(L.Callback):
        def on_train_batch_start(self, *args):
            reference_passes.append(0)

    monkeypatch.setattr(losses, "model_logprobs", counting)
    reuse = {"updates_per_rollout": 2, "mini_batches_per_rollout": 2}
    L.seed_everything(0)
    _, _, reused = fit(tmp_path / "reused", reuse, {"batches_per_epoch": 4}, [CountPerStep()], max_steps=4)
    reused_passes = list(reference_passes)
    reference_passes.clear()

    original_rl = RMTModule.rl_backward
    monkeypatch.setattr(RMTModule, "rl_backward",
                        lambda module, part, old_logprobs=None, reference_logprobs=None: original_rl(module, part, old_logprobs))
    L.seed_everything(0)
    _, _, recomputed = fit(tmp_path / "recomputed", reuse, {"batches_per_epoch": 4}, [CountPerStep()], max_steps=4)
    assert reused_passes[0] >= 1 and reused_passes == [reused_passes[0], reused_passes[1], 0, 0], reused_passes
    assert reference_passes == reused_passes[:2] * 2
    for tag in ("train/loss", "train/loss_rl", "train/kl", "train/ppo_clip_fraction"):
        assert reused.logged(tag) == recomputed.logged(tag), tag


# ---- one draw per rollout; the counters count optimizer steps ------------------------------------------------

STEPS, PER_EPOCH, WARMUP = 10, 5, 1
REUSE = {"updates_per_rollout": 2, "mini_batches_per_rollout": 2, "format_warmup_steps": WARMUP, "lr_warmup_steps": 4}
BUDGET = {"b0": 40, "b_min": 3, "gamma": 0.1, "k": 1.0}


def test_the_steps_of_a_rollout_share_one_draw_and_every_counter_counts_optimizer_steps(tmp_path, monkeypatch):
    """U = M = 2 after one warm-up step, 2 epochs of 5 steps: steps 1-4 train on one draw, 5-8 on the next, 9
    starts a third (cut short by the end of the run); a draw is the one its first step makes without reuse, at
    that step's curriculum progress. global_step, the budget per step, the LR schedule and the periodic checkpoints
    count the 10 optimizer steps. Step u of a rollout trains mini-batch u % 2 (a whole group of G completions, with
    the sampling policy's log-probs as pi_old) and its half of the documents."""
    trained = []
    original_rl, original_ntp = RMTModule.rl_backward, RMTModule.ntp_backward

    def rl_backward(module, part, old_logprobs=None, reference_logprobs=None):
        trained.append({"part": part, "whole": module.reuse.kept, "old": old_logprobs})
        return original_rl(module, part, old_logprobs, reference_logprobs)

    def ntp_backward(module, documents, attention, ntp_mask, weight):
        trained[-1]["documents"] = documents.clone()
        return original_ntp(module, documents, attention, ntp_mask, weight)

    monkeypatch.setattr(RMTModule, "rl_backward", rl_backward)
    monkeypatch.setattr(RMTModule, "ntp_backward", ntp_backward)
    periodic = tmp_path / "periodic"
    module, trainer, steps = fit(tmp_path / "reuse", REUSE, {"batches_per_epoch": PER_EPOCH},
                                 [TokenBudget(**BUDGET, granularity="step"), PeriodicCheckpoint(every_n_steps=3, keep_last=10, dirpath=str(periodic))],
                                 max_epochs=STEPS // PER_EPOCH)

    assert trainer.global_step == trainer.estimated_stepping_batches == STEPS
    assert [s["step"] for s in steps.seen] == list(range(STEPS))
    assert [s["update"] for s in steps.seen] == [0, 0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert [s["drawn_at"] for s in steps.seen] == [0, 1, 1, 1, 1, 5, 5, 5, 5, 9]
    assert steps.logged("train/rollout_update") == [0, 0, 1, 2, 3, 0, 1, 2, 3, 0]
    draws = [s["draw"] for s in steps.seen]
    assert len(set(draws)) == 4 and all(draws[t] == draws[s["drawn_at"]] for t, s in enumerate(steps.seen))
    assert [s["progress"] for s in steps.seen] == pytest.approx([s["drawn_at"] / STEPS for s in steps.seen])
    assert [s["budget"] for s in steps.seen] == [token_budget(t / STEPS, **BUDGET) for t in range(STEPS)]
    assert [s["lr"] for s in steps.seen] == pytest.approx([1e-3 * lr_factor(t, WARMUP, 4, 1.0) for t in range(STEPS)])
    assert sorted(p.name for p in periodic.iterdir()) == [f"periodic-step={s:08d}.ckpt" for s in (3, 6, 9)]

    assert len(trained) == STEPS - WARMUP
    for t, step in zip(range(WARMUP, STEPS), trained):
        part, whole, half = step["part"], step["whole"], steps.seen[t]["update"] % 2
        assert part.prompts == whole.prompts[half : half + 1] and len(part.rollout.texts) == G
        # pi_old: the first update's own forward for mini-batch 0, else the sampling policy's, kept on the trajectory.
        if steps.seen[t]["update"] == 0:
            assert step["old"] is None
        else:
            assert torch.equal(step["old"], whole.old_logprobs[half]) and step["old"].shape == (G, part.rollout.completion_ids.shape[1])
        assert torch.equal(part.advantages, whole.advantages[half * G : (half + 1) * G])
        documents = steps.seen[t]["documents"]
        assert torch.equal(step["documents"], torch.tensor_split(documents, 2)[half] if len(documents) > 1 else documents)

    _, _, single = fit(tmp_path / "single", {"format_warmup_steps": WARMUP}, {"batches_per_epoch": PER_EPOCH},
                       max_epochs=STEPS // PER_EPOCH)
    assert all(draws[t] == single.seen[s["drawn_at"]]["draw"] for t, s in enumerate(steps.seen))


# ---- exact resume inside a rollout's steps -------------------------------------------------------------------

RESUME = {"updates_per_rollout": 2, "mini_batches_per_rollout": 2, "format_warmup_steps": 1, "beta": 0.05}
RESUME_STEPS, RESUME_PER_EPOCH = 8, 4


def resumable_run(folder: Path, model: Path, ckpt_path=None):
    """Steps 0 (warm-up), 1-4 (a rollout, across the epoch boundary), 5-7 (the next, cut short), a checkpoint
    after every step; the dropout model draws from the global RNG in every forward."""
    L.seed_everything(0)
    return fit(folder, {**RESUME, "model_name_or_path": str(model)},
               {"model_name_or_path": str(model), "batches_per_epoch": RESUME_PER_EPOCH},
               [TokenBudget(b0=8, b_min=2, gamma=0.25), PeriodicCheckpoint(every_n_steps=1, keep_last=100, dirpath=str(folder / "ckpt"))],
               ckpt_path=ckpt_path, max_epochs=RESUME_STEPS // RESUME_PER_EPOCH)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dropout_model):
    folder = tmp_path_factory.mktemp("uninterrupted")
    module, trainer, steps = resumable_run(folder, dropout_model)
    assert trainer.global_step == RESUME_STEPS
    return folder, module.policy.state_dict(), steps


@pytest.mark.parametrize("resume_at", [3, 4, 6], ids=["mid-rollout", "mid-rollout-at-epoch-end", "second-rollout"])
def test_a_checkpoint_inside_a_rollouts_steps_resumes_exactly(resume_at, uninterrupted, dropout_model, tmp_path):
    """Resumed from the checkpoint written after ``resume_at`` steps (the kept trajectory in it, loadable with
    weights_only), the run logs the uninterrupted run's per-step losses and ends with its weights, bit for bit."""
    folder, weights, full = uninterrupted
    path = folder / "ckpt" / f"periodic-step={resume_at:08d}.ckpt"
    [kept] = torch.load(path, weights_only=True)[REUSED_TRAJECTORIES]
    assert kept["drawn_at_step"] == (1 if resume_at < 5 else 5)

    module, trainer, resumed = resumable_run(tmp_path, dropout_model, ckpt_path=str(path))
    assert trainer.global_step == RESUME_STEPS
    assert [s["step"] for s in resumed.seen] == list(range(resume_at, RESUME_STEPS))
    for tag in ("train/loss", "train/loss_rl", "train/loss_ntp", "train/ppo_clip_fraction", "train/rollout_update"):
        assert resumed.logged(tag) == full.logged(tag)[resume_at:], tag
    assert max(float((module.policy.state_dict()[name] - value).abs().max()) for name, value in weights.items()) == 0.0


def test_a_trajectory_kept_before_pi_old_came_from_the_losss_forward_resumes_on_its_recorded_logprobs(
        uninterrupted, dropout_model, tmp_path):
    """Checkpoints written before ``Trajectory.old_logprobs`` existed kept pi_old as the rollout's recorded
    log-probs (``Rollout.logprobs``): such a checkpoint resumes on them. Emulated with the same values, laid out
    as the rollout's rows, the resumed run logs the uninterrupted run's figures exactly."""
    folder, weights, full = uninterrupted
    checkpoint = torch.load(folder / "ckpt" / "periodic-step=00000003.ckpt", weights_only=True)
    [kept] = checkpoint[REUSED_TRAJECTORIES]
    old = kept.pop("old_logprobs")
    kept["rollout"]["logprobs"] = torch.cat([old[m] for m in sorted(old)])
    torch.save(checkpoint, tmp_path / "older.ckpt")
    module, _, resumed = resumable_run(tmp_path, dropout_model, ckpt_path=str(tmp_path / "older.ckpt"))
    for tag in ("train/loss", "train/loss_rl", "train/ppo_clip_fraction"):
        assert resumed.logged(tag) == full.logged(tag)[3:], tag
    assert max(float((module.policy.state_dict()[name] - value).abs().max()) for name, value in weights.items()) == 0.0


def test_after_a_rollouts_last_step_nothing_is_kept_and_an_older_checkpoint_still_resumes(uninterrupted, dropout_model, tmp_path):
    """The checkpoint after a rollout's last update holds no trajectory; one without the key at all (written
    before updates could reuse rollouts) resumes too, collecting the rollout of its step again."""
    folder, _, _ = uninterrupted
    assert torch.load(folder / "ckpt" / "periodic-step=00000005.ckpt", weights_only=True)[REUSED_TRAJECTORIES] == [None]
    checkpoint = torch.load(folder / "ckpt" / "periodic-step=00000003.ckpt", weights_only=True)
    del checkpoint[REUSED_TRAJECTORIES]
    torch.save(checkpoint, tmp_path / "older.ckpt")
    _, trainer, resumed = resumable_run(tmp_path, dropout_model, ckpt_path=str(tmp_path / "older.ckpt"))
    assert trainer.global_step == RESUME_STEPS and resumed.logged("train/rollout_update")[:2] == [2, 3]


# ---- bad values and the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["updates_per_rollout", "mini_batches_per_rollout"])
def test_fewer_than_one_is_refused_with_one_message(name):
    with pytest.raises(ValueError, match=f"^{name}=0 is not valid: it must be >= 1$"):
        RMTModule(**{name: 0})


def test_mini_batches_that_do_not_divide_the_positions_are_refused_at_the_first_rl_step(tmp_path):
    """The Python API has no CLI preflight (tests/test_reliability.py checks the command's): the step refuses."""
    with pytest.raises(InputError, match=r"mini_batches_per_rollout=3 does not cut data.batch_size=2 RL positions .* "
                                         r"valid: a divisor of 2 \(\[1, 2\]\)"):
        fit(tmp_path, {"mini_batches_per_rollout": 3}, max_steps=1)


def test_the_reuse_config_is_rmt_with_four_steps_per_rollout():
    assert _differences("rmt_reuse_rollouts") == {"model.updates_per_rollout", "model.mini_batches_per_rollout",
                                                  "trainer.logger.init_args.name"}
    model = yaml.safe_load((CONFIG_DIR / "rmt_reuse_rollouts.yaml").read_text())["model"]
    assert (model["updates_per_rollout"], model["mini_batches_per_rollout"]) == (2, 2)
