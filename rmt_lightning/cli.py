"""``python -m rmt_lightning fit|validate|test|score --config configs/<name>.yaml``: LightningCLI for RMT.

``score`` runs the corpus's entropy scoring alone (every process its share, on its own device), with the same
config and overrides as ``fit``, as a cluster job of its own: ``fit`` then finds the cache warm.

Before a run starts, before any model is loaded, every input is checked (``preflight``); a bad one ends the
command with one line, ``error: ...``, and exit status 2. Checkpoints are written atomically, a preemption
signal stops the run with a checkpoint and exit status 128 + the signal's number, and ``--ckpt_path last``
finds the newest checkpoint across the logger's version folders.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import pickle
import re
import sys
from pathlib import Path
from unittest import mock

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from .callbacks import HuggingFaceExport, PeriodicCheckpoint, Preempted, PreemptionCheckpoint, TokenBudget
from .checks import check_mini_batches, check_question_fits, check_rollout_fits
from .data.datamodule import RMTDataModule
from .data.drawn import DrawnDataModule
from .data.question_datamodule import QuestionDataModule
from .data.scoring_pass import ScoringStopped
from .grpo_module import GRPOModule
from .module import NonFiniteLossError, RMTModule
from .posttrain import PostTrainModule
from .runtime.checkpointing import (
    remove_partial_writes, unsafe_checkpoint_error, use_atomic_checkpoint_io, verify_checkpoint_file,
)
from .runtime.errors import InputError, check_writable_directory

_LAST = re.compile(r"^last(-\d+)?\.ckpt$")


class RMTArgumentParser(LightningArgumentParser):
    """Reports a bad option in one line, with the closest valid name, instead of the whole usage text."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        message = _one_line_for_a_class_argument(message)
        unknown = re.search(r"does not accept option '([^']+)'", message)
        if unknown:
            options = [action.dest for action in parser._actions]
            section, _, name = unknown.group(1).partition(".")
            class_path = re.search(r" \[class_path '([^']+)'\]", message)
            if class_path:  # a class's argument: the options are its constructor's
                options = [f"{section}.{option}" for option in _constructor_arguments(class_path.group(1))]
                message = message.replace(class_path.group(0), "")
            close = difflib.get_close_matches(unknown.group(1), options, n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message}\n`{prog} --help` lists every valid option\n")
        sys.exit(2)


def _one_line_for_a_class_argument(message: str) -> str:
    """jsonargparse's several lines about a model's or data's unknown argument (their classes are chosen by
    class_path) as the one line a plain option gets."""
    key = re.search(r'Parser key "(\w+)"', message)
    option = re.search(r"Option '([^']+)' is not accepted", message)
    class_path = re.search(r"given class_path '([^']+)'", message)
    if not (key and option):
        return message
    # The class stays named for the suggestion (``RMTArgumentParser.error`` reads it and drops it).
    where = f" [class_path '{class_path.group(1)}']" if class_path else ""
    return f"does not accept option '{key.group(1)}.{option.group(1)}'{where}"


def _constructor_arguments(class_path: str) -> list[str]:
    from jsonargparse.typing import import_object  # noqa: PLC0415

    try:
        return list(inspect.signature(import_object(class_path).__init__).parameters)[1:]
    except (ImportError, AttributeError, ValueError):
        return []


class RMTTrainer(Trainer):
    """Lightning's Trainer, with ``score``."""

    def score(self, model=None, datamodule: RMTDataModule | None = None) -> None:
        """Score the corpus's token entropy and build its curriculum index, then stop (fit finds them cached).

        Every process scores its share of the corpus's shards on its own device (``--trainer.devices N
        --trainer.num_nodes M``); shards that an earlier, stopped pass finished are kept. A stop signal (SIGTERM,
        SIGUSR1) ends the pass after the shards in flight with exit status 128 + the signal's number; the same
        command continues.
        """
        if datamodule is None:
            raise InputError("score needs a datamodule (the corpus to score): --data ...")
        call._call_and_handle_interrupt(self, self._score, datamodule)

    def _score(self, datamodule: RMTDataModule) -> None:
        # What fit does before its setup hook: the processes join, then one per node builds the token stores.
        self.strategy.setup_environment()
        datamodule.trainer = self
        if self.local_rank == 0:
            datamodule.prepare_data()
        self.strategy.barrier("token stores built")
        datamodule.score_corpus()
        self.strategy.barrier("corpus scored")
        if self.is_global_zero:
            sizes = ", ".join(f"{name} {size:,}" for name, size in datamodule.tier_sizes().items())
            rank_zero_info(f"entropy scored and indexed in {datamodule.cache_folder}: candidate positions {sizes}")


class RMTCLI(LightningCLI):
    """LightningCLI that gives the datamodule the policy's name (the corpus is tokenized by its tokenizer),
    checks every input before a model is loaded, writes checkpoints atomically and checkpoints on preemption
    signals (``--preemption.signals``)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict is left out: an RMT model has no prediction step (validate and test evaluate it).
        commands = {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}
        return {**commands, "score": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")

    def parse_arguments(self, parser, args) -> None:
        self.given_arguments = args
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
            return
        # Without subcommands (``run=False``) the classes' arguments sit at the top level.
        with_subcommands = getattr(parser, "_subcommands_action", None) is not None
        args = with_default_classes(list(sys.argv[1:] if args is None else args),
                                    self.subcommands() if with_subcommands else None)
        self.given_arguments = args
        self.config = parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters before anything else: a damaged file must be one
        # clear error here, not a stream reader's traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last", "best", "hpc") and "://" not in str(ckpt_path):
            verify_checkpoint_file(ckpt_path, full=True)
        given = self.config
        try:
            with _hyperparameters_name_their_class():
                super()._parse_ckpt_path()
        except pickle.UnpicklingError as error:
            raise unsafe_checkpoint_error(ckpt_path, error) from None
        if self.config is not given and not isinstance(self.given_arguments, (dict, Namespace)):
            # Lightning lays the checkpoint's hyperparameters over everything parsed, so `--ckpt_path X
            # --model.val_budget 2` would silently evaluate at the checkpoint's budget. The configs and flags
            # given are applied again on top: the checkpoint fills in only what they leave out.
            self.config = self.parser.parse_args(self.given_arguments, namespace=self.config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            # A constructor's ValueError is a bad config value; jsonargparse wraps those raised in lists.
            cause = _root_value_error(error)
            if cause is None:
                raise
            raise InputError(str(cause)) from None
        use_atomic_checkpoint_io(self.trainer.strategy)

    def before_fit(self) -> None:
        self.preflight("fit")

    def before_validate(self) -> None:
        self.preflight("validate")

    def before_test(self) -> None:
        self.preflight("test")

    def before_score(self) -> None:
        if not isinstance(self.datamodule, RMTDataModule):
            raise InputError(f"score scores a corpus's token entropy for mid-training (RMTDataModule); "
                             f"{type(self.datamodule).__name__} has nothing to score")
        self.datamodule.check_inputs()

    def preflight(self, subcommand: str) -> None:
        """Check the output folders, the data and models, the sequence lengths and the checkpoint to resume
        from, before any model is loaded. Every process runs it, so all of them stop alike."""
        trainer = self.trainer
        for folder, what in _output_folders(trainer):
            check_writable_directory(folder, what)
        check_task_pair(self.model, self.datamodule)
        self.datamodule.check_inputs()
        if isinstance(self.model, RMTModule):
            schedule = TokenBudget.of(trainer)
            check_rollout_fits(self.model, self.datamodule.hparams.max_context_tokens,
                               schedule.b0 if schedule is not None else self.model.hparams.budget)
        else:
            check_question_fits(self.model, self.datamodule.hparams.max_prompt_tokens)
        if self.model.uses_rl:
            check_mini_batches(self.model.hparams.mini_batches_per_rollout, self.datamodule.hparams.batch_size)
        config = self.config_init[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            config["ckpt_path"] = find_last_checkpoint(trainer)


@contextlib.contextmanager
def _hyperparameters_name_their_class():
    """While LightningCLI reads a checkpoint's hyperparameters: those of a checkpoint written before a run named its
    classes (no ``_class_path``, always an RMTModule) are read as RMTModule's, as LightningCLI reads a newer one's."""
    import lightning.pytorch.cli as lightning_cli

    load = lightning_cli.torch.load

    def loading(*args, **kwargs):
        checkpoint = load(*args, **kwargs)
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if hparams and "_class_path" not in hparams:
            hparams["_class_path"] = DEFAULT_CLASSES["model"]
        return checkpoint

    with mock.patch.object(lightning_cli.torch, "load", loading):
        yield


DEFAULT_CLASSES = {"model": "rmt_lightning.RMTModule", "data": "rmt_lightning.RMTDataModule"}
"""The classes of a run whose configs and flags name none: mid-training."""


def _yaml_names_class(path: str, key: str, subcommand: str) -> bool:
    import yaml

    try:
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError):
        return False  # the parser reports an unreadable config itself
    for tree in (config, config.get(subcommand) if isinstance(config, dict) and subcommand else None):
        value = tree.get(key) if isinstance(tree, dict) else None
        if isinstance(value, str) or (isinstance(value, dict) and "class_path" in value):
            return True
    return False


def with_default_classes(args: list[str], subcommands) -> list[str]:
    """``args`` with ``--model=rmt_lightning.RMTModule`` and ``--data=rmt_lightning.RMTDataModule`` put right after
    the subcommand (first, with ``subcommands`` None: a parser without them) where no config or flag names a class for them, so a config of plain arguments is a
    mid-training run (as it always was) and ``configs/posttrain/`` name their own classes.

    Not a parser default: jsonargparse keeps a default class's argument values when a config then names another
    class, so the post-training module would silently take the mid-training module's defaults (its ``beta``)."""
    if subcommands is None:
        position, subcommand = -1, None
    else:
        position = next((i for i, arg in enumerate(args) if arg in subcommands), None)
        if position is None:
            return args
        subcommand = args[position]
    named = set()
    for i, arg in enumerate(args):
        flag, _, inline = arg.partition("=")
        if flag in ("--config", "-c") and (inline or i + 1 < len(args)):
            named |= {key for key in DEFAULT_CLASSES if _yaml_names_class(inline or args[i + 1], key, subcommand)}
        named |= {key for key in DEFAULT_CLASSES if flag in (f"--{key}", f"--{key}.class_path")}
    defaults = [f"--{key}={value}" for key, value in DEFAULT_CLASSES.items() if key not in named]
    return [*args[: position + 1], *defaults, *args[position + 1 :]]


TASKS = ((RMTModule, RMTDataModule), (PostTrainModule, QuestionDataModule))
"""Each task's module and the datamodule whose batches it reads."""


def check_task_pair(model, datamodule) -> None:
    """The module and the datamodule belong to the same task, else an InputError naming the right pair."""
    for module_class, data_class in TASKS:
        if isinstance(model, module_class) and not isinstance(datamodule, data_class):
            raise InputError(f"model {type(model).__name__} reads the batches of {data_class.__name__}, not of "
                             f"{type(datamodule).__name__}: set data.class_path rmt_lightning.{data_class.__name__}")
        if isinstance(datamodule, data_class) and not isinstance(model, module_class):
            raise InputError(f"data {type(datamodule).__name__} feeds {module_class.__name__}, not "
                             f"{type(model).__name__}: set model.class_path rmt_lightning.{module_class.__name__}")


def _root_value_error(error: BaseException) -> ValueError | None:
    """The first InputError in ``error``'s chain of causes, else the innermost ValueError, if any."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, InputError):
            return error
        if isinstance(error, ValueError):
            found = error
        error = error.__cause__ or error.__context__
    return found


def _output_folders(trainer) -> list[tuple[str, str]]:
    folders = [(trainer.default_root_dir, "trainer.default_root_dir")]
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or logger.save_dir
        if folder:
            folders.append((folder, f"log directory of {type(logger).__name__}"))
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append((callback.dirpath, "checkpoint directory (ModelCheckpoint dirpath)"))
        if isinstance(callback, HuggingFaceExport) and callback.dirpath:
            folders.append((callback.dirpath, "export directory (HuggingFaceExport dirpath)"))
    return folders


def _checkpoint_folders(trainer) -> list[Path]:
    """Where this run's checkpoints go (ModelCheckpoint, PeriodicCheckpoint, PreemptionCheckpoint): a folder
    given to a callback, and, with a logger, the ``checkpoints`` folder of every version of the logger's name
    (a requeued job logs to a new version)."""
    folders = []
    for callback in trainer.callbacks:
        if isinstance(callback, (ModelCheckpoint, PeriodicCheckpoint, PreemptionCheckpoint)) and callback.dirpath:
            folders.append(Path(callback.dirpath))
    if trainer.loggers:
        logger = trainer.loggers[0]
        root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name)
        folders.extend(sorted(root.glob("*/checkpoints")))
    else:
        folders.append(Path(trainer.default_root_dir) / "checkpoints")
    return list(dict.fromkeys(folders))


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a complete sharded checkpoint folder: Lightning's sharded strategies write the
    shards, then torch.distributed.checkpoint's ``.metadata``, then ``meta.pt`` (loops, callbacks, sampler), so a
    folder without both was cut short."""
    if path.name.startswith(".") or not path.name.endswith(".ckpt"):
        return False
    if path.is_dir() and not ((path / ".metadata").exists() and (path / "meta.pt").exists()):
        rank_zero_warn(f"ckpt_path='last': {path} is an incomplete sharded checkpoint (no .metadata or meta.pt); skipped")
        return False
    return True


def find_last_checkpoint(trainer) -> str | None:
    """The newest checkpoint in the run's checkpoint folders, however it was written (preemption, periodic,
    ModelCheckpoint's epoch-end and ``last.ckpt``), or None with a note.

    Lightning looks for ``last`` only in the folder of the *new* logger version, which never holds one, so
    ``--ckpt_path last`` would silently start from scratch; this looks through every version folder. Newest is
    by modification time: checkpoints are written in training order and renamed into place when complete."""
    folders = _checkpoint_folders(trainer)
    if rank_zero_only.rank == 0:
        removed = remove_partial_writes(folders)
        if removed:
            rank_zero_info(f"ckpt_path='last': removed {len(removed)} checkpoint write(s) cut short: {[str(p) for p in removed]}")
    candidates = [path for folder in folders if folder.is_dir() for path in folder.iterdir() if _is_checkpoint(path)]
    if not candidates:
        rank_zero_warn(f"ckpt_path='last': no checkpoint in {[str(f) for f in folders] or 'any checkpoint folder'}; training starts from the beginning")
        return None
    newest = max(candidates, key=lambda path: (path.stat().st_mtime, _LAST.match(path.name) is not None))
    verify_checkpoint_file(newest)
    rank_zero_info(f"ckpt_path='last': resuming from {newest}")
    return str(newest)


def build_cli(args=None, run: bool = True) -> RMTCLI:
    """The CLI; ``args`` as a list replaces ``sys.argv`` and ``run=False`` only builds the objects (for tests)."""
    return RMTCLI(
        GRPOModule,
        DrawnDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={
            # The curriculum sampler shards the global batch across ranks itself.
            "use_distributed_sampler": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs", "name": "rmt"}},
        },
        save_config_kwargs={"overwrite": True},
        parser_class=RMTArgumentParser,
        parser_kwargs={"prog": "python -m rmt_lightning"},
        trainer_class=RMTTrainer,
        args=args,
        run=run,
    )


def main(args=None) -> None:
    """Entry point of ``python -m rmt_lightning``: a bad input or a diverged run ends with one line on stderr
    and exit status 2 (input) or 1 (NaN/inf losses), not a traceback; a preempted run with one line naming its
    checkpoint (or, while scoring, its finished shards) and 128 + the signal's number."""
    try:
        build_cli(args)
    except (Preempted, ScoringStopped) as stopped:
        if stopped.global_rank == 0:
            sys.stderr.write(f"{stopped}\n")
        sys.exit(stopped.exit_status)
    except InputError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
    except NonFiniteLossError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(1)
