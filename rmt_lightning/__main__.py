"""``python -m rmt_lightning fit|validate|test ...`` (LightningCLI), ``python -m rmt_lightning compare ...`` and
``python -m rmt_lightning export CHECKPOINT FOLDER`` (a checkpoint's policy as a Hugging Face folder)."""

import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``compare`` to :mod:`rmt_lightning.compare`, ``export`` to ``export_checkpoint``, everything else
    to the LightningCLI."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["export"]:
        if len(words) != 3:
            sys.exit("usage: python -m rmt_lightning export CHECKPOINT FOLDER")
        from .callbacks.export import export_checkpoint
        from .checks import InputError

        try:
            print(export_checkpoint(words[1], words[2]))
        except InputError as error:
            sys.stderr.write(f"error: {error}\n")
            sys.exit(2)
    elif words[:1] == ["compare"]:
        from .compare import main as compare

        compare(words[1:])
    else:
        from .cli import main as lightning_cli

        # None lets LightningCLI read sys.argv itself (it warns when given a list and sys.argv both).
        lightning_cli(argv)


if __name__ == "__main__":
    main()
