"""Evaluation: NTP-mode accuracy against an independent argmax loop, tiers against independently computed
entropies, reasoning-mode accuracy on scripted completions against a hand count, the budget each stage uses,
the JSON and TensorBoard outputs, and the held-out corpus (the compare command: test_compare.py)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from rmt_lightning import CompletionsTable, HuggingFaceExport, RMTDataModule, RMTModule, TokenBudget
from rmt_lightning.evaluation.tier_metrics import TierAccuracy
from rmt_lightning.method import TIER_NAMES, token_budget
from rmt_lightning.engine.models import BUILTIN_TINY, load_causal_lm, load_tokenizer
from rmt_lightning.engine.generation import Rollout

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"


def _data(tmp_path, **overrides) -> RMTDataModule:
    settings = {"model_name_or_path": BUILTIN_TINY, "embedded_documents": 48, "val_documents": 8, "batch_size": 2,
                "batches_per_epoch": 2, "max_context_tokens": 48, "val_positions": 8, "val_batch_size": 4,
                "cache_dir": str(tmp_path / "cache")}
    return RMTDataModule(**{**settings, **overrides})


def _trainer(tmp_path, callbacks=(), logger=False, **overrides) -> L.Trainer:
    settings = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": logger, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                "use_distributed_sampler": False, "default_root_dir": str(tmp_path), "callbacks": list(callbacks)}
    return L.Trainer(**{**settings, **overrides})


# ---- NTP mode and tiers against independent computations ------------------------------------------------


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """The tiny model after a few NTP steps: a fixed model that is right at some positions and sure at some,
    so accuracy and entropy tiers are not all zero or all hard as for a random model."""
    folder = tmp_path_factory.mktemp("trained_tiny")
    L.seed_everything(0)
    module = RMTModule(model_name_or_path=BUILTIN_TINY, rl=False, lr=1e-2, val_reasoning=False)
    data = _data(folder, batch_size=8, batches_per_epoch=80)
    trainer = _trainer(folder, callbacks=[HuggingFaceExport(str(folder / "model"))], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return str(folder / "model")


def _entropy(logits: torch.Tensor) -> float:
    """H = -sum p log p in float64, written out rather than through the project's token_entropy."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-(logp.exp() * logp).sum())


def test_ntp_accuracy_equals_an_independent_argmax_loop_and_tiers_follow_entropy(tmp_path, trained_tiny):
    model = load_causal_lm(trained_tiny).eval()
    probe = _data(tmp_path, model_name_or_path=trained_tiny)
    probe.setup("validate")
    documents = [doc.tolist() for doc in probe.documents]
    val_docs = sorted(set(probe.val_candidates.doc.tolist()))
    entropy = {}
    with torch.no_grad():
        for d in val_docs:
            logits = model(input_ids=torch.tensor([documents[d]])).logits[0]
            for p in range(1, len(documents[d])):
                entropy[(d, p)] = _entropy(logits[p - 1])
    # Thresholds at the quartiles of the entropies (midway between neighbours, so float error cannot move a
    # position across one), so that every split holds some positions and none holds all.
    values = sorted(entropy.values())
    thresholds = []
    for q in (0.25, 0.5, 0.75):
        k = int(q * len(values))
        while values[k + 1] - values[k] < 1e-3:
            k += 1
        thresholds.append((values[k] + values[k + 1]) / 2)

    data = _data(tmp_path, model_name_or_path=trained_tiny, tier_thresholds=tuple(thresholds), val_positions=40, val_batch_size=8)
    module = RMTModule(model_name_or_path=trained_tiny, val_reasoning=False)
    figures = _trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]

    max_context = data.hparams.max_context_tokens
    hits, splits = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            for d, p, tier in zip(batch.position_documents.tolist(), batch.positions.tolist(), batch.tiers.tolist()):
                expected_tier = sum(entropy[(d, p)] > t for t in thresholds) - 1
                assert tier == expected_tier, (d, p, entropy[(d, p)], thresholds)
                context = documents[d][max(0, p - max_context) : p]
                logits = model(input_ids=torch.tensor([context])).logits[0, -1]
                hits.append(float(int(logits.argmax()) == documents[d][p]))
                splits.append([entropy[(d, p)] > t for t in thresholds])
    assert len(hits) == 40
    expected = {}
    for t, name in enumerate(TIER_NAMES):
        members = [h for h, s in zip(hits, splits) if s[t]]
        assert 0 < len(members) < len(hits) or t == 0
        expected[name] = sum(members) / len(members)
        assert figures[f"val/ntp_acc_{name}"] == pytest.approx(expected[name], abs=1e-6)
    assert 0 < expected["easy"] < 1, "the fixed model should be right at some positions and wrong at others"
    assert figures["val/ntp_acc_avg"] == pytest.approx(sum(expected.values()) / 3, abs=1e-6)
    assert "val/acc_avg" not in figures  # reasoning mode is off


def _validate_cli(workdir: Path, model: str, *extra: str) -> dict:
    """``python -m rmt_lightning validate`` on tiny.yaml with ``model``; returns the figures it wrote."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "rmt_lightning", "validate", "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--model.model_name_or_path", model, "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
               "--data.val_positions", "12", "--data.cache_dir", str(workdir.parent / "cache"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    workdir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(next(workdir.joinpath("logs").rglob("val_metrics.json")).read_text())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_report_the_figures_of_one(tmp_path, trained_tiny):
    """Under DDP each rank scores half the positions; the figures, reduced across ranks, are those of one process."""
    single = _validate_cli(tmp_path / "one", trained_tiny)
    double = _validate_cli(tmp_path / "two", trained_tiny, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert single["positions"] == double["positions"] == 12
    for key, value in single.items():
        if key.startswith("val/"):
            assert double[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < single["val/ntp_acc_easy"] < 1


def test_tier_accuracy_splits_are_nested_and_averaged_unweighted():
    metric = TierAccuracy()
    # tiers: -1 (in no split), 0 easy, 1 medium, 2 hard; correctness per position
    metric.update(torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0]), torch.tensor([-1, 0, 0, 1, 2]))
    computed = metric.compute()
    assert computed["positions"].tolist() == [4, 2, 1]
    easy, medium, hard = computed["accuracy"].tolist()
    assert easy == pytest.approx((0.0 + 1.0 + 0.5 + 1.0) / 4)
    assert medium == pytest.approx((0.5 + 1.0) / 2)
    assert hard == pytest.approx(1.0)
    empty = TierAccuracy()
    empty.update(torch.tensor([1.0]), torch.tensor([0]))
    assert math.isnan(empty.compute()["accuracy"][2])


# ---- reasoning mode on scripted completions ---------------------------------------------------------------


class ScriptedModule(RMTModule):
    """RMTModule whose generator returns known text: per position, by its order k in the evaluation,
    k % 4 == 0: both completions right; 1: one right, one wrong; 2: one wrong, one without answer; 3: none."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen_budgets, self.seen_positions = [], []

    def validation_step(self, batch, batch_idx):
        self.batch = batch
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self.batch = batch
        return super().test_step(batch, batch_idx)

    def training_step(self, batch, batch_idx):
        self.batch = batch
        return super().training_step(batch, batch_idx)

    def generate_rollout(self, prompts, budget, group_size=None, temperature=None):
        if not self.trainer.training:
            self.seen_budgets.append(budget)
        group = group_size or self.hparams.group_size
        texts, lengths = [], []
        for i in range(len(prompts)):
            target = self.batch.continuations[i][0].decode("utf-8", errors="replace")
            right = f"<think>\nsome thought</think> \\boxed{{{target}}}"
            wrong = f"<think>\nsome thought</think> \\boxed{{{target}x}}"
            missing = "<think>\nstill thinking"
            k = len(self.seen_positions)
            self.seen_positions.append(k)
            script = [[right, right], [right, wrong], [wrong, missing], [missing, missing]][k % 4]
            texts += (script * group)[:group]
            lengths += [k % 5, 3][:group] + [0] * max(0, group - 2)
        rows = len(texts)
        empty = torch.zeros((rows, 1), dtype=torch.bool)
        return Rollout(torch.zeros((rows, 1), dtype=torch.long), empty, empty, texts, lengths, [False] * rows, [False] * rows)


def test_reasoning_accuracy_on_scripted_completions_equals_the_hand_count(tmp_path):
    module = ScriptedModule(model_name_or_path=BUILTIN_TINY, group_size=2, val_group_size=2)
    data = _data(tmp_path, val_positions=8, val_batch_size=3)
    figures = _trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]
    assert module.seen_positions == list(range(8))
    # A random model is equally unsure everywhere: every held-out position is hard, so it is in all three splits.
    assert all(int(t) == 2 for t in data.val_candidates.tier[data.eval_positions()])
    # Per position, by k % 4: 2/2, 1/2, 0/2, 0/2 right; k = 0..7 gives (1 + .5 + 0 + 0) * 2 / 8 = 0.375.
    for name in (*TIER_NAMES, "avg"):
        assert figures[f"val/acc_{name}"] == pytest.approx(0.375)
    # Extractable answers: 2, 2, 1, 0 of 2 per position -> 10 of 16.
    assert figures["val/answer_rate"] == pytest.approx(10 / 16)
    # Lengths: (k % 5, 3) per position -> (0+1+2+3+4+0+1+2 + 3*8) / 16.
    assert figures["val/reasoning_length"] == pytest.approx((13 + 24) / 16)
    assert figures["hp_metric"] == pytest.approx(0.375)


def test_reasoning_splits_follow_tiers_on_scripted_completions(tmp_path):
    # Thresholds inside the random model's narrow entropy range spread the positions over the tiers.
    probe = _data(tmp_path)
    probe.setup("validate")
    eligible = probe.val_candidates.entropy[probe.val_candidates.tier >= 0].sort().values
    thresholds = tuple(float(eligible[int(q * len(eligible))]) for q in (0.2, 0.5, 0.8))
    module = ScriptedModule(model_name_or_path=BUILTIN_TINY, group_size=2, val_group_size=2)
    data = _data(tmp_path, tier_thresholds=thresholds, val_positions=16, val_batch_size=5)
    figures = _trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]
    tiers = data.val_candidates.tier[data.eval_positions()].tolist()
    right = [[1.0, 0.5, 0.0, 0.0][k % 4] for k in range(len(tiers))]
    accuracies = []
    for t, name in enumerate(TIER_NAMES):
        members = [r for r, tier in zip(right, tiers) if tier >= t]
        assert members, f"no position in split {name}"
        accuracies.append(sum(members) / len(members))
        assert figures[f"val/acc_{name}"] == pytest.approx(accuracies[-1])
    assert figures["val/acc_avg"] == pytest.approx(sum(accuracies) / 3)


# ---- budgets, outputs during fit, test stage -----------------------------------------------------------------


def test_evaluation_budget_is_current_during_fit_final_or_configured_outside(tmp_path):
    schedule = dict(b0=12, b_min=2, gamma=0.25)
    module = ScriptedModule(model_name_or_path=BUILTIN_TINY, group_size=2, answer_allowance=2)
    data = _data(tmp_path, val_positions=4)
    trainer = _trainer(tmp_path, callbacks=[TokenBudget(**schedule)], max_epochs=2, check_val_every_n_epoch=1)
    trainer.fit(module, datamodule=data)
    # One validation per epoch, each at the budget that epoch trained with (progress 0 and 1/2).
    assert module.seen_budgets == [token_budget(0.0, **schedule)] + [token_budget(0.5, **schedule)]

    module.seen_budgets = []
    _trainer(tmp_path, callbacks=[TokenBudget(**schedule)]).validate(module, datamodule=data, verbose=False)
    assert module.seen_budgets == [token_budget(1.0, **schedule)]  # a finished model: the final budget

    configured = ScriptedModule(model_name_or_path=BUILTIN_TINY, group_size=2, val_budget=5)
    _trainer(tmp_path, callbacks=[TokenBudget(**schedule)]).test(configured, datamodule=data, verbose=False)
    assert configured.seen_budgets == [5]

    fixed = ScriptedModule(model_name_or_path=BUILTIN_TINY, group_size=2, budget=7)
    _trainer(tmp_path).validate(fixed, datamodule=data, verbose=False)
    assert fixed.seen_budgets == [7]  # no schedule: the fixed budget, as the RPT-style baseline trains with


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def test_validation_during_fit_writes_figures_json_and_tensorboard_views(tmp_path):
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="run")
    module = RMTModule(model_name_or_path=BUILTIN_TINY, group_size=2, answer_allowance=2, budget_forcing=True, log_samples=2)
    data = _data(tmp_path, val_positions=4)
    trainer = _trainer(tmp_path, logger=logger, callbacks=[TokenBudget(b0=8, b_min=2, gamma=0.25), CompletionsTable()],
                       max_epochs=2, check_val_every_n_epoch=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    run = Path(logger.log_dir)
    history = [json.loads(line) for line in (run / "val_metrics.jsonl").read_text().splitlines()]
    assert [h["global_step"] for h in history] == [2, 4]
    assert [h["budget"] for h in history] == [8, token_budget(0.5, 8, 2, 0.25)]
    latest = json.loads((run / "val_metrics.json").read_text())
    assert latest == history[-1]
    for key in ("val/acc_easy", "val/acc_medium", "val/acc_hard", "val/acc_avg", "val/reasoning_length",
                "val/answer_rate", "val/ntp_acc_easy", "val/ntp_acc_avg"):
        assert key in latest and latest[key] is not None, key
    assert latest["positions"] == 4 and latest["scored_by"] == "reasoning"

    events = _events(run)
    scalars = events.Tags()["scalars"]
    for tag in ("val/acc_avg", "val/reasoning_length", "val/answer_rate", "val/ntp_acc_avg", "hp_metric",
                "curriculum/p_easy", "curriculum/drawn_easy"):
        assert tag in scalars, tag
    assert [e.value for e in events.Scalars("val/acc_avg")] == pytest.approx([h["val/acc_avg"] for h in history])
    histograms = events.Tags()["histograms"]
    for tag in ("curriculum/sampled_entropy", "train/reasoning_length_hist", "val/reasoning_length_hist"):
        assert tag in histograms, tag
    texts = [tag for tag in events.Tags()["tensors"] if tag.startswith("completions")]
    assert any(t.startswith("completions/val") for t in texts) and any(t == "completions/text_summary" for t in texts), texts
    header = "| tier | context | completion | target | prediction | reward |"
    table = events.Tensors("completions/val/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.startswith(header)
    # The training table goes with every logging step (log_every_n_steps=1: every one of the 4 steps).
    training_tables = events.Tensors("completions/text_summary")
    assert [e.step for e in training_tables] == [1, 2, 3, 4]
    rows = training_tables[-1].tensor_proto.string_val[0].decode().split("\n")
    assert rows[0] == header and len(rows) == 2 + 2  # log_samples=2
    assert (run / "hparams.yaml").exists()


def test_validation_every_n_steps_during_fit(tmp_path):
    """``val_check_interval: N`` validates every N optimizer steps, with the budget of that step."""
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="run")
    module = RMTModule(model_name_or_path=BUILTIN_TINY, group_size=2, answer_allowance=2, budget_forcing=True)
    data = _data(tmp_path, val_positions=4)
    trainer = _trainer(tmp_path, logger=logger, callbacks=[TokenBudget(b0=8, b_min=2, gamma=0.25, granularity="step")],
                       max_epochs=1, val_check_interval=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    history = [json.loads(line) for line in (Path(logger.log_dir) / "val_metrics.jsonl").read_text().splitlines()]
    assert [h["global_step"] for h in history] == [1, 2]
    assert all(h["val/acc_avg"] is not None and h["val/ntp_acc_avg"] is not None for h in history)


def test_test_stage_logs_test_figures_and_writes_test_json(tmp_path):
    module = RMTModule(model_name_or_path=BUILTIN_TINY, group_size=2, answer_allowance=2)
    data = _data(tmp_path, val_positions=4)
    figures = _trainer(tmp_path).test(module, datamodule=data, verbose=False)[0]
    assert {f"test/acc_{n}" for n in (*TIER_NAMES, "avg")} <= set(figures)
    assert {f"test/ntp_acc_{n}" for n in (*TIER_NAMES, "avg")} <= set(figures)
    written = json.loads((tmp_path / "test_metrics.json").read_text())  # no logger: next to default_root_dir
    assert written["stage"] == "test" and written["test/acc_avg"] == pytest.approx(figures["test/acc_avg"])


def test_bad_evaluation_settings_are_rejected():
    with pytest.raises(ValueError, match="val_group_size"):
        RMTModule(val_group_size=0)
    with pytest.raises(ValueError, match="val_budget"):
        RMTModule(val_budget=0)
    with pytest.raises(ValueError, match="val_temperature"):
        RMTModule(val_temperature=-1.0)


# ---- held-out positions and corpora --------------------------------------------------------------------------


def test_evaluation_positions_are_split_evenly_and_disjointly_across_ranks(tmp_path):
    data = _data(tmp_path, val_positions=7)
    data.setup("validate")
    single = data.eval_positions().tolist()
    assert len(single) == 7
    shards = []
    for rank in range(2):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        shards.append(data.eval_positions().tolist())
    assert len(shards[0]) == len(shards[1]) == 3  # cut to a multiple of the world size: same batches per rank
    assert sorted(shards[0] + shards[1]) == sorted(single[:6])


@pytest.mark.skipif(not GSM8K.joinpath("test.jsonl").exists(), reason="needs ../shared/data/gsm8k")
def test_val_corpus_supplies_the_held_out_documents(tmp_path):
    data = _data(tmp_path, corpus=str(GSM8K / "train.jsonl"), val_corpus=str(GSM8K / "test.jsonl"),
                 text_template="{question}\n{answer}", max_documents=30, val_documents=5, max_document_tokens=4096)
    data.setup("validate")
    tokenizer = load_tokenizer(BUILTIN_TINY)
    first_test = json.loads(GSM8K.joinpath("test.jsonl").read_text().splitlines()[0])
    val_docs = sorted(set(data.val_candidates.doc.tolist()))
    assert val_docs == list(range(30, 35))  # after the 30 training documents, all of them trained on
    assert len(data.train_index.store) == 30 and data.train_index.held_out == []  # every training document trains
    assert tokenizer.decode(data.documents[30]).startswith(first_test["question"][:40])
    with pytest.raises(ValueError, match="is the training corpus"):
        _data(tmp_path, corpus=str(GSM8K / "train.jsonl"), val_corpus=str(GSM8K / "train.jsonl"), split="train",
              val_split="train", text_template="{question}\n{answer}", max_documents=5).setup("validate")
