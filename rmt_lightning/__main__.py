"""``python -m rmt_lightning fit|validate|test ...`` (LightningCLI) and ``python -m rmt_lightning compare ...``."""

import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``compare`` to :mod:`rmt_lightning.compare`, everything else to the LightningCLI."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["compare"]:
        from .compare import main as compare

        compare(words[1:])
    else:
        from .cli import main as lightning_cli

        # None lets LightningCLI read sys.argv itself (it warns when given a list and sys.argv both).
        lightning_cli(argv)


if __name__ == "__main__":
    main()
