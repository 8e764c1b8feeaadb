"""Reliability: exact resume at an epoch boundary, mid-epoch and after ``max_steps``; checkpoints and the entropy
cache survive faults; every bad input stops the CLI with one message before any model is loaded; NaN/inf
steps are skipped and, K in a row, stop the run; loading is safe by default."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rmt_lightning
from rmt_lightning import RMTDataModule, RMTModule
from rmt_lightning.runtime.checkpointing import AtomicCheckpointIO, verify_checkpoint_file
from rmt_lightning.runtime.errors import InputError
from rmt_lightning.cli import _LAST, build_cli, main
from rmt_lightning.engine.models import BUILTIN_TINY, build_builtin_tiny, load_tokenizer
from rmt_lightning.module import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def run_main(args) -> int:
    """``python -m rmt_lightning`` in this process; its exit status."""
    try:
        main(list(args))
    except SystemExit as exit:
        return exit.code
    return 0


def tiny_variant(folder: Path, edit_config=None, edit_tokenizer=None) -> Path:
    """A copy of the built-in tiny model with its config or tokenizer config edited."""
    shutil.copytree(build_builtin_tiny(), folder)
    for name, edit in (("config.json", edit_config), ("tokenizer_config.json", edit_tokenizer)):
        if edit is not None:
            values = json.loads((folder / name).read_text())
            edit(values)
            (folder / name).write_text(json.dumps(values))
    return folder


def file_states(*folders: Path) -> dict[str, str]:
    """Content hash of every file under ``folders``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


# ---- exact resume ----------------------------------------------------------------------------------------


def resume_config(tmp_path: Path, name: str, model: Path) -> Path:
    """configs/tiny.yaml for 2 epochs of 3 steps, with a checkpoint at each epoch end and after every step."""
    config = yaml.safe_load(TINY.read_text())
    config["trainer"].update(max_epochs=2, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path / "logs"), name=name)
    budget = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("TokenBudget"))
    checkpoint = "lightning.pytorch.callbacks.ModelCheckpoint"
    config["trainer"]["callbacks"] = [
        budget,
        {"class_path": checkpoint, "init_args": {"save_last": True, "save_top_k": -1, "filename": "{epoch}-{step}"}},
        {"class_path": checkpoint, "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "dirpath": str(tmp_path / name / "steps"),
                                                  "filename": "{step}"}},
    ]
    config["model"]["model_name_or_path"] = str(model)
    config["data"].update(batches_per_epoch=3, cache_dir=str(tmp_path / "cache"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, *args):
    cli = build_cli(["fit", "--config", str(config), *args])
    losses = EventAccumulator(cli.trainer.logger.log_dir)
    losses.Reload()
    return {e.step: e.value for e in losses.Scalars("train/loss")}, cli.model.policy.state_dict(), cli.trainer.global_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dropout_model):
    folder = tmp_path_factory.mktemp("resume")
    losses, params, steps = fit(resume_config(folder, "full", dropout_model))
    assert steps == 6 and len(losses) == 6
    return folder, losses, params


def assert_same_run(resumed, uninterrupted, first_step: int) -> None:
    losses, params, steps = resumed
    _, full_losses, full_params = uninterrupted
    assert steps == 6
    assert losses == {s: v for s, v in full_losses.items() if s >= first_step}, (losses, full_losses)
    for name, value in full_params.items():
        assert torch.equal(params[name], value), name


def test_resume_at_an_epoch_boundary_is_exact(uninterrupted, dropout_model):
    folder = uninterrupted[0]
    [checkpoint] = (folder / "logs" / "full").glob("version_0/checkpoints/epoch=0-*.ckpt")
    resumed = fit(resume_config(folder, "at-epoch-end", dropout_model), "--ckpt_path", str(checkpoint))
    assert_same_run(resumed, uninterrupted, first_step=3)


def test_resume_mid_epoch_is_exact(uninterrupted, dropout_model):
    folder = uninterrupted[0]
    checkpoint = folder / "full" / "steps" / "step=4.ckpt"  # after the 1st of 3 steps of epoch 1
    resumed = fit(resume_config(folder, "mid-epoch", dropout_model), "--ckpt_path", str(checkpoint))
    assert_same_run(resumed, uninterrupted, first_step=4)


def test_resume_last_after_max_steps_continues_the_unfinished_epoch(uninterrupted, dropout_model):
    """A run stopped by max_steps mid-epoch writes last.ckpt with the epoch marked done by Lightning; the
    resumed run must finish that epoch's remaining batches, not start the next epoch. ``last`` is found in
    the earlier run's version folder although this run logs to a new one."""
    folder = uninterrupted[0]
    config = resume_config(folder, "max-steps", dropout_model)
    _, _, steps = fit(config, "--trainer.max_steps", "4")
    assert steps == 4
    resumed = fit(config, "--ckpt_path", "last")
    assert_same_run(resumed, uninterrupted, first_step=4)
    checkpoint = torch.load(next((folder / "logs" / "max-steps").glob("version_0/checkpoints/last.ckpt")), weights_only=True)
    # What a resume needs: the policy (not the frozen reference), optimizer, LR schedule, loop counters,
    # budget schedule, sampler position and RNG states.
    assert checkpoint["state_dict"] and all(key.startswith("policy.") for key in checkpoint["state_dict"])
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"] and checkpoint["loops"]["fit_loop"]
    assert any("TokenBudget" in key for key in checkpoint["callbacks"])
    assert checkpoint["RMTDataModule"]["sampler"] == {"epoch": 1, "batches_yielded": 1, "seed": 0, "global_batch_size": 2}
    assert {"torch", "numpy", "python"} <= set(checkpoint["rng_states"])


# ---- checkpoint faults -------------------------------------------------------------------------------------


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import torch
    import rmt_lightning.runtime.checkpointing as checkpointing

    path = sys.argv[1]
    io = checkpointing.AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(8)}, "global_step": 1}, path)

    class KilledMidWrite:
        # The file the checkpoint is written to; the process is killed (SIGKILL) once 1 MB is written.
        def __init__(self, name, mode):
            self.handle = open(name, mode)
        def write(self, data):
            written = self.handle.write(data)
            if self.handle.tell() > 2**20:
                self.handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return written
        def __getattr__(self, name):
            return getattr(self.handle, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.handle.close()

    checkpointing.open = KilledMidWrite
    io.save_checkpoint({"state_dict": {"w": torch.ones(2**22)}, "global_step": 2}, path)
""")


def test_checkpoint_write_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], env=env, capture_output=True, text=True)
    assert process.returncode == -signal.SIGKILL, process.stderr
    [partial] = [p for p in path.parent.iterdir() if p != path]
    assert partial.stat().st_size > 2**20  # the new checkpoint was being written
    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.zeros(8))
    # The partial file is never taken for a checkpoint, not even for "last", and the next write removes it.
    assert not _LAST.match(partial.name)
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder where configs/tiny.yaml has run once: logs with checkpoints, and a filled entropy cache."""
    folder = tmp_path_factory.mktemp("workspace")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert run_main(["fit", "--config", str(TINY), "--data.cache_dir", "cache", "--trainer.max_epochs", "1",
                         "--trainer.enable_progress_bar", "false"]) == 0
    finally:
        os.chdir(cwd)
    assert list(folder.glob("logs/tiny/version_0/checkpoints/last.ckpt")) and list(folder.glob("cache/entropy-*"))
    (folder / "empty.jsonl").write_text("")
    (folder / "no_text_field.jsonl").write_text("".join(json.dumps({"body": f"document {i} " * 20}) + "\n" for i in range(40)))
    (folder / "a_file").write_text("not a folder")
    return folder


def damaged_copies(checkpoint: Path, folder: Path) -> dict[str, Path]:
    data = checkpoint.read_bytes()
    middle = len(data) // 2
    damaged = {"truncated": data[:middle], "flipped": data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]}
    paths = {}
    for name, content in damaged.items():
        paths[name] = folder / f"{name}.ckpt"
        paths[name].write_bytes(content)
    return paths


def test_damaged_checkpoint_is_an_error_naming_the_file(workspace, tmp_path, monkeypatch, capsys):
    last = workspace / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    paths = damaged_copies(last, tmp_path)
    with pytest.raises(InputError, match="truncated.ckpt' is truncated"):
        AtomicCheckpointIO().load_checkpoint(paths["truncated"])
    with pytest.raises(InputError, match=r"flipped.ckpt' is corrupted \(record '.*' fails its CRC check\)"):
        AtomicCheckpointIO().load_checkpoint(paths["flipped"])
    assert AtomicCheckpointIO().load_checkpoint(last)["global_step"] == 2
    monkeypatch.chdir(workspace)
    for path, message in ((paths["truncated"], "is truncated"), (paths["flipped"], "is corrupted")):
        assert run_main(["fit", "--config", str(TINY), "--data.cache_dir", "cache", "--ckpt_path", str(path)]) == 2
        assert f"error: checkpoint '{path}' {message}" in capsys.readouterr().err


def test_flags_given_with_a_checkpoint_win_over_its_hyperparameters(workspace, monkeypatch):
    """Lightning lays a checkpoint's hyperparameters over the parsed arguments; ours re-applies what was given,
    so ``validate --ckpt_path X --model.val_budget 2`` evaluates at B = 2, and a checkpoint given without a
    config still supplies the model's arguments."""
    last = workspace / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["hyper_parameters"]
    assert saved["val_budget"] is None and saved["lr"] == 1e-3
    monkeypatch.chdir(workspace)
    common = ["--data.cache_dir", "cache", "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.name", "given"]
    assert run_main(["validate", "--config", str(TINY), *common, "--ckpt_path", str(last), "--model.val_budget", "2"]) == 0
    record = json.loads((workspace / "logs" / "given" / "version_0" / "val_metrics.json").read_text())
    assert record["budget"] == 2
    from rmt_lightning.cli import RMTCLI

    built = {}
    monkeypatch.setattr(RMTCLI, "_run_subcommand", lambda self, subcommand: built.setdefault("model", self.model))
    assert run_main(["validate", "--ckpt_path", str(last), "--data.corpus", "embedded:math", "--model.group_size", "3"]) == 0
    hparams = built["model"].hparams
    assert hparams.group_size == 3  # given
    assert hparams.lr == 1e-3 and hparams.model_name_or_path == BUILTIN_TINY  # from the checkpoint, not the defaults


# ---- entropy cache faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip-data-bytes", "truncate", "drop-checksum"])
def test_damaged_entropy_shard_is_detected_and_scored_again(tmp_path, monkeypatch, damage):
    """A shard damaged on disk (before the index was built from it) is reported, scored again and replaced; the
    index built then equals the one the undamaged shard gave."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from rmt_lightning.data import entropy_shards

    def datamodule():
        return RMTDataModule(model_name_or_path=BUILTIN_TINY, embedded_documents=24, val_documents=4,
                             cache_dir=str(tmp_path), max_document_tokens=64, scoring_window=64, scoring_stride=32)

    first = datamodule()
    first.score_corpus()
    expected = {t: first.train_index.tier_positions(t) for t in range(3)}
    [path] = tmp_path.glob("entropy-*/shard-*.safetensors")
    good = path.read_bytes()
    shutil.rmtree(first.train_index.folder)  # as if the pass had been killed before indexing
    if damage == "flip-data-bytes":
        path.write_bytes(good[:-40] + bytes(b ^ 0x55 for b in good[-40:]))
    elif damage == "truncate":
        path.write_bytes(good[: len(good) * 2 // 3])
    else:  # a file written by hand, without the checksum
        with safe_open(str(path), framework="pt") as handle:
            metadata = {k: v for k, v in handle.metadata().items() if k != "sha256"}
        save_file(load_file(str(path)), str(path), metadata=metadata)

    scored = []
    original = entropy_shards.score_entropy
    monkeypatch.setattr(entropy_shards, "score_entropy", lambda *a, **k: scored.append(1) or original(*a, **k))
    second = datamodule()
    with pytest.warns(UserWarning, match=f"entropy shard '{path}' is (incomplete or corrupted|unreadable)"):
        second.score_corpus()
    assert scored == [1], "the damaged shard was used instead of scoring again"
    for tier in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(second.train_index.tier_positions(tier), expected[tier]))
    third = datamodule()
    third.setup("fit")  # maps the rebuilt index
    assert scored == [1], "the rebuilt index was not used"


# ---- bad inputs ----------------------------------------------------------------------------------------------


def yaml_file(folder: Path, name: str, content: dict) -> str:
    path = folder / name
    path.write_text(yaml.safe_dump(content))
    return str(path)


def budget_callbacks(**budget) -> dict:
    return {"trainer": {"callbacks": [{"class_path": "rmt_lightning.TokenBudget", "init_args": {"b0": 8, "b_min": 2, "gamma": 0.25, **budget}}]}}


BAD_INPUTS = {
    # name: (extra arguments, with {w} for the workspace, expected message)
    "missing model path": (["--model.model_name_or_path", "{w}/models/missing"],
                           "model_name_or_path '{w}/models/missing' does not exist; give a Hugging Face model folder"),
    "hub id while offline": (["--model.model_name_or_path", "some-org/some-model"],
                             "model_name_or_path 'some-org/some-model' is a hub id, the hub is offline (HF_HUB_OFFLINE)"),
    "missing corpus file": (["--data.corpus", "{w}/missing.jsonl"], "corpus '{w}/missing.jsonl' does not exist"),
    "empty corpus": (["--data.corpus", "{w}/empty.jsonl"], "corpus '{w}/empty.jsonl' is empty: it holds no document"),
    "text field that does not exist": (["--data.corpus", "{w}/no_text_field.jsonl", "--data.text_field", "text"],
                                       "corpus '{w}/no_text_field.jsonl' has no field ['text']; its fields are ['body']"),
    "no candidate positions": (["--data.tier_thresholds", "[50, 60, 70]"],
                               "no position of corpus 'embedded:math' has entropy above tier_thresholds[0]=50.0"),
    "context longer than the model": (["--data.max_context_tokens", "4096"],
                                      "max_context_tokens=4096 is longer than model 'builtin:tiny-llama' supports (2048 positions)"),
    "rollout longer than the model": (["--model.budget", "2000", "--trainer.callbacks", "[]"],
                                      "the longest RL sequence, prompt"),
    "unknown YAML key": (["--config", "{unknown_key}"], "does not accept option 'model.lrr'; did you mean 'model.lr'?"),
    "b_min > b0": (["--config", "{b_min_above_b0}"], "budget b_min=20, b0=8 is not valid: it needs 1 <= b_min <= b0"),
    "gamma above 1": (["--config", "{gamma_above_1}"], "gamma=1.5 is not valid: it must be in (0.0, 1.0)"),
    "gamma 0": (["--config", "{gamma_0}"], "gamma=0.0 is not valid: it must be in (0.0, 1.0)"),
    "t1 >= t2": (["--data.t1", "0.7", "--data.t2", "0.7"], "t1=0.7, t2=0.7 are not valid: the curriculum needs 0 < t1 < t2 < 1"),
    "t2 outside (0, 1)": (["--data.t2", "1.2"], "t1=0.3, t2=1.2 are not valid: the curriculum needs 0 < t1 < t2 < 1"),
    "tier_thresholds not increasing": (["--data.tier_thresholds", "[1.0, 0.5, 1.5]"],
                                       "tier_thresholds: thresholds must be 3 strictly increasing values (t0, t1, t2), got (1.0, 0.5, 1.5)"),
    "p1 not summing to 1": (["--data.p1", "[0.5, 0.3, 0.1]"], "p1 must sum to 1 (within 1e-06), got sum 0.9"),
    "p2 negative": (["--data.p2", "[-0.2, 0.6, 0.6]"], "p2 entries must be non-negative, got (-0.2, 0.6, 0.6)"),
    "negative lambda": (["--model.ntp_weight", "-0.1"], "ntp_weight=-0.1 is not valid: it must be >= 0.0"),
    "negative beta": (["--model.beta", "-0.01"], "beta=-0.01 is not valid: it must be >= 0.0"),
    "G < 2": (["--model.group_size", "1"], "group_size=1: GRPO needs G >= 2 completions per position"),
    "no update per rollout": (["--model.updates_per_rollout", "0"], "updates_per_rollout=0 is not valid: it must be >= 1"),
    "mini-batches not dividing the batch": (["--model.mini_batches_per_rollout", "3"],
                                            "mini_batches_per_rollout=3 does not cut data.batch_size=2 RL positions per step "
                                            "into equal mini-batches of whole groups; valid: a divisor of 2 ([1, 2])"),
    "unknown reference dtype": (["--model.reference_dtype", "float64"],
                                "reference_dtype: dtype 'float64' is not supported; valid: ['bfloat16', 'float16', 'float32']"),
    "unknown scoring dtype": (["--data.scoring_dtype", "fp8"],
                              "scoring_dtype 'fp8' is not supported; valid: auto, bfloat16, float16, float32"),
    "unwritable log directory": (["--trainer.logger.init_args.save_dir", "{w}/a_file/logs"],
                                 "log directory of TensorBoardLogger '{w}/a_file/logs/tiny/version_0' cannot be created: '{w}/a_file' is a file"),
    "unwritable checkpoint directory": (["--config", "{unwritable_checkpoints}"],
                                        "checkpoint directory (ModelCheckpoint dirpath) '{w}/a_file/checkpoints' cannot be created"),
    "unwritable cache directory": (["--data.cache_dir", "{w}/a_file/cache"],
                                   "entropy cache folder (cache_dir) '{w}/a_file/cache' cannot be created"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_before_any_model_loads_with_one_message(case, workspace, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.chdir(workspace)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = []
    monkeypatch.setattr("rmt_lightning.grpo_module.load_causal_lm", lambda *a, **k: loaded.append(a) or pytest.fail("policy loaded"))
    monkeypatch.setattr("rmt_lightning.data.datamodule.load_causal_lm", lambda *a, **k: loaded.append(a) or pytest.fail("proxy loaded"))
    files = {
        "unknown_key": yaml_file(workspace, "unknown_key.yaml", {"model": {"lrr": 0.1}}),
        "b_min_above_b0": yaml_file(workspace, "b_min.yaml", budget_callbacks(b_min=20)),
        "gamma_above_1": yaml_file(workspace, "gamma_above.yaml", budget_callbacks(gamma=1.5)),
        "gamma_0": yaml_file(workspace, "gamma_0.yaml", budget_callbacks(gamma=0.0)),
        "unwritable_checkpoints": yaml_file(workspace, "checkpoints.yaml", {"trainer": {"callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(workspace / "a_file" / "checkpoints")}}]}}),
    }
    args, message = BAD_INPUTS[case]
    args = [a.format(w=workspace, **files) for a in args]
    before = file_states(workspace / "logs", workspace / "cache")

    status = run_main(["fit", "--config", str(TINY), "--data.cache_dir", "cache", "--trainer.enable_progress_bar", "false", *args])

    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2
    assert len(errors) == 1 and message.format(w=workspace) in errors[0], errors
    assert not loaded
    after = file_states(workspace / "logs", workspace / "cache")
    assert {k: v for k, v in after.items() if k in before} == before, "an existing checkpoint or cache file changed"
    assert not [k for k in after if k not in before and k.endswith((".ckpt", ".safetensors"))]


def test_bad_input_exit_status_of_the_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run([sys.executable, "-m", "rmt_lightning", "fit", "--config", str(TINY), "--model.beta", "-1"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1] == "error: beta=-1.0 is not valid: it must be >= 0.0"
    assert "Traceback" not in process.stderr and not (tmp_path / "logs").exists()


def test_a_diverged_run_exits_with_status_1_and_one_line(monkeypatch, capsys):
    def diverge(args):
        raise NonFiniteLossError("the loss or the gradients were NaN/inf on 5 consecutive steps")

    monkeypatch.setattr("rmt_lightning.cli.build_cli", diverge)
    assert run_main(["fit"]) == 1
    assert capsys.readouterr().err == "error: the loss or the gradients were NaN/inf on 5 consecutive steps\n"


def test_empty_tiers_warn_and_the_mix_is_renormalised(tmp_path):
    # A random model is equally unsure everywhere: every candidate is hard, easy and medium are empty.
    datamodule = RMTDataModule(model_name_or_path=BUILTIN_TINY, embedded_documents=24, val_documents=4, batch_size=4,
                               batches_per_epoch=3, cache_dir=str(tmp_path))
    datamodule.prepare_data()
    with pytest.warns(UserWarning, match=r"curriculum tier\(s\) \['easy', 'medium'\] have no candidate position"):
        datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        assert batch.curriculum_probabilities.tolist() == [0.0, 0.0, 1.0]
        assert batch.tiers.tolist() == [2, 2, 2, 2]


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without a logger the CLI writes its config.yaml to the working directory
    def drop_pad(config):
        config.pop("pad_token", None)

    model = tiny_variant(tmp_path / "no-pad", edit_tokenizer=drop_pad)
    tokenizer = load_tokenizer(str(model))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    config = yaml.safe_load(TINY.read_text())
    config["trainer"].update(max_steps=1, logger=False, callbacks=[], enable_progress_bar=False, enable_checkpointing=False,
                             limit_val_batches=0)
    config["model"]["model_name_or_path"] = str(model)
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    cli = build_cli(["fit", "--config", yaml_file(tmp_path, "no_pad.yaml", config)])
    assert cli.trainer.global_step == 1 and cli.model.tokenizer.pad_token_id == cli.model.tokenizer.eos_token_id


# ---- non-finite losses ---------------------------------------------------------------------------------------


def ntp_run(tmp_path, max_steps, **model):
    module = RMTModule(model_name_or_path=BUILTIN_TINY, rl=False, lr=1e-3, grad_clip=0.0, **model)
    datamodule = RMTDataModule(model_name_or_path=BUILTIN_TINY, embedded_documents=24, val_documents=4, batch_size=2,
                               batches_per_epoch=4, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False, default_root_dir=str(tmp_path))
    return module, datamodule, trainer


class _StepWatcher(L.Callback):
    """Records, per batch, the logged skip count, whether the weights moved, and the gradients after the step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = [p.detach().clone() for p in module.policy.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        moved = any(not torch.equal(a, p) for a, p in zip(self.before, module.policy.parameters()))
        no_grads = all(p.grad is None for p in module.policy.parameters())
        self.rows.append((float(trainer.callback_metrics["train/skipped_steps"]), moved, no_grads, trainer.global_step))


def test_nan_loss_and_nan_gradient_skip_the_step(tmp_path, monkeypatch):
    module, datamodule, trainer = ntp_run(tmp_path, max_steps=3, max_consecutive_skips=3)
    original = RMTModule.ntp_backward
    calls = []

    def poisoned(self, *args):
        calls.append(1)
        nll = original(self, *args)
        if len(calls) == 2:
            return float("nan")  # a NaN loss
        if len(calls) == 3:
            next(self.policy.parameters()).grad[0, 0] = float("inf")  # a finite loss with an inf gradient
        return nll

    monkeypatch.setattr(RMTModule, "ntp_backward", poisoned)
    watcher = _StepWatcher()
    trainer.callbacks.append(watcher)
    trainer.fit(module, datamodule=datamodule)
    # (skipped so far, weights moved, gradients zeroed, optimizer steps): batches 2 and 3 are skipped.
    assert [r[:3] for r in watcher.rows] == [(0.0, True, True), (1.0, False, True), (2.0, False, True), (2.0, True, True), (2.0, True, True)]
    assert trainer.global_step == 3 and module.skipped_steps == 2 and module.consecutive_skips == 0


def test_k_consecutive_non_finite_steps_stop_the_run(tmp_path, monkeypatch):
    module, datamodule, trainer = ntp_run(tmp_path, max_steps=10, max_consecutive_skips=3)
    monkeypatch.setattr(RMTModule, "ntp_backward", lambda self, *args: float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf on 3 consecutive steps .*max_consecutive_skips=3"):
        trainer.fit(module, datamodule=datamodule)
    assert module.skipped_steps == 3 and trainer.global_step == 0


# ---- safe by default -----------------------------------------------------------------------------------------


def test_safe_defaults_no_remote_code_no_unsafe_load_no_eval(tmp_path):
    for cls in (RMTModule, RMTDataModule):
        assert inspect.signature(cls).parameters["trust_remote_code"].default is False
    package = Path(rmt_lightning.__file__).parent
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in ("eval", "exec", "pickle.load", "pickle.loads"), f"{source}: {name}"
            if name == "torch.load":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert keywords.get("weights_only") == "True", f"{source}: torch.load without weights_only=True"
    # A checkpoint that would run code when unpickled is refused.
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "callback": L.Callback()}, path)
    with pytest.raises(InputError, match="unsafe.ckpt' holds lightning.pytorch.callbacks.callback.Callback \\(code or objects, not only tensors"):
        AtomicCheckpointIO().load_checkpoint(path)
    verify_checkpoint_file(path)  # the file itself is intact
