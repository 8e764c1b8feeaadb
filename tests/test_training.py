"""The RL loop on the tiny model: it updates every policy weight, never the reference, schedules the
budget exactly, checkpoints without the reference, exports a loadable model, and learns a learnable toy."""

import json
import math

import lightning as L
import pytest
import torch

from rmt_lightning import HuggingFaceExport, RMTDataModule, RMTModule, TokenBudget
from rmt_lightning.method import token_budget
from rmt_lightning.engine.models import BUILTIN_TINY, load_causal_lm


def make_run(tmp_path, callbacks=(), model=None, data=None, **trainer):
    module = RMTModule(**{"model_name_or_path": BUILTIN_TINY, "lr": 1e-3, "group_size": 4, "answer_allowance": 12,
                          "budget_forcing": True, "budget": 4, **(model or {})})
    datamodule = RMTDataModule(**{"model_name_or_path": BUILTIN_TINY, "embedded_documents": 48, "val_documents": 8,
                                  "batch_size": 2, "batches_per_epoch": 3, "max_context_tokens": 48,
                                  "val_positions": 8, "cache_dir": str(tmp_path / "cache"), **(data or {})})
    trainer = L.Trainer(**{"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                           "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                           "num_sanity_val_steps": 0, "limit_val_batches": 0, "use_distributed_sampler": False,
                           "default_root_dir": str(tmp_path), "callbacks": list(callbacks), **trainer})
    return module, datamodule, trainer


def test_three_steps_move_every_policy_weight_and_no_reference_weight(tmp_path):
    L.seed_everything(0)
    module, datamodule, trainer = make_run(tmp_path, model={"beta": 0.05, "ntp_weight": 0.1}, max_steps=3)
    trainer.fit(module, datamodule=datamodule)
    initial = load_causal_lm(BUILTIN_TINY).state_dict()
    assert trainer.global_step == 3
    for name, value in module.policy.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings
            continue
        assert not torch.equal(value, initial[name]), f"policy parameter {name} did not change"
    for name, value in module.reference.state_dict().items():
        assert torch.equal(value, initial[name]), f"reference parameter {name} changed"
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in module.reference.parameters())
    assert all(not p.requires_grad for p in module.reference.parameters())


def test_no_reference_model_when_beta_is_zero(tmp_path):
    module, datamodule, trainer = make_run(tmp_path, model={"beta": 0.0}, max_steps=1)
    trainer.fit(module, datamodule=datamodule)
    assert module.reference is None
    assert not any(name.startswith("reference.") for name in module.state_dict())


def test_reference_in_bfloat16_while_the_policy_trains_in_float32(tmp_path):
    module, datamodule, trainer = make_run(tmp_path, model={"reference_dtype": "bfloat16"}, max_steps=1)
    trainer.fit(module, datamodule=datamodule)
    assert {p.dtype for p in module.reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    kl = float(trainer.callback_metrics["train/kl"])
    assert math.isfinite(kl) and kl >= 0


class _SaveAtStep(L.Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class _DrawRecorder(L.Callback):
    def __init__(self):
        self.draws = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.draws.append((batch.curriculum_epoch, batch.curriculum_batch, batch.position_documents.tolist(), batch.positions.tolist()))


def test_checkpoint_has_policy_but_not_reference_and_resumes_the_same_draws(tmp_path):
    path = tmp_path / "step2.ckpt"
    full = _DrawRecorder()
    module, datamodule, trainer = make_run(tmp_path, model={"beta": 0.05}, max_steps=5, max_epochs=2,
                                           callbacks=[TokenBudget(b0=8, b_min=2, gamma=0.25), _SaveAtStep(2, path), full])
    trainer.fit(module, datamodule=datamodule)
    checkpoint = torch.load(path, weights_only=True)
    assert any(k.startswith("policy.") for k in checkpoint["state_dict"])
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])
    # The sampler runs a batch ahead of training; the checkpoint holds what training consumed.
    assert checkpoint["RMTDataModule"]["sampler"] == {"epoch": 0, "batches_yielded": 2, "seed": 0, "global_batch_size": 2}
    assert any("TokenBudget" in key for key in checkpoint["callbacks"])

    resumed_draws = _DrawRecorder()
    resumed, datamodule2, trainer2 = make_run(tmp_path, model={"beta": 0.05}, max_steps=5, max_epochs=2,
                                              callbacks=[TokenBudget(b0=8, b_min=2, gamma=0.25), resumed_draws])
    trainer2.fit(resumed, datamodule=datamodule2, ckpt_path=str(path))
    assert trainer2.global_step == 5
    assert resumed_draws.draws == full.draws[2:]


def test_export_loads_with_from_pretrained(tmp_path):
    export = tmp_path / "export"
    module, datamodule, trainer = make_run(tmp_path, model={"beta": 0.0}, max_steps=1, callbacks=[HuggingFaceExport(str(export))])
    trainer.fit(module, datamodule=datamodule)
    reloaded = load_causal_lm(str(export))
    for name, value in module.policy.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name])


class _BudgetRecorder(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, trainer.global_step, pl_module.budget))


@pytest.mark.parametrize("granularity", ["epoch", "step"])
def test_budget_seen_by_module_follows_token_budget(tmp_path, granularity):
    schedule = TokenBudget(b0=40, b_min=3, gamma=0.1, k=1.0, granularity=granularity)
    recorder = _BudgetRecorder()  # after TokenBudget, so it sees the budget the step uses
    module, datamodule, trainer = make_run(tmp_path, model={"beta": 0.0, "ntp_weight": 0.0, "answer_allowance": 2},
                                           data={"batches_per_epoch": 2, "batch_size": 1}, callbacks=[schedule, recorder], max_epochs=3)
    trainer.fit(module, datamodule=datamodule)
    assert len(recorder.seen) == 6
    for epoch, step, budget in recorder.seen:
        progress = epoch / 3 if granularity == "epoch" else step / 6
        assert budget == token_budget(progress, 40, 3, 0.1, 1.0)
    assert len({b for _, _, b in recorder.seen}) == (3 if granularity == "epoch" else 6)


def _write_corpus(path, documents):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return str(path)


class _RewardRecorder(L.Callback):
    def __init__(self):
        self.rewards = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get("train/reward_correct")
        if value is not None and not trainer.callback_metrics["train/format_warmup"]:
            self.rewards.append(float(value))


def test_reward_rises_on_a_learnable_toy(tmp_path):
    """RL alone raises correctness when the next token is predictable.

    Phase 1 teaches only the answer format (demonstrations whose next tokens are random digits, so the
    answer itself carries no signal). Phase 2 runs pure RL (no NTP, no KL, no length reward) on documents
    whose next token is always " 7": a reward that rises there is learned from rewards alone.
    """
    L.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    random_digits = [" ".join(str(int(d)) for d in torch.randint(0, 10, (24,), generator=generator)) for _ in range(60)]
    sevens = [" ".join(["7"] * 24) for _ in range(60)]
    common_model = {"budget": 6, "group_size": 8, "temperature": 1.0, "beta": 0.0, "ntp_weight": 0.0,
                    "length_reward_weight": 0.0, "format_warmup_thought": "ok", "answer_allowance": 4}
    common_data = {"text_field": "text", "val_documents": 4, "max_context_tokens": 16, "tier_thresholds": (0.5, 1.0, 1.5)}

    export = tmp_path / "formatted"
    module, datamodule, trainer = make_run(
        tmp_path, model={**common_model, "lr": 3e-3, "format_warmup_steps": 60},
        data={**common_data, "corpus": _write_corpus(tmp_path / "digits.jsonl", random_digits), "batch_size": 8, "batches_per_epoch": 60},
        callbacks=[HuggingFaceExport(str(export))], max_steps=60)
    trainer.fit(module, datamodule=datamodule)

    recorder = _RewardRecorder()
    module, datamodule, trainer = make_run(
        tmp_path, model={**common_model, "model_name_or_path": str(export), "lr": 2e-3},
        data={**common_data, "model_name_or_path": str(export), "corpus": _write_corpus(tmp_path / "sevens.jsonl", sevens),
              "batch_size": 4, "batches_per_epoch": 30},
        callbacks=[recorder], max_steps=30)
    trainer.fit(module, datamodule=datamodule)
    first, last = sum(recorder.rewards[:5]) / 5, sum(recorder.rewards[-5:]) / 5
    assert last > first + 0.3, recorder.rewards


def test_format_warmup_runs_at_its_own_lr_then_rl_warms_up_from_zero_steps():
    module = RMTModule(model_name_or_path=BUILTIN_TINY, lr=1e-3, format_warmup_steps=2, format_warmup_lr=1e-2,
                       lr_warmup_steps=2)
    module.configure_model()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-2, 1e-2, 0.5e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="format_warmup_lr"):
        RMTModule(model_name_or_path=BUILTIN_TINY, lr=0.0, format_warmup_lr=1e-4)


def test_format_demonstrations_take_the_listed_budgets_in_turn(monkeypatch):
    """Each demonstration's instruction and ``{context_tail}`` use its turn of ``format_warmup_budgets``."""
    import rmt_lightning.rl.losses as losses
    from rmt_lightning.engine.prompts import demonstration_ids

    module = RMTModule(model_name_or_path=BUILTIN_TINY, format_warmup_steps=5, format_warmup_budgets=[8, 4, 2],
                       format_warmup_thought="{context_tail}{next_token}")
    module.configure_model()
    tokenizer = module.tokenizer
    contexts = [tokenizer("one two three four five six seven eight nine ten", add_special_tokens=False)["input_ids"]] * 4
    continuations = [[b" eleven"]] * 4
    captured = {}

    def record(policy, trainer, backward, batch):
        captured["prompts"], captured["responses"] = batch.prompt_ids, batch.completion_ids
        return 0.0

    monkeypatch.setattr(losses, "demonstrations_backward", record)
    module.format_warmup_backward(contexts, continuations, budget=6)
    prompts = [tokenizer.decode(row) for row in captured["prompts"]]
    for prompt, budget in zip(prompts, [8, 4, 2, 8]):
        assert f"using exactly {budget} tokens" in prompt
    expected = demonstration_ids(tokenizer, contexts, continuations, "{context_tail}{next_token}", [8, 4, 2, 8])
    pad = tokenizer.pad_token_id
    assert [[t for t in row if t != pad] for row in captured["responses"].tolist()] == expected
    # The thought restates the context's last B tokens, B the demonstration's own budget.
    for ids, budget in zip(expected, [8, 4, 2]):
        assert tokenizer.decode(ids).split(" eleven</think>")[0] == tokenizer.decode(contexts[0][-budget:])
    # Unset: every demonstration at the step's budget.
    module.hparams.format_warmup_budgets = None
    module.format_warmup_backward(contexts, continuations, budget=6)
    assert all("using exactly 6 tokens" in tokenizer.decode(row) for row in captured["prompts"])
    for bad in ([], [4, 0]):
        with pytest.raises(ValueError, match="format_warmup_budgets"):
            RMTModule(model_name_or_path=BUILTIN_TINY, format_warmup_budgets=bad)


@pytest.mark.parametrize("only_when_correct", [False, True])
def test_score_adds_the_length_reward_to_every_completion_or_only_to_correct_ones(only_when_correct):
    from rmt_lightning.engine.generation import Rollout

    module = RMTModule(model_name_or_path=BUILTIN_TINY, length_reward_weight=0.1,
                       length_reward_only_when_correct=only_when_correct)
    texts = ["<think> a b</think> \\boxed{ 7}", "<think> a</think> \\boxed{ 7}",   # right, lengths 2 and 1
             "<think> a b</think> \\boxed{.}", "<think> a</think> \\boxed{.}"]    # wrong, lengths 2 and 1
    empty = torch.zeros(4, 1)
    rollout = Rollout(completion_ids=empty.long(), completion_mask=empty.bool(), sampled_mask=empty.bool(),
                           texts=texts, reasoning_lengths=[2, 1, 2, 1], clipped=[False] * 4, forced=[False] * 4)
    total, correct, length = module.rewards(rollout, [[b" 7"], [b" 7"]], budget=2)
    assert correct.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert length.tolist() == [[1.0, 0.5], [1.0, 0.5]]
    wrong = [0.1, 0.05] if not only_when_correct else [0.0, 0.0]
    torch.testing.assert_close(total, torch.tensor([[0.9 + 0.1, 0.9 + 0.05], wrong]))
