"""``python -m rmt_lightning COMMAND``: ``fit``, ``validate``, ``test`` and ``score`` (LightningCLI, cli.py),
``compare`` (compare.py) and ``export`` (a checkpoint's policy as a Hugging Face folder)."""

import sys

PROG = "python -m rmt_lightning"

COMMANDS = {
    "fit": "train: GRPO on the curriculum's key tokens and next-token prediction on the rest (--config configs/<name>.yaml)",
    "validate": "evaluate a model or a checkpoint (--ckpt_path) on the held-out positions",
    "test": "the same held-out positions as validate, for a finished model",
    "score": "score the corpus's token entropy and build its curriculum index, as a job of its own",
    "compare": "train several configs from one start model and tabulate their accuracy with intervals and charts",
    "export": "write a checkpoint's policy as a Hugging Face folder: export CHECKPOINT FOLDER",
}


def usage() -> str:
    """The front page of the command line: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [options]", "",
             "Reinforcement Mid-Training (RMT) of causal language models on unlabelled corpora.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", f"`{PROG} COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the commands, or dispatch ``compare`` to :mod:`rmt_lightning.commands.compare`, ``export`` to
    ``export_checkpoint`` and the others to the LightningCLI."""
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help"):
        print(usage())
        return
    if words[:1] == ["export"]:
        if len(words) != 3:
            sys.exit(f"usage: {PROG} export CHECKPOINT FOLDER")
        from .callbacks.export import export_checkpoint
        from .runtime.errors import InputError

        try:
            print(export_checkpoint(words[1], words[2]))
        except InputError as error:
            sys.stderr.write(f"error: {error}\n")
            sys.exit(2)
    elif words[:1] == ["compare"]:
        from .commands.compare import main as compare

        compare(words[1:])
    else:
        from .cli import main as lightning_cli

        # None lets LightningCLI read sys.argv itself (it warns when given a list and sys.argv both).
        lightning_cli(argv)


if __name__ == "__main__":
    main()
