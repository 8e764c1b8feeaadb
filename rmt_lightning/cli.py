"""``python -m rmt_lightning fit|validate|test --config configs/<name>.yaml``: LightningCLI for RMT."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .data.datamodule import RMTDataModule
from .module import RMTModule


class RMTCLI(LightningCLI):
    """LightningCLI that gives the datamodule the policy's name, so the corpus is tokenized by its tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")


def build_cli(args=None, run: bool = True) -> RMTCLI:
    """The CLI; ``args`` as a list replaces ``sys.argv`` and ``run=False`` only builds the objects (for tests)."""
    return RMTCLI(
        RMTModule,
        RMTDataModule,
        seed_everything_default=0,
        trainer_defaults={
            # The curriculum sampler shards the global batch across ranks itself.
            "use_distributed_sampler": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs", "name": "rmt"}},
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args=None) -> None:
    """Entry point of ``python -m rmt_lightning``."""
    build_cli(args)
