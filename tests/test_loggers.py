"""Completions tables, histograms and scalars of a tiny run, read back from each logger's own files (TensorBoard
events, a CSV folder, a W&B offline run, an MLflow file store), several loggers at once, two processes gathered to
rank 0, a logger the project does not know, and what the progress bar shows on each kind of step."""

import csv
import json
import struct
import time
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from rmt_lightning import CompletionsTable, RMTDataModule, RMTModule
from rmt_lightning.callbacks.writers import COLUMNS, HISTOGRAM_BINS
from rmt_lightning.engine.models import BUILTIN_TINY
from test_evaluation import _events as tensorboard_events

ROOT = Path(__file__).resolve().parents[1]

STEPS, BATCH, GROUP, LOG_SAMPLES, VAL_POSITIONS = 2, 2, 2, 2, 4
HISTOGRAM_COUNTS = {"curriculum/sampled_entropy": BATCH, "train/reasoning_length_hist": BATCH * GROUP}
"""Values in each training histogram: one entropy per sampled position, one length per completion."""


def _fit(tmp_path, loggers, callbacks=(), module=None, **trainer):
    """Two RL steps of the tiny model and one validation at the end, logging to ``loggers``."""
    L.seed_everything(0)
    module = RMTModule(**{"model_name_or_path": BUILTIN_TINY, "group_size": GROUP, "answer_allowance": 2,
                          "budget_forcing": True, "budget": 4, "log_samples": LOG_SAMPLES, **(module or {})})
    data = RMTDataModule(model_name_or_path=BUILTIN_TINY, embedded_documents=48, val_documents=8, batch_size=BATCH,
                         batches_per_epoch=STEPS, max_context_tokens=48, val_positions=VAL_POSITIONS, val_batch_size=4,
                         cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(**{"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": loggers,
                           "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                           "num_sanity_val_steps": 0, "log_every_n_steps": 1, "use_distributed_sampler": False,
                           "default_root_dir": str(tmp_path), "callbacks": [CompletionsTable(), *callbacks], **trainer})
    trainer.fit(module, datamodule=data)
    return trainer, module


def _check_tables(tables: dict[tuple[str, int], list[dict]]) -> None:
    """``(tag, step) -> rows`` holds the training table of every step and the validation table of the last."""
    assert sorted(tables) == [("completions", 1), ("completions", 2), ("completions/val", 2)]
    for (tag, _), rows in tables.items():
        assert len(rows) == LOG_SAMPLES, tag
        assert all(list(row) == list(COLUMNS) for row in rows)
        assert all(row["tier"] in ("easy", "medium", "hard") and isinstance(row["reward"], float) for row in rows)
        assert all(isinstance(row["completion"], str) and row["completion"] for row in rows)


def _check_histograms(counts: dict[tuple[str, int], int]) -> None:
    """``(tag, step) -> number of values`` holds each training histogram at every step and validation's at the last."""
    expected = {(tag, step): n for tag, n in HISTOGRAM_COUNTS.items() for step in range(1, STEPS + 1)}
    expected[("val/reasoning_length_hist", STEPS)] = VAL_POSITIONS
    assert counts == expected


# ---- TensorBoard and CSV ------------------------------------------------------------------------------------


def test_tensorboard_and_csv_at_once_each_get_completions_histograms_and_scalars(tmp_path):
    tensorboard = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    csv_logger = CSVLogger(str(tmp_path / "csv"), name="run")
    _fit(tmp_path, [tensorboard, csv_logger])

    folder = Path(csv_logger.log_dir)
    with open(folder / "metrics.csv") as handle:
        scalars = list(csv.DictReader(handle))
    assert [float(r["train/reward"]) for r in scalars if r.get("train/reward")] and any(r.get("val/acc_avg") for r in scalars)
    lines = [json.loads(line) for line in (folder / "completions.jsonl").read_text().splitlines()]
    tables = {}
    for line in lines:
        tables.setdefault((line.pop("tag"), line.pop("step")), []).append(line)
    _check_tables(tables)
    histograms = [json.loads(line) for line in (folder / "histograms.jsonl").read_text().splitlines()]
    _check_histograms({(h["tag"], h["step"]): sum(h["counts"]) for h in histograms})
    for h in histograms:
        assert h["count"] == sum(h["counts"]) and len(h["counts"]) == HISTOGRAM_BINS == len(h["edges"]) - 1
        assert h["edges"][0] <= h["min"] <= h["mean"] <= h["max"] <= h["edges"][-1]

    events = tensorboard_events(tensorboard.log_dir)
    assert "train/reward" in events.Tags()["scalars"] and "val/acc_avg" in events.Tags()["scalars"]
    _check_histograms({(tag, e.step): int(e.histogram_value.num) for tag in events.Tags()["histograms"]
                       for e in events.Histograms(tag)})
    text = {tag.removesuffix("/text_summary"): events.Tensors(tag) for tag in events.Tags()["tensors"]
            if tag.startswith("completions")}
    assert {(tag, e.step) for tag, es in text.items() for e in es} == set(tables)
    markdown = text["completions/val"][-1].tensor_proto.string_val[0].decode().split("\n")
    assert markdown[0] == "| " + " | ".join(COLUMNS) + " |" and len(markdown) == 2 + LOG_SAMPLES


# ---- Weights & Biases -------------------------------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of a ``.wandb`` run file: LevelDB log format (32 KiB blocks of CRC, length, type and data;
    records split across blocks) after a 7-byte W&B header, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    raw, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert raw[:4] == b":W&B"
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if kind == 0:
            break
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(run_folder: Path, timeout: float = 60.0) -> list[dict]:
    """Every logged row of the offline run: ``{key: value}``, nested keys joined by ``/``."""
    from google.protobuf.message import DecodeError

    (path,) = run_folder.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    # wandb's service process may still be appending after finish() returns: read until the run's exit record.
    while True:
        try:
            records = list(_wandb_records(path))
        except DecodeError:
            records = []
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.2)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]


def test_wandb_offline_run_holds_completions_histograms_and_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    logger = WandbLogger(project="rmt-test", save_dir=str(tmp_path / "wandb"), offline=True)
    _fit(tmp_path, [logger])
    run_folder = Path(logger.experiment.dir).parent
    logger.experiment.finish()

    history = _wandb_history(run_folder)
    assert any("train/reward" in row for row in history) and any("val/acc_avg" in row for row in history)
    tables, counts = {}, {}
    for row in history:
        step = row.get("trainer/global_step")
        for key, value in row.items():
            if key.endswith("/_type") and value == "table-file":
                tag = key.removesuffix("/_type")
                table = json.loads((run_folder / "files" / row[f"{tag}/path"]).read_text())
                assert table["columns"] == list(COLUMNS)
                tables[(tag, step)] = [dict(zip(COLUMNS, values)) for values in table["data"]]
            elif key.endswith("/_type") and value == "histogram":
                counts[(key.removesuffix("/_type"), step)] = sum(row[key.replace("/_type", "/values")])
    _check_tables(tables)
    _check_histograms(counts)


# ---- MLflow -------------------------------------------------------------------------------------------------------


def test_mlflow_file_store_holds_completions_histograms_and_scalars(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    # MLflow 3 keeps the file store for existing workflows behind this switch.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    logger = MLFlowLogger(experiment_name="rmt-test", tracking_uri=uri)
    _fit(tmp_path, [logger])

    client = MlflowClient(uri)
    assert client.get_run(logger.run_id).data.metrics.keys() >= {"train/reward", "val/acc_avg"}
    assert len(client.get_metric_history(logger.run_id, "train/reward")) == STEPS
    artifacts = Path(client.download_artifacts(logger.run_id, "", str(tmp_path / "artifacts")))
    tables = {}
    for path in artifacts.glob("completions/**/step_*.json"):
        table = json.loads(path.read_text())
        assert table["columns"] == list(COLUMNS)
        tag = path.parent.relative_to(artifacts).as_posix()
        tables[(tag, int(path.stem.removeprefix("step_")))] = [dict(zip(COLUMNS, values)) for values in table["data"]]
    _check_tables(tables)
    histograms = [json.loads(p.read_text()) for p in artifacts.glob("histograms/**/step_*.json")]
    _check_histograms({(h["tag"], h["step"]): sum(h["counts"]) for h in histograms})


# ---- a logger the project does not know, and the progress bar ----------------------------------------------------


class _ScalarsOnly(Logger):
    """A logger of a kind the project does not know: it keeps the scalars Lightning gives it."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "scalars"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_an_unknown_logger_gets_the_scalars_and_one_warning_naming_what_it_cannot_show(tmp_path):
    logger = _ScalarsOnly()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module = _fit(tmp_path, [logger])
        trainer.validate(module, datamodule=trainer.datamodule, verbose=False)
    ours = [str(w.message) for w in caught if "CompletionsTable" in str(w.message)]
    assert len(ours) == 1, ours
    assert "_ScalarsOnly" in ours[0] and "completions" in ours[0] and "curriculum/sampled_entropy" in ours[0]
    logged = {key for _, metrics in logger.metrics for key in metrics}
    assert {"train/reward", "train/budget", "val/acc_avg"} <= logged


class _ProgressBarRecorder(L.Callback):
    """What the progress bar would show after each training step."""

    def __init__(self):
        self.shown = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        shown = trainer.progress_bar_callback.get_metrics(trainer, pl_module)
        shown.pop("v_num", None)
        self.shown.append(shown)


@pytest.mark.parametrize("module, expected", [
    ({"format_warmup_steps": 1}, [{"warmup_loss"}] + [{"reward", "budget"}] * 3),
    ({"rl": False}, [{"ntp_loss"}] * 4),
], ids=["warmup-then-rl", "ntp-only"])
def test_the_progress_bar_shows_what_each_step_trains(tmp_path, module, expected):
    recorder = _ProgressBarRecorder()
    # Two steps an epoch: the warm-up ends inside the first one, and RL runs on into the second.
    _fit(tmp_path, False, callbacks=[recorder], module=module, enable_progress_bar=True, max_steps=4,
         max_epochs=2, limit_val_batches=0)
    assert [set(shown) for shown in recorder.shown] == expected
    assert all(isinstance(v, float) and v == v for shown in recorder.shown for v in shown.values())  # never NaN


# ---- two processes ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_gather_every_rank_to_rank_0_in_each_logger(tmp_path):
    from distributed_probe import run_probe

    loggers = [{"class_path": f"lightning.pytorch.loggers.{kind}Logger", "init_args": {"save_dir": "logs", "name": kind}}
               for kind in ("TensorBoard", "CSV")]
    run_probe(tmp_path, tmp_path / "probe", ["--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.devices", "2",
                                             "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
                                             "--trainer.enable_progress_bar", "false", "--trainer.logger",
                                             json.dumps(loggers), "--data.cache_dir", str(tmp_path / "cache")])
    folder = tmp_path / "logs" / "CSV" / "version_0"
    # tiny.yaml: 2 positions per rank and step, 4 completions each; 8 held-out positions dealt to the 2 ranks. A table
    # shows the first completion of each position, up to model.log_samples (4) per rank.
    rows = [json.loads(line) for line in (folder / "completions.jsonl").read_text().splitlines()]
    assert sorted(Counter((r["tag"], r["step"]) for r in rows).items()) == [
        (("completions", 1), 4), (("completions", 2), 4), (("completions/val", 2), 8)]
    histograms = [json.loads(line) for line in (folder / "histograms.jsonl").read_text().splitlines()]
    assert {(h["tag"], h["step"]): h["count"] for h in histograms} == {
        ("curriculum/sampled_entropy", 1): 4, ("curriculum/sampled_entropy", 2): 4,
        ("train/reasoning_length_hist", 1): 16, ("train/reasoning_length_hist", 2): 16,
        ("val/reasoning_length_hist", 2): 8}
    events = tensorboard_events(tmp_path / "logs" / "TensorBoard" / "version_0")
    assert [int(e.histogram_value.num) for e in events.Histograms("train/reasoning_length_hist")] == [16, 16]
