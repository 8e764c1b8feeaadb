"""The compare command and the format stage it can start from: the table, the pictures and the rows end to end;
``configs/format_sft.yaml`` trains demonstrations only and exports a model that loads; ``--start`` (a Hugging
Face folder or a checkpoint) is the model of every row, with the entropy proxy unchanged; a second run of a
comparison keeps its finished rows, resumes an interrupted one to the uninterrupted figures, and refuses rows of
other inputs before any work."""

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

import rmt_lightning.commands.compare as compare_module
from rmt_lightning import RMTModule
from rmt_lightning.callbacks import Preempted
from rmt_lightning.evaluation.charts import read_attempts, wilson_interval
from rmt_lightning.runtime.errors import InputError
from rmt_lightning.cli import build_cli
from rmt_lightning.commands.compare import compare
from rmt_lightning.commands.compare_rows import BASE_ROW, START_ROW
from rmt_lightning.method import TIER_NAMES, token_budget
from rmt_lightning.engine.models import BUILTIN_TINY
from test_charts import assert_png

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY_CONFIG = str(CONFIGS / "tiny.yaml")
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"

TINY_RUN = ["--model.model_name_or_path", BUILTIN_TINY, "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2",
            "--data.embedded_documents", "48", "--data.val_documents", "8", "--data.val_positions", "6",
            "--data.batch_size", "2", "--data.batches_per_epoch", "2", "--trainer.enable_progress_bar", "false"]


def tiny_rows(cache: Path) -> list[str]:
    """Overrides of a tiny.yaml row: 2 epochs of 3 RL steps, a periodic checkpoint every 2 steps."""
    return ["--trainer.max_epochs", "2", "--data.batches_per_epoch", "3", "--data.val_positions", "6",
            "--trainer.enable_progress_bar", "false", "--data.cache_dir", str(cache),
            "--trainer.callbacks+=rmt_lightning.PeriodicCheckpoint", "--trainer.callbacks.every_n_steps=2"]


class Counted:
    """Counts (and lets through) every ``Trainer.fit`` and ``Trainer.validate`` call, with the checkpoint fit resumes from."""

    def __init__(self, monkeypatch):
        self.fits, self.validations = [], 0
        fit, validate = L.Trainer.fit, L.Trainer.validate

        def counted_fit(trainer, *args, **kwargs):
            self.fits.append(kwargs.get("ckpt_path"))
            return fit(trainer, *args, **kwargs)

        def counted_validate(trainer, *args, **kwargs):
            self.validations += 1
            return validate(trainer, *args, **kwargs)

        monkeypatch.setattr(L.Trainer, "fit", counted_fit)
        monkeypatch.setattr(L.Trainer, "validate", counted_validate)


# ---- the table and the pictures ---------------------------------------------------------------------------


def test_compare_runs_each_config_for_the_same_steps_and_writes_the_table(tmp_path, monkeypatch):
    import rmt_lightning.evaluation.charts as charts

    drawn = {}
    for name in ("draw_comparison", "draw_curves"):
        original = getattr(charts, name)
        monkeypatch.setattr(charts, name, lambda data, path, name=name, original=original: drawn.update({name: data}) or original(data, path))
    monkeypatch.chdir(tmp_path)
    configs = [str(CONFIGS / f"{name}.yaml") for name in ("rmt", "rpt_baseline", "ntp_only")]
    result = compare(configs, tmp_path / "out", [*TINY_RUN, "--data.cache_dir", str(tmp_path / "cache")], seed=3)
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == [BASE_ROW, "RMT", "RPT-style", "NTP only"]
    assert rows[BASE_ROW]["steps"] == 0 and not rows[BASE_ROW]["trained"]
    assert {rows[m]["steps"] for m in ("RMT", "RPT-style", "NTP only")} == {4} and result["same_steps"]
    assert all(rows[m]["train_cpu_seconds"] > 0 and rows[m]["train_seconds"] > 0 for m in ("RMT", "RPT-style", "NTP only"))
    assert rows["RMT"]["eval_budget"] == token_budget(1.0, 8, 2, 0.25)  # rmt.yaml's final budget
    assert rows["RPT-style"]["eval_budget"] == 8  # B fixed at B_0
    assert rows["NTP only"]["scored_by"] == "argmax" and rows["NTP only"]["reasoning_length"] is None
    for row in result["rows"]:
        written = json.loads(Path(row["log_dir"], "val_metrics.json").read_text())
        assert written == row["figures"]
        prefix = "val/acc" if row["scored_by"] == "reasoning" else "val/ntp_acc"
        assert row["avg"] == pytest.approx(100 * written[f"{prefix}_avg"])
        assert row["positions"] == 6 and written["global_step"] == row["steps"]
        assert not list(Path(row["log_dir"]).rglob("*.ckpt")) and not Path(row["log_dir"], "hf_export").exists()
        assert row["model"] == row["proxy"] == BUILTIN_TINY and row["resumed_from"] is None
    assert set(result["summary"]) >= {"rmt_avg", "rpt_avg"}
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert markdown.splitlines()[0].startswith("| method | scored by | easy | medium | hard | avg | reasoning length")
    # Each accuracy with its 95% Wilson interval, on the split's positions.
    ntp = rows["NTP only"]
    low, high = wilson_interval(ntp["easy"] / 100, ntp["split_positions"]["easy"])
    assert f"| NTP only | argmax | {ntp['easy']:.2f} [{100 * low:.1f}, {100 * high:.1f}] |" in markdown
    assert all(f"| {m} |" in markdown for m in rows)
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert written["seed"] == 3 and written["pending_rows"] == 0 and written["start"] is None
    # One record per row, with the figures of the table.
    for run_name, method in (("base", BASE_ROW), ("rmt", "RMT"), ("rpt_baseline", "RPT-style"), ("ntp_only", "NTP only")):
        record = json.loads((tmp_path / "out" / "rows" / f"{run_name}.json").read_text())
        assert record["status"] == "finished" and record["row"] == rows[method]
    # The pictures, drawn from the final rows: every method, its figures, the curves of its run's TensorBoard logs.
    for name in ("comparison.png", "curves.png"):
        assert_png(tmp_path / "out" / name)
    assert not list((tmp_path / "out").glob(".*partial*"))
    assert [entry["method"] for entry in drawn["draw_comparison"]] == list(rows)
    for entry in drawn["draw_comparison"]:
        row = rows[entry["method"]]
        assert entry["accuracy"] == {s: row[s] for s in (*TIER_NAMES, "avg")} and entry["argmax"]["avg"] == row["argmax_avg"]
        assert entry["reasoning_length"] == row["reasoning_length"]
        assert sum(row["split_positions"].values()) >= row["split_positions"]["easy"] == row["positions"]
        low, high = entry["accuracy_interval"]["easy"]
        assert low <= row["easy"] <= high
    curves = {entry["method"]: entry["curves"] for entry in drawn["draw_curves"]}
    assert list(curves) == list(rows) and curves[BASE_ROW]["train/budget"] == ([], [])
    # The 4 steps are all format warm-up in the RL configs (no reward yet); the budget is logged on every step.
    assert all(curves[m]["train/reward"] == ([], []) for m in rows)
    assert curves["RMT"]["train/budget"] == ([0, 1, 2, 3], [8.0, 8.0, *[float(token_budget(0.5, 8, 2, 0.25))] * 2])
    assert curves["RPT-style"]["train/budget"][1] == [8.0] * 4 and len(curves["NTP only"]["train/budget"][0]) == 4
    # Same seed, same data: the untrained model scores the same in a second comparison.
    again = compare(configs[:1], tmp_path / "again", [*TINY_RUN, "--data.cache_dir", str(tmp_path / "cache")], seed=3)
    assert again["rows"][0]["figures"] == {**rows[BASE_ROW]["figures"]}


@pytest.mark.skipif(not GSM8K.joinpath("test.jsonl").exists(), reason="needs ../shared/data/gsm8k")
def test_compare_on_the_gsm8k_jsonl(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    # configs/data/gsm8k.yaml names the hub dataset; the local copy beside the project stands in for it.
    overrides = ["--config", "configs/data/gsm8k.yaml", "--data.corpus", str(GSM8K / "train.jsonl"),
                 "--data.val_corpus", str(GSM8K / "test.jsonl"), *TINY_RUN, "--data.max_documents", "24",
                 "--data.val_documents", "4", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1"]
    result = compare(["configs/rmt.yaml"], tmp_path / "out", overrides, base=False)
    (row,) = result["rows"]
    assert row["method"] == "RMT" and row["steps"] == 2 and row["positions"] == 6
    config = (Path(row["log_dir"]) / "config.yaml").read_text()
    assert "gsm8k/test.jsonl" in config and "gsm8k/train.jsonl" in config


def test_an_interrupted_comparison_keeps_the_rows_it_finished_and_reruns_only_the_rest(tmp_path, monkeypatch):
    configs = []
    for name in ("rmt", "rpt_baseline"):
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text("{}\n")
    calls = []

    def fake_run(config, label, run_name, out_dir, overrides, train=True, keep_artifacts=False, resume=False):
        calls.append((run_name, resume))
        if run_name == "rpt_baseline" and not resume:
            raise KeyboardInterrupt
        return {"method": label, "scored_by": "reasoning", "easy": 50.0, "medium": 40.0, "hard": 30.0, "avg": 40.0,
                "reasoning_length": 3.0, "answer_rate": 1.0, "argmax_avg": 20.0, "eval_budget": 2, "positions": 8,
                "steps": 0 if not train else 4, "trained": train, "train_seconds": 1.0, "train_cpu_seconds": 1.0}

    monkeypatch.setattr(compare_module, "evaluate_run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        compare([str(c) for c in configs], tmp_path / "out")
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [row["method"] for row in written["rows"]] == [BASE_ROW, "RMT"] and written["pending_rows"] == 1
    assert "| RMT | reasoning | 50.00 | 40.00 | 30.00 | 40.00 | 3.0 |" in (tmp_path / "out" / "comparison.md").read_text()
    assert json.loads((tmp_path / "out" / "rows" / "rpt_baseline.json").read_text())["status"] == "running"
    # The same command again: only the row that did not finish runs, as a resumed one.
    result = compare([str(c) for c in configs], tmp_path / "out")
    assert calls == [("base", False), ("rmt", False), ("rpt_baseline", False), ("rpt_baseline", True)]
    assert [row["method"] for row in result["rows"]] == [BASE_ROW, "RMT", "RPT-style"] and result["pending_rows"] == 0


# ---- the format stage -------------------------------------------------------------------------------------

FORMAT_SFT = CONFIGS / "format_sft.yaml"


def format_stage_arguments(folder: Path) -> list[str]:
    """configs/format_sft.yaml on the tiny model and the embedded corpus: 2 epochs of 2 steps, validating every 2."""
    return ["--config", str(FORMAT_SFT), "--model.model_name_or_path", BUILTIN_TINY, "--model.lr", "1e-2",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false", "--data.corpus", "embedded:math", "--data.val_corpus", "null",
            "--data.embedded_documents", "48", "--data.val_documents", "8", "--data.val_positions", "6",
            "--data.batch_size", "2", "--data.batches_per_epoch", "2", "--data.cache_dir", str(folder / "cache"),
            "--trainer.logger.init_args.save_dir", str(folder / "logs")]


@pytest.fixture(scope="module")
def format_stage(tmp_path_factory):
    """The tiny format stage, fitted once: its CLI (after fit) and its log folder."""
    folder = tmp_path_factory.mktemp("format_stage")
    cli = build_cli(["fit", *format_stage_arguments(folder)])
    return cli, Path(cli.trainer.log_dir)


def test_format_stage_config_is_rmt_data_on_gsm8k_with_demonstrations_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage = build_cli(["--config", str(FORMAT_SFT), "--trainer.accelerator", "cpu"], run=False)
    rows = build_cli(["--config", str(CONFIGS / "rmt.yaml"), "--config", str(CONFIGS / "data" / "gsm8k.yaml"),
                      "--trainer.accelerator", "cpu"], run=False)
    # The stage sees the documents and tiers of the rows it is a start for, and holds out test documents as they
    # do; it trains on larger batches and validates on more positions (embedded_documents only sizes the
    # embedded corpus, which neither reads).
    own = {"embedded_documents": None, "batch_size": 8, "val_documents": 100, "val_positions": 128}
    assert {**stage.datamodule.hparams, **own} == {**rows.datamodule.hparams, **own}
    assert {k: stage.datamodule.hparams[k] for k in own if k != "embedded_documents"} == {k: v for k, v in own.items() if v}
    model, row = stage.model.hparams, rows.model.hparams
    assert model.model_name_or_path == "builtin:smollm2-135m-instruct"
    for key in ("instruction", "response_prefix", "use_chat_template", "budget_forcing", "answer_allowance",
                "format_warmup_thought", "val_reasoning", "val_group_size", "val_temperature", "correctness"):
        assert model[key] == row[key], key
    # Every step of the schedule, and of any longer one, is a format step, at rmt.yaml's warm-up rate and B_0,
    # its demonstrations taking turns over the budgets rmt.yaml's schedule decays through.
    assert model.format_only and stage.model.format_steps > 1000 * stage.trainer.max_steps and model.format_warmup_lr is None
    assert model.lr == row.format_warmup_lr and model.budget == row.budget and model.beta == 0.0
    schedule = next(c for c in rows.trainer.callbacks if type(c).__name__ == "TokenBudget")
    assert model.format_warmup_budgets == [schedule.b0, 4, schedule.b_min]
    assert not any(type(c).__name__ == "TokenBudget" for c in stage.trainer.callbacks)
    assert any(type(c).__name__ == "HuggingFaceExport" for c in stage.trainer.callbacks)
    assert stage.trainer.val_check_interval == 50 and stage.trainer.check_val_every_n_epoch is None


def test_format_stage_trains_demonstrations_only_validates_on_a_curve_and_exports_a_model_that_loads(format_stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli, log_dir = format_stage
    events = EventAccumulator(str(log_dir))
    events.Reload()
    warmup = [e.value for e in events.Scalars("train/format_warmup")]
    assert warmup == [1.0] * 4 and "train/reward" not in events.Tags()["scalars"]
    assert cli.model.reference is None  # beta 0: no reference model
    # The curve: reasoning-mode and argmax accuracy every 2 steps, scored by the reasoning mode.
    curve = [json.loads(line) for line in (log_dir / "val_metrics.jsonl").read_text().splitlines()]
    assert [point["global_step"] for point in curve] == [2, 4]
    for point in curve:
        assert point["scored_by"] == "reasoning" and point["budget"] == 8
        assert point["val/acc_avg"] is not None and point["val/ntp_acc_avg"] is not None
    assert [e.value for e in events.Scalars("val/acc_avg")] == pytest.approx([p["val/acc_avg"] for p in curve])
    assert [e.value for e in events.Scalars("val/ntp_acc_avg")] == pytest.approx([p["val/ntp_acc_avg"] for p in curve])
    # The export is the trained policy, and a module starts from it.
    module = RMTModule(model_name_or_path=str(log_dir / "hf_export"))
    module.configure_model()
    trained = cli.model.policy.state_dict()
    loaded = module.policy.state_dict()
    assert set(loaded) == set(trained) and all(torch.equal(loaded[n], trained[n]) for n in trained)
    assert module.tokenizer.chat_template == cli.model.tokenizer.chat_template
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()


# ---- one starting point for every row -------------------------------------------------------------------


def _validate_figures(folder: Path, model: str, cache: Path) -> dict:
    """``python -m rmt_lightning validate`` of tiny.yaml with ``model`` as policy and the built-in tiny model as the
    entropy proxy: the figures it writes."""
    build_cli(["validate", "--config", TINY_CONFIG, "--model.model_name_or_path", model, "--data.proxy_name_or_path",
               BUILTIN_TINY, "--data.val_positions", "6", "--data.cache_dir", str(cache), "--trainer.enable_progress_bar",
               "false", "--trainer.logger.init_args.save_dir", str(folder)])
    return json.loads(next(folder.rglob("val_metrics.json")).read_text())


def _config_of(row: dict) -> dict:
    """The row's saved config, with its model's and data's arguments where a config without class_path has them."""
    config = yaml.safe_load((Path(row["log_dir"]) / "config.yaml").read_text())
    assert (config["model"]["class_path"], config["data"]["class_path"]) == ("rmt_lightning.RMTModule", "rmt_lightning.RMTDataModule")
    return {**config, "model": config["model"]["init_args"], "data": config["data"]["init_args"]}


@pytest.fixture(scope="module")
def trained_start(tmp_path_factory):
    """A start model that scores above the untrained one: tiny.yaml after 80 NTP steps at a high rate; its
    Hugging Face export and its last checkpoint."""
    folder = tmp_path_factory.mktemp("trained_start")
    cli = build_cli(["fit", "--config", TINY_CONFIG, "--model.rl", "false", "--model.lr", "1e-2", "--data.batch_size", "8",
                     "--data.batches_per_epoch", "40", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
                     "false", "--data.cache_dir", str(folder / "cache"), "--trainer.logger.init_args.save_dir", str(folder)])
    log_dir = Path(cli.trainer.log_dir)
    return log_dir / "hf_export", log_dir / "checkpoints" / "last.ckpt"


def test_start_from_a_hugging_face_folder_and_from_its_checkpoint_is_every_rows_model(trained_start, resumed, tmp_path):
    export, checkpoint = trained_start
    cache = tmp_path / "cache"
    # lr 0: a trained row that starts from the start model ends with it, and scores what the start row scores.
    overrides = [*tiny_rows(cache), "--model.lr", "0"]
    from_folder = compare([TINY_CONFIG], tmp_path / "folder", overrides, start=str(export))
    from_checkpoint = compare([TINY_CONFIG], tmp_path / "checkpoint", overrides, start=str(checkpoint))
    exported = tmp_path / "checkpoint" / "start" / "model"
    assert from_folder["start"]["kind"] == "folder" and from_checkpoint["start"]["kind"] == "checkpoint"
    assert from_checkpoint["start"]["model"] == str(exported.resolve())
    # The checkpoint's policy, exported once, holds the weights of the run's own export.
    ours, theirs = load_file(exported / "model.safetensors"), load_file(export / "model.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in theirs)
    # What `validate` of the start model writes, and not what the untrained model scores.
    expected = _validate_figures(tmp_path / "validate", str(export), cache)
    untrained = resumed["full"]["rows"][0]
    assert expected["val/ntp_acc_avg"] > untrained["figures"]["val/ntp_acc_avg"]
    for result, model in ((from_folder, export), (from_checkpoint, exported)):
        start_row, trained = result["rows"]
        assert start_row["method"] == START_ROW and trained["method"] == "tiny" and trained["steps"] == 6
        assert start_row["figures"] == expected
        assert {**trained["figures"], "global_step": 0, "epoch": 0} == expected
        for row in result["rows"]:
            # Every row loads the start model; the entropy proxy stays the one tiny.yaml names, so the held-out
            # positions fall into the splits of the comparison without --start.
            config = _config_of(row)
            assert config["model"]["model_name_or_path"] == row["model"] == str(model.resolve())
            assert config["data"]["proxy_name_or_path"] == row["proxy"] == BUILTIN_TINY
            assert row["split_positions"] == untrained["split_positions"]
        assert "Every row starts from" in (Path(start_row["log_dir"]).parents[2] / "comparison.md").read_text()


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: tmp / "absent", "does not exist; give a Hugging Face model folder"),
    (lambda tmp: (tmp / "plain").mkdir() or tmp / "plain", "is a folder without config.json"),
    (lambda tmp: (tmp / "sharded.ckpt").mkdir() or tmp / "sharded.ckpt", "is a sharded .distributed. checkpoint folder"),
    (lambda tmp: (tmp / "weights.bin").write_bytes(b"x") and tmp / "weights.bin", "is a file but not a .ckpt checkpoint"),
    (lambda tmp: (tmp / "cut.ckpt").write_bytes(b"PK\x03\x04 cut short") and tmp / "cut.ckpt", "is truncated or not a PyTorch checkpoint"),
])
def test_a_bad_start_is_one_error_before_any_work(make, message, tmp_path, monkeypatch, capsys):
    counted = Counted(monkeypatch)
    start = make(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        compare_module.main(["--configs", TINY_CONFIG, "--out", str(tmp_path / "out"), "--start", str(start)])
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --start '{start}'") and re.search(message, line), line
    assert counted.fits == [] and counted.validations == 0 and not (tmp_path / "out").exists()


def test_a_start_with_another_vocabulary_than_the_proxy_is_refused_before_training(tmp_path, monkeypatch):
    import shutil

    from rmt_lightning.engine.builtin_models import build_builtin_tiny

    start = tmp_path / "other-vocabulary"
    shutil.copytree(build_builtin_tiny(), start)
    tokenizer = json.loads((start / "tokenizer.json").read_text())
    vocabulary = tokenizer["model"]["vocab"]
    first, second = list(vocabulary)[100:102]
    vocabulary[first], vocabulary[second] = vocabulary[second], vocabulary[first]
    (start / "tokenizer.json").write_text(json.dumps(tokenizer))
    counted = Counted(monkeypatch)
    with pytest.raises(InputError, match=r"has another vocabulary than the entropy proxy 'builtin:tiny-llama'.*"
                                         r"--data.proxy_name_or_path"):
        compare([TINY_CONFIG], tmp_path / "out", tiny_rows(tmp_path / "cache"), start=str(start))
    assert counted.fits == [] and counted.validations == 0


# ---- resuming a comparison ----------------------------------------------------------------------------------


class CrashAtStep(L.Callback):
    """Stand-in for a process killed without warning: an error when optimizer step ``step`` starts."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """An uninterrupted comparison of tiny.yaml; the same comparison crashed in the trained row's step 3 (after
    the periodic checkpoint of step 2); and that one run again. Counts the fits and validations of the rerun."""
    folder = tmp_path_factory.mktemp("resume")
    overrides = tiny_rows(folder / "cache")
    full = compare([TINY_CONFIG], folder / "full", overrides)
    build = compare_module.build_run

    def crashing_build(args):
        cli = build(args)
        if args[-1] == "tiny":  # the trained row's run name, the last of compare's arguments
            cli.trainer.callbacks.append(CrashAtStep(3))
        return cli

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare_module, "build_run", crashing_build)
        with pytest.raises(RuntimeError, match="simulated crash at step 3"):
            compare([TINY_CONFIG], folder / "out", overrides)
    out = folder / "out"
    interrupted = {"base": (out / "rows" / "base.json").read_text(), "tiny": json.loads((out / "rows" / "tiny.json").read_text()),
                   "checkpoints": sorted(p.name for p in out.glob("runs/tiny/*/checkpoints/*.ckpt"))}
    with pytest.MonkeyPatch.context() as patch:
        counted = Counted(patch)
        again = compare([TINY_CONFIG], out, overrides)
    return {"folder": folder, "overrides": overrides, "full": full, "interrupted": interrupted, "again": again,
            "counted": counted}


def test_a_finished_row_is_kept_not_rerun(resumed):
    out = resumed["folder"] / "out"
    # The untrained row finished before the crash: its record is untouched and nothing evaluated it again.
    assert (out / "rows" / "base.json").read_text() == resumed["interrupted"]["base"]
    assert resumed["counted"].validations == 1 and len(resumed["counted"].fits) == 1  # the resumed row's alone
    assert [p.name for p in (out / "runs" / "base").iterdir()] == ["version_0"]
    # A third run finds every row finished: nothing is fitted or evaluated, the table is the same.
    with pytest.MonkeyPatch.context() as patch:
        counted = Counted(patch)
        third = compare([TINY_CONFIG], out, resumed["overrides"])
    assert counted.fits == [] and counted.validations == 0
    assert third["rows"] == resumed["again"]["rows"]


def test_an_interrupted_row_resumes_from_its_checkpoint_to_the_uninterrupted_figures(resumed):
    out, interrupted = resumed["folder"] / "out", resumed["interrupted"]
    assert interrupted["tiny"]["status"] == "running"
    assert interrupted["checkpoints"] == ["periodic-step=00000002.ckpt"]
    [resumed_from] = resumed["counted"].fits
    assert resumed_from == str(out / "runs" / "tiny" / "version_0" / "checkpoints" / "periodic-step=00000002.ckpt")
    full = {row["method"]: row for row in resumed["full"]["rows"]}
    again = {row["method"]: row for row in resumed["again"]["rows"]}
    row = again["tiny"]
    assert row["resumed_from"] == resumed_from and row["resumed_at_step"] == 2 and row["steps"] == 6
    # Same seed, on CPU: the figures of the uninterrupted comparison, and its per-step losses and rewards.
    for method in (BASE_ROW, "tiny"):
        assert again[method]["figures"] == full[method]["figures"]
    tags = ("train/loss", "train/reward", "train/budget")
    merged, uninterrupted = read_attempts(row["log_dirs"], tags), read_attempts(full["tiny"]["log_dirs"], tags)
    assert merged == uninterrupted and merged["train/loss"][0] == list(range(6))
    assert len(row["log_dirs"]) == 2  # the crashed attempt and the resumed one
    # The finished row's checkpoints are deleted (no --keep_artifacts); its record holds the row.
    assert not list(out.glob("runs/tiny/*/checkpoints"))
    record = json.loads((out / "rows" / "tiny.json").read_text())
    assert record["status"] == "finished" and record["attempts"] == 2 and record["row"] == row
    assert "tiny resumed from step 2" in (out / "comparison.md").read_text()


def test_a_preempted_row_resumes_from_its_preemption_checkpoint(resumed, tmp_path, monkeypatch):
    from stopping import SignalAtStep

    build = compare_module.build_run

    def signalled_build(args):
        cli = build(args)
        if args[-1] == "tiny":
            cli.trainer.callbacks.append(SignalAtStep(3))
        return cli

    monkeypatch.setattr(compare_module, "build_run", signalled_build)
    with pytest.raises(Preempted) as stopped:
        compare([TINY_CONFIG], tmp_path / "out", resumed["overrides"], base=False)
    assert stopped.value.step == 4 and stopped.value.path.name == "preempted.ckpt"
    monkeypatch.setattr(compare_module, "build_run", build)
    counted = Counted(monkeypatch)
    (row,) = compare([TINY_CONFIG], tmp_path / "out", resumed["overrides"], base=False)["rows"]
    assert counted.fits == [str(stopped.value.path)] and row["resumed_at_step"] == 4
    assert row["figures"] == resumed["full"]["rows"][1]["figures"]


@pytest.mark.parametrize(("change", "message"), [
    ({"seed": 1}, r"seed_everything was 0, now 1"),
    ({"overrides": ["--model.lr", "0.5"]}, r"model.lr was 0.001, now 0.5"),
    ({"start": "builtin"}, r"start.kind was None, now 'folder'"),
    ({"configs": [str(CONFIGS / "rmt.yaml")]}, r"holds row 'base model \(untrained\)' run with other inputs"),
])
def test_a_rerun_with_other_inputs_is_refused_before_any_work(change, message, resumed, monkeypatch):
    from rmt_lightning.engine.builtin_models import build_builtin_tiny

    out = resumed["folder"] / "out"
    before = {p: p.read_text() for p in (out / "rows").iterdir()}
    counted = Counted(monkeypatch)
    arguments = {"configs": [TINY_CONFIG], "overrides": resumed["overrides"] + change.get("overrides", []),
                 "seed": change.get("seed", 0), "start": str(build_builtin_tiny()) if "start" in change else None}
    if "configs" in change:
        arguments["configs"] = change["configs"]
    with pytest.raises(InputError, match=message) as refused:
        compare(arguments["configs"], out, arguments["overrides"], seed=arguments["seed"], start=arguments["start"])
    assert "rows of different inputs are not mixed" in str(refused.value) and "another --out" in str(refused.value)
    assert counted.fits == [] and counted.validations == 0
    assert {p: p.read_text() for p in (out / "rows").iterdir()} == before


def test_what_does_not_change_a_row_does_not_refuse_it(resumed, monkeypatch):
    counted = Counted(monkeypatch)
    result = compare([TINY_CONFIG], resumed["folder"] / "out", [*resumed["overrides"], "--trainer.enable_progress_bar", "true"])
    assert counted.fits == [] and result["rows"] == resumed["again"]["rows"]


def test_a_run_folder_no_record_describes_is_refused(tmp_path, monkeypatch):
    (tmp_path / "out" / "runs" / "tiny" / "version_0").mkdir(parents=True)
    counted = Counted(monkeypatch)
    with pytest.raises(InputError, match=r"runs/tiny holds a run that no row record .* describes"):
        compare([TINY_CONFIG], tmp_path / "out", tiny_rows(tmp_path / "cache"), base=False)
    assert counted.fits == []


# ---- the command line ---------------------------------------------------------------------------------------


def test_a_missing_config_is_one_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        compare_module.main(["--configs", str(tmp_path / "no_such.yaml"), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: config file(s) not found: [") and "no_such.yaml" in line


def test_python_m_rmt_lightning_compare_passes_what_follows_the_double_dash_to_every_run(monkeypatch):
    from rmt_lightning.__main__ import main

    calls = []
    monkeypatch.setattr(compare_module, "compare", lambda *args, **kwargs: calls.append((args, kwargs)))
    main(["compare", "--configs", "a.yaml", "b.yaml", "--out", "out", "--seed", "4", "--no-base", "--start", "m", "--",
          "--config", "configs/data/gsm8k.yaml", "--trainer.max_epochs", "1"])
    assert calls == [((["a.yaml", "b.yaml"], "out", ["--config", "configs/data/gsm8k.yaml", "--trainer.max_epochs", "1"]),
                      {"seed": 4, "base": False, "keep_artifacts": False, "start": "m", "table_b": None})]


def test_a_preempted_comparison_says_how_to_resume_and_exits_128_plus_the_signal(monkeypatch, capsys, tmp_path):
    import signal

    def preempted(*args, **kwargs):
        raise Preempted(signal.SIGTERM, tmp_path / "preempted.ckpt", 7, 0)

    monkeypatch.setattr(compare_module, "compare", preempted)
    with pytest.raises(SystemExit) as stopped:
        compare_module.main(["--configs", TINY_CONFIG])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == [
        f"SIGTERM received: stopped after step 7; checkpoint written to {tmp_path / 'preempted.ckpt'}; run the same "
        "compare command again to resume"]


def test_the_summary_says_whether_rmt_and_rpt_differ_beyond_their_intervals():
    positions = {"easy": 500, "medium": 200, "hard": 60}

    def row(method, avg, length):
        return {"method": method, "avg": avg, "reasoning_length": length, "split_positions": positions}

    far = compare_module.summary([row("RMT", 40.0, 2.0), row("RPT-style", 10.0, 8.0)])
    assert far["avg_intervals_disjoint"] is True and far["avg_relative_gain"] == pytest.approx(3.0)
    assert far["reasoning_length_ratio"] == pytest.approx(0.25)
    assert compare_module.summary([row("RMT", 40.0, 2.0), row("RPT-style", 36.0, 8.0)])["avg_intervals_disjoint"] is False
    # A record written before split positions were kept: no verdict rather than a wrong one.
    old = compare_module.summary([{**row("RMT", 40.0, 2.0), "split_positions": None}, row("RPT-style", 10.0, 8.0)])
    assert "avg_intervals_disjoint" not in old
