"""The question task: questions from each dataset form, the built-in set, the datamodule's held-out split and
draws, and PostTrainModule on the shared GRPO step (every weight moves, a toy reward rises, a resume is exact,
validation writes answer accuracy with intervals)."""

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from rmt_lightning import (
    CompletionsTable, PostTrainModule, PreemptionCheckpoint, QuestionDataModule, RMTDataModule, RMTModule,
)
from rmt_lightning.cli import build_cli
from rmt_lightning.data.mathgen import generate_questions
from rmt_lightning.data.questions import QuestionSource, field_value, parse_references, read_questions
from rmt_lightning.engine.models import BUILTIN_TINY, load_causal_lm
from rmt_lightning.runtime.errors import InputError

pytest.importorskip("math_verify")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ---- questions of each form ---------------------------------------------------------------------------


def test_field_value_follows_dotted_paths():
    record = {"reward_model": {"ground_truth": '["3"]', "style": "rule"}, "q": "x"}
    assert field_value(record, "reward_model.ground_truth") == '["3"]'
    assert field_value(record, "q") == "x"
    assert field_value(record, "reward_model.missing") is None and field_value(record, "q.deeper") is None


@pytest.mark.skipif(not GSM8K.is_dir(), reason="needs ../shared/data/gsm8k")
def test_gsm8k_questions_read_with_the_number_after_the_marker():
    questions = read_questions(QuestionSource(str(GSM8K / "test.jsonl"), max_questions=20))
    assert len(questions) == 20
    assert all(isinstance(q.content, str) and len(q.answers) == 1 for q in questions)
    assert questions[0].answers == [questions[0].answers[0].replace(",", "")]
    assert all(values for values in parse_references(questions, "gsm8k"))


def test_math_style_solutions_read_their_last_box(tmp_path):
    source = _jsonl(tmp_path / "math.jsonl", [
        {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        {"problem": "Two and two?", "solution": "We get \\boxed{3}, no: \\boxed{4}."},
    ])
    questions = read_questions(QuestionSource(source, question_field="problem", answer_field="solution"))
    assert [q.answers for q in questions] == [["\\frac{1}{2}"], ["4"]]


def test_skywork_form_reads_chat_messages_and_a_json_list_in_a_nested_field(tmp_path):
    import datasets

    rows = [{"prompt": [{"role": "user", "content": "What is 2+2? Put it in \\boxed{}."}],
             "reward_model": {"ground_truth": '["4"]', "style": "rule"}},
            {"prompt": [{"role": "user", "content": "Half of 3?"}],
             "reward_model": {"ground_truth": '["1.5", "\\\\frac{3}{2}"]', "style": "rule"}}]
    path = tmp_path / "skywork.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    questions = read_questions(QuestionSource(str(path), question_field="prompt", answer_field="reward_model.ground_truth"))
    assert questions[0].content == [{"role": "user", "content": "What is 2+2? Put it in \\boxed{}."}]
    assert questions[1].answers == ["1.5", "\\frac{3}{2}"]
    assert all(parse_references(questions, "skywork"))


def test_a_missing_field_names_the_fields_the_records_have(tmp_path):
    source = _jsonl(tmp_path / "q.jsonl", [{"query": "2+2?", "label": "4"}])
    with pytest.raises(InputError, match=r"no field \['question', 'answer'\]; its fields are \['label', 'query'\]"):
        read_questions(QuestionSource(source))


def test_unparseable_references_say_how_many_and_the_first(tmp_path):
    source = _jsonl(tmp_path / "q.jsonl", [{"question": "a?", "answer": "4"}, {"question": "b?", "answer": ""},
                                           {"question": "c?", "answer": "#### "}])
    questions = read_questions(QuestionSource(source, reference_form="auto"))
    with pytest.raises(InputError, match="2 of the 3 questions .* the first is record 1"):
        parse_references(questions, "q.jsonl")


def test_builtin_questions_by_difficulty_are_distinct_and_exclude_the_held_out():
    for difficulty in (1, 2, 3, 4):
        questions = generate_questions(50, difficulty, seed=0)
        assert len({q.question for q in questions}) == 50
        assert all(q.solution.endswith(f"#### {q.answer}") for q in questions)
    held_out = generate_questions(30, 1, seed=1)
    training = generate_questions(100, 1, seed=0, exclude=frozenset(q.question for q in held_out))
    assert not {q.question for q in held_out} & {q.question for q in training}
    assert generate_questions(10, 2, seed=3) == generate_questions(10, 2, seed=3)
    with pytest.raises(ValueError, match="difficulty 7"):
        generate_questions(1, 7)
    with pytest.raises(ValueError, match="distinct questions"):
        generate_questions(100_000, 1)


# ---- the datamodule -----------------------------------------------------------------------------------


def _datamodule(**overrides) -> QuestionDataModule:
    return QuestionDataModule(**{"model_name_or_path": BUILTIN_TINY, "embedded_questions": 64, "val_questions": 10,
                                 "batch_size": 2, "batches_per_epoch": 4, "val_batch_size": 4, **overrides})


def test_held_out_questions_are_never_trained_on_and_prompts_are_built_once():
    datamodule = _datamodule()
    datamodule.setup("fit")
    train_texts = {q.content for q in datamodule.train_set.questions}
    val_texts = {q.content for q in datamodule.val_set.questions}
    assert len(val_texts) == 10 and not train_texts & val_texts
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.size == 2 and batch.drawn_at_step == 0
    assert batch.prompts[0] == datamodule.train_set.prompts[int(batch.question_ids[0])]
    assert "Put your final answer within \\boxed{}" in datamodule.tokenizer.decode(batch.prompts[0])
    assert [len(b.prompts) for b in datamodule.val_dataloader()] == [4, 4, 2]


def test_a_held_out_count_of_a_local_file(tmp_path):
    source = _jsonl(tmp_path / "q.jsonl", [{"question": f"{i} + 1?", "answer": f"#### {i + 1}"} for i in range(12)])
    datamodule = _datamodule(corpus=source, val_questions=4)
    datamodule.setup("fit")
    assert len(datamodule.train_set.questions) == 8 and len(datamodule.val_set.questions) == 4
    with pytest.raises(InputError, match="gave 12 questions, but val_questions=20"):
        _datamodule(corpus=source, val_questions=20).setup("fit")


def test_bad_datamodule_arguments_are_one_clear_error():
    with pytest.raises(InputError, match="reference_form 'latex'"):
        _datamodule(reference_form="latex")
    with pytest.raises(InputError, match="difficulty=9"):
        _datamodule(difficulty=9)
    with pytest.raises(InputError, match="streaming .* max_questions"):
        _datamodule(streaming=True)


# ---- the module on the shared step ------------------------------------------------------------------


def _first_token_is_even(self, rollout, references):
    """A learnable toy reward: 1 where a completion's first token has an even id."""
    group = len(rollout.texts) // len(references)
    correct = (rollout.completion_ids[:, 0] % 2 == 0).float().view(len(references), group)
    return correct, torch.ones_like(correct), 0


def _run(tmp_path, model=None, data=None, **trainer):
    module = PostTrainModule(**{"model_name_or_path": BUILTIN_TINY, "lr": 1e-3, "group_size": 4,
                                "max_response_length": 6, "rl_micro_batch_size": 8, **(model or {})})
    datamodule = _datamodule(**(data or {}))
    trainer = L.Trainer(**{"accelerator": "cpu", "devices": 1, "max_steps": 3, "logger": False,
                           "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                           "num_sanity_val_steps": 0, "limit_val_batches": 0, "use_distributed_sampler": False,
                           "default_root_dir": str(tmp_path), **trainer})
    return module, datamodule, trainer


def test_three_steps_move_every_policy_weight(tmp_path, monkeypatch):
    monkeypatch.setattr(PostTrainModule, "verify", _first_token_is_even)
    L.seed_everything(0)
    module, datamodule, trainer = _run(tmp_path, model={"beta": 0.05})
    trainer.fit(module, datamodule=datamodule)
    initial = load_causal_lm(BUILTIN_TINY).state_dict()
    assert trainer.global_step == 3
    for name, value in module.policy.state_dict().items():
        if name != "lm_head.weight":  # tied to the embeddings
            assert not torch.equal(value, initial[name]), f"policy parameter {name} did not change"
    assert all(torch.equal(v, initial[n]) for n, v in module.reference.state_dict().items())
    logged = trainer.callback_metrics
    assert 0 < float(logged["train/reward"]) < 1 and "train/answer_rate" in logged and "train/verify_timeouts" in logged


class _Rewards(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics["train/reward"]))


def test_reward_rises_on_a_learnable_toy(tmp_path, monkeypatch):
    """Pure GRPO (no KL) on a reward the policy controls: the share of completions whose first token is even."""
    monkeypatch.setattr(PostTrainModule, "verify", _first_token_is_even)
    L.seed_everything(0)
    rewards = _Rewards()
    module, datamodule, trainer = _run(tmp_path, model={"lr": 3e-3, "group_size": 8, "max_response_length": 1},
                                       data={"batch_size": 4, "batches_per_epoch": 40}, max_steps=40,
                                       callbacks=[rewards])
    trainer.fit(module, datamodule=datamodule)
    first, last = sum(rewards.values[:8]) / 8, sum(rewards.values[-8:]) / 8
    assert last > first + 0.3, rewards.values


def test_a_stopped_run_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(PostTrainModule, "verify", _first_token_is_even)
    L.seed_everything(0)
    module, datamodule, trainer = _run(tmp_path / "whole", max_steps=4, data={"batches_per_epoch": 3})
    trainer.fit(module, datamodule=datamodule)
    whole = {n: v.clone() for n, v in module.policy.state_dict().items()}

    L.seed_everything(0)
    saving = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True)
    module, datamodule, trainer = _run(tmp_path / "first", max_steps=2, data={"batches_per_epoch": 3},
                                       enable_checkpointing=True, callbacks=[saving])
    trainer.fit(module, datamodule=datamodule)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["QuestionDataModule"]["sampler"]["batches_yielded"] == 2
    L.seed_everything(123)  # the checkpoint, not the seed, decides what follows
    module, datamodule, trainer = _run(tmp_path / "second", max_steps=4, data={"batches_per_epoch": 3})
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint))
    assert trainer.global_step == 4
    for name, value in module.policy.state_dict().items():
        assert torch.equal(value, whole[name]), f"{name} differs after the resume"


def test_several_updates_reuse_one_rollout(tmp_path, monkeypatch):
    monkeypatch.setattr(PostTrainModule, "verify", _first_token_is_even)
    rollouts = []
    generate = PostTrainModule.generate_rollout
    monkeypatch.setattr(PostTrainModule, "generate_rollout", lambda self, *a, **k: rollouts.append(a) or generate(self, *a, **k))
    module, datamodule, trainer = _run(tmp_path, model={"updates_per_rollout": 2, "mini_batches_per_rollout": 2},
                                       max_steps=4)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 4 and len(rollouts) == 1  # 2 passes x 2 mini-batches on one rollout
    assert float(trainer.callback_metrics["train/rollout_update"]) == 3


class _SignalAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_preempted_run_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM mid-step (a verifier worker may be running): the step finishes, preempted.ckpt is written, and the
    resumed run ends on the weights of an uninterrupted one."""
    from rmt_lightning.callbacks import Preempted

    monkeypatch.setattr(PostTrainModule, "verify", _first_token_is_even)
    L.seed_everything(0)
    module, datamodule, trainer = _run(tmp_path / "whole", max_steps=4)
    trainer.fit(module, datamodule=datamodule)
    whole = {n: v.clone() for n, v in module.policy.state_dict().items()}

    L.seed_everything(0)
    preemption = PreemptionCheckpoint(dirpath=str(tmp_path / "preempted"))
    module, datamodule, trainer = _run(tmp_path / "first", max_steps=4, callbacks=[preemption, _SignalAt(2)])
    with pytest.raises(Preempted) as stopped:
        trainer.fit(module, datamodule=datamodule)
    assert stopped.value.step == 3 and Path(stopped.value.path).is_file()
    module, datamodule, trainer = _run(tmp_path / "second", max_steps=4)
    trainer.fit(module, datamodule=datamodule, ckpt_path=stopped.value.path)
    for name, value in module.policy.state_dict().items():
        assert torch.equal(value, whole[name]), f"{name} differs after the preempted run resumed"


def test_completions_and_histograms_reach_the_loggers(tmp_path, monkeypatch):
    monkeypatch.setattr(PostTrainModule, "verify", _first_token_is_even)
    module, datamodule, trainer = _run(tmp_path, max_steps=2, limit_val_batches=None, val_check_interval=2,
                                       check_val_every_n_epoch=None, callbacks=[CompletionsTable()],
                                       logger=L.pytorch.loggers.CSVLogger(str(tmp_path)))
    trainer.fit(module, datamodule=datamodule)
    rows = [json.loads(line) for line in Path(trainer.log_dir, "completions.jsonl").read_text().splitlines()]
    tags = {row["tag"] for row in rows}
    assert {"completions", "completions/val"} <= tags, tags
    first = next(row for row in rows if row["tag"] == "completions")
    assert first["tier"] == "question" and first["context"] in {q.content for q in datamodule.train_set.questions}
    histograms = Path(trainer.log_dir, "histograms.jsonl").read_text()
    assert "train/reasoning_length_hist" in histograms and "val/reasoning_length_hist" in histograms


def test_validation_writes_answer_accuracy_with_intervals(tmp_path, monkeypatch):
    monkeypatch.setattr(PostTrainModule, "verify", _first_token_is_even)
    module, datamodule, trainer = _run(tmp_path, model={"val_group_size": 2, "val_temperature": 1.0},
                                       limit_val_batches=None, logger=L.pytorch.loggers.CSVLogger(str(tmp_path)))
    trainer.validate(module, datamodule=datamodule)
    record = json.loads(Path(trainer.log_dir, "val_metrics.json").read_text())
    assert record["questions"] == 10 and record["samples_per_question"] == 2
    low, high = record["val/answer_acc_interval"]
    assert low <= record["val/answer_acc"] <= high
    assert record["val/answer_acc"] <= record["val/answer_pass_at_k"]
    assert {"val/answer_rate", "val/response_length"} <= set(record)


# ---- the command line -----------------------------------------------------------------------------------


def test_the_posttrain_configs_instantiate_their_own_classes_with_their_own_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in sorted((CONFIGS / "posttrain").glob("*.yaml")):
        cli = build_cli(["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                         "--trainer.precision", "32-true"], run=False)
        assert isinstance(cli.model, PostTrainModule) and isinstance(cli.datamodule, QuestionDataModule), path
        assert cli.datamodule.hparams.model_name_or_path == cli.model.hparams.model_name_or_path
    # Not the mid-training module's defaults: its beta 0.01 and temperature 0.8 must not leak into this class.
    cli = build_cli(["--config", str(CONFIGS / "posttrain" / "builtin.yaml")], run=False)
    assert cli.model.hparams.beta == 0.0 and cli.model.hparams.max_response_length == 64
    with pytest.raises(ValueError, match="answer_format 'words'"):
        PostTrainModule(answer_format="words")
    cli = build_cli(["--config", str(CONFIGS / "quickstart.yaml")], run=False)
    assert isinstance(cli.model, RMTModule) and isinstance(cli.datamodule, RMTDataModule)


def test_a_module_with_the_other_tasks_data_is_refused_before_models_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        from rmt_lightning.cli import main

        main(["fit", "--config", str(CONFIGS / "posttrain" / "builtin.yaml"), "--data", "rmt_lightning.RMTDataModule",
              "--trainer.logger", "false"])
    assert stopped.value.code == 2


@pytest.mark.parametrize("override, message", [
    (["--model.max_response_length", "100000"], "is longer than model 'builtin:tiny-llama' supports"),
    (["--data.question_field", "query"], "has no field \\['query'\\]; its fields are \\['answer', 'question'\\]"),
    (["--data.corpus", "{answers}"], "1 of the 2 questions .* empty or unparseable reference; the first is record [12]"),
])
def test_bad_input_is_one_line_before_any_model_loads(override, message, tmp_path, monkeypatch, capsys):
    from rmt_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    source = _jsonl(tmp_path / "q.jsonl", [{"question": "a?", "answer": "#### 4"}, {"question": "b?", "answer": ""},
                                          {"question": "c?", "answer": " "}])
    override = [source if arg == "{answers}" else arg for arg in override]
    if "--data.question_field" in override:
        override = [*override, "--data.corpus", source]
    monkeypatch.setattr("rmt_lightning.grpo_module.load_causal_lm", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(CONFIGS / "posttrain" / "builtin.yaml"), "--model.model_name_or_path", BUILTIN_TINY,
              "--data.val_questions", "1", "--trainer.logger", "false", *override])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in error if line.startswith("error:")]) == 1
    assert __import__("re").search(message, error[-1]), error[-1]


def test_a_checkpoint_written_before_runs_named_their_classes_still_validates(tmp_path, monkeypatch):
    """Checkpoints of earlier versions hold no ``_class_path`` in their hyperparameters: read as RMTModule's."""
    monkeypatch.chdir(tmp_path)
    tiny = str(CONFIGS / "tiny.yaml")
    build_cli(["fit", "--config", tiny, "--trainer.max_steps", "1", "--trainer.max_epochs", "1",
               "--trainer.enable_progress_bar", "false"])
    checkpoint = torch.load(tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"].pop("_class_path") == "rmt_lightning.RMTModule"
    checkpoint["hyper_parameters"].pop("_instantiator")
    torch.save(checkpoint, tmp_path / "old.ckpt")
    cli = build_cli(["validate", "--config", tiny, "--ckpt_path", str(tmp_path / "old.ckpt"), "--model.val_budget", "2",
                     "--trainer.enable_progress_bar", "false"])
    assert isinstance(cli.model, RMTModule) and cli.model.hparams.val_budget == 2
    assert cli.model.last_evaluation["budget"] == 2
