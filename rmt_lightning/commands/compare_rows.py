"""The rows of a comparison: what defines each (its resolved config, whether it trains, the start model), the
record each writes under ``{out}/rows/`` so a rerun keeps finished rows and resumes an interrupted one, and the
``--start`` model every row begins from (``compare.py`` runs the rows and writes the table)."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ..runtime.atomic import publish_folder, staged_file
from ..runtime.checkpointing import verify_checkpoint_file
from ..runtime.errors import InputError

METHOD_NAMES = {
    "rmt": "RMT",
    "rpt_baseline": "RPT-style",
    "ntp_only": "NTP only",
    "rmt_no_budget": "RMT w/o budget",
    "rmt_no_curriculum": "RMT w/o curriculum",
    "rmt_no_ntp": "RMT w/o NTP",
    "rmt_length_when_correct": "RMT, length reward only when correct",
}
"""Row labels of the configs in ``configs/``; any other config is labelled by its file name."""

BASE_ROW = "base model (untrained)"
"""Label of the row that evaluates the first config's model before any training."""

START_ROW = "start model (no further training)"
"""Label of that row when ``--start`` gives the model: it may have been trained before (a format stage, say)."""

ROWS_FOLDER = "rows"
"""``{out}/rows/{run}.json``: each row's record (what defines it, and its figures once finished)."""

START_FOLDER = "start"
"""``{out}/start/model``: the Hugging Face export of a ``--start`` checkpoint, made once."""

_EXPORT_COMPLETE = "EXPORT_COMPLETE"

NOT_DEFINING = ("trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary", "data.cache_dir")
"""Config keys (and key prefixes) that change where a row writes or what it prints, not what it computes: a row
resumes, or is kept, whatever they are (compare sets the logger's folder itself; the entropy cache is keyed by
its inputs wherever it lies)."""


@contextmanager
def _quiet_lightning():
    """Lightning's notes (seed set, accelerators found) said once per row, not again for every look at a config."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def build_run(args: list[str]):
    """The row's objects, built by the project's LightningCLI from ``args`` (nothing is loaded or run)."""
    from ..cli import build_cli

    # LightningCLI warns when it gets a list of arguments while sys.argv holds others (compare's own).
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return build_cli(args, run=False)
    finally:
        sys.argv = argv


# ---- the starting model -----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, in name order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_start(start: str, out_dir: Path) -> dict:
    """What ``--start`` names, checked before any work: ``{"given", "kind", "sha256", "model"}``, where kind is
    ``folder`` (a Hugging Face model folder, loaded as it is) or ``checkpoint`` (a single-file Lightning
    checkpoint, whose policy every row loads from its export ``{out_dir}/start/model``)."""
    path = Path(start).expanduser()
    valid = "give a Hugging Face model folder (with config.json) or a .ckpt file this project wrote"
    if not path.exists():
        raise InputError(f"--start '{start}' does not exist; {valid}")
    if path.is_dir():
        if path.name.endswith(".ckpt") or (path / ".metadata").exists():
            raise InputError(
                f"--start '{start}' is a sharded (distributed) checkpoint folder, which compare does not load; write a "
                "full checkpoint file (FSDP2: --trainer.strategy.init_args.save_distributed_checkpoint false) or "
                f"give the run's Hugging Face export; {valid}")
        if not (path / "config.json").is_file():
            raise InputError(f"--start '{start}' is a folder without config.json, not a Hugging Face model folder; {valid}")
        return {"given": start, "kind": "folder", "sha256": _sha256(path), "model": str(path.resolve())}
    if path.suffix != ".ckpt":
        raise InputError(f"--start '{start}' is a file but not a .ckpt checkpoint; {valid}")
    try:
        verify_checkpoint_file(path, full=True)
    except InputError as error:
        raise InputError(f"--start '{start}': {error}") from None
    model = (out_dir / START_FOLDER / "model").resolve()
    return {"given": start, "kind": "checkpoint", "sha256": _sha256(path), "model": str(model)}


def export_start(start: dict) -> None:
    """For a checkpoint ``start``, write its policy as the Hugging Face folder every row loads (atomically, once:
    a later run of the same comparison reuses it while the checkpoint's SHA-256 is the same)."""
    from ..callbacks.export import export_checkpoint

    if start["kind"] != "checkpoint":
        return
    target = Path(start["model"])
    source = target / "start.json"
    if (target / _EXPORT_COMPLETE).is_file() and source.is_file() and json.loads(source.read_text())["sha256"] == start["sha256"]:
        return

    def write(folder: Path) -> None:
        export_checkpoint(start["given"], str(folder))
        source_record = {"checkpoint": str(Path(start["given"]).resolve()), "sha256": start["sha256"]}
        (folder / "start.json").write_text(json.dumps(source_record, indent=2) + "\n")

    print(f"compare: exporting the policy of {start['given']} to {target}", file=sys.stderr, flush=True)
    publish_folder(target, write, marker=_EXPORT_COMPLETE)


def check_start_tokenizer(start: dict, proxies: list[str]) -> None:
    """The start model tokenizes the corpus and each proxy scores those token ids: they must share one vocabulary."""
    from ..engine.models import load_tokenizer

    vocabulary = load_tokenizer(start["model"]).get_vocab()
    for proxy in sorted(set(proxies)):
        if load_tokenizer(proxy).get_vocab() != vocabulary:
            raise InputError(
                f"--start '{start['given']}' has another vocabulary than the entropy proxy '{proxy}', which would score "
                "token ids it does not know; name a proxy with the start model's tokenizer after --, e.g. "
                f"--data.proxy_name_or_path {start['model']} (the start model itself)")


def start_arguments(config: str, common: list[str], start: dict | None) -> list[str]:
    """The arguments that make a row of ``config`` start from ``start``: its policy, and the entropy proxy the
    row names without ``start`` (``data.proxy_name_or_path``, else its own model), so that the tiers and
    held-out splits stay those of the same comparison without ``start``."""
    if start is None:
        return []
    with _quiet_lightning():
        cli = build_run(["--config", config, *common])
    proxy = cli.datamodule.hparams.proxy_name_or_path or cli.model.hparams.model_name_or_path
    return ["--model.model_name_or_path", start["model"], "--data.proxy_name_or_path", proxy]


# ---- the rows and their records ---------------------------------------------------------------------------


@dataclass
class Row:
    """One planned row: its config, label and run folder name, whether it trains, the LightningCLI arguments
    after ``--config`` and the definition its record is checked against."""

    config: str
    label: str
    run_name: str
    train: bool
    arguments: list[str]
    definition: dict
    proxy: str | None = None
    """The entropy proxy ``start_arguments`` names (None: the row's own, without ``--start``)."""


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def _as_plain_keys(flat: dict) -> dict:
    """``model.init_args.lr`` as ``model.lr`` (and ``data.`` alike), the task's classes only where they are not
    the default mid-training ones: the keys rows were defined by before a config could name its classes, so
    records of earlier comparisons still match."""
    from ..cli import DEFAULT_CLASSES

    plain = {}
    for key, value in flat.items():
        section, _, rest = key.partition(".")
        if section in DEFAULT_CLASSES and rest == "class_path":
            if value != DEFAULT_CLASSES[section]:
                plain[key] = value
            continue
        if section in DEFAULT_CLASSES and rest.startswith("init_args."):
            key = f"{section}.{rest.removeprefix('init_args.')}"
        plain[key] = value
    return plain


def row_definition(config: str, arguments: list[str], train: bool, start: dict | None) -> dict:
    """What defines a row, as flat ``key: value`` pairs: the full resolved config (every config file, override
    and default, less ``NOT_DEFINING``), whether it trains, and the start model's kind and SHA-256."""
    with _quiet_lightning():
        cli = build_run(["--config", config, *arguments])
    resolved = _as_plain_keys(_flatten(yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))))
    defining = {k: v for k, v in resolved.items() if not any(k == n or k.startswith(n + ".") for n in NOT_DEFINING)}
    return {**defining, "row.trained": train, "start.kind": start and start["kind"], "start.sha256": start and start["sha256"]}


def plan_rows(configs: list[str], common: list[str], base: bool, start: dict | None) -> list[Row]:
    """The comparison's rows in order: the untrained (or start) model of the first config with ``base``, then
    one per config."""
    runs = [(configs[0], START_ROW if start else BASE_ROW, "base", False)] if base else []
    stems = [Path(c).stem for c in configs]
    for index, config in enumerate(configs):
        stem = stems[index]
        # The same config twice (e.g. with different overrides in a script) still gets distinct rows and folders.
        suffix = f" ({index + 1})" if stems.count(stem) > 1 else ""
        runs.append((config, METHOD_NAMES.get(stem, stem) + suffix, stem + suffix.replace(" (", "_").rstrip(")"), True))
    rows = []
    for config, label, run_name, train in runs:
        started = start_arguments(config, common, start)
        arguments = [*common, *started]
        rows.append(Row(config, label, run_name, train, arguments, row_definition(config, arguments, train, start),
                        started[-1] if started else None))
    return rows


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_records(out_dir: Path, rows: list[Row]) -> dict[str, dict | None]:
    """Each row's record from an earlier run of this comparison (None: not run yet). A record of other inputs,
    or a run folder no record describes, is an InputError: rows of different inputs are never mixed."""
    records = {}
    for row in rows:
        path = out_dir / ROWS_FOLDER / f"{row.run_name}.json"
        run_folder = out_dir / "runs" / row.run_name
        restart = f"give another --out, or delete {path} and {run_folder} to run that row again"
        if not path.is_file():
            if run_folder.exists():
                raise InputError(f"{run_folder} holds a run that no row record in {out_dir / ROWS_FOLDER} describes "
                                 f"(written by another command, or by compare before it kept records); {restart}")
            records[row.run_name] = None
            continue
        try:
            record = json.loads(path.read_text())
            recorded = record["definition"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path} is not a row record compare wrote; {restart}") from None
        changed = sorted(k for k in set(recorded) | set(row.definition) if recorded.get(k, "(absent)") != row.definition.get(k, "(absent)"))
        if changed:
            shown = "; ".join(f"{k} was {_shown(recorded.get(k, '(absent)'))}, now {_shown(row.definition.get(k, '(absent)'))}"
                              for k in changed[:4])
            more = f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise InputError(f"--out {out_dir} holds row '{row.label}' run with other inputs ({shown}{more}); rows of "
                             f"different inputs are not mixed: rerun with the inputs it was run with, or {restart}")
        records[row.run_name] = record
    return records


def write_json(path: Path, content: dict) -> None:
    """Write ``content`` as indented JSON to ``path`` atomically."""
    # A reader, or the next run of the comparison, never sees half a file.
    with staged_file(path) as staging, open(staging, "w") as handle:
        handle.write(json.dumps(content, indent=2, default=str) + "\n")


def now_utc() -> str:
    """The time now, UTC, to the second (ISO 8601): when a row's record was written."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- Table B: post-training each starting model ---------------------------------------------------------------


def starting_models(starts: list[str]) -> dict[str, str]:
    """``NAME=MODEL`` (or ``MODEL``, named by its folder) of each start to post-train, checked before any work: a
    Hugging Face folder, a built-in model or a hub id. A checkpoint is exported first
    (``python -m rmt_lightning export``), so every start is a model ``from_pretrained`` loads as it is."""
    from ..engine.models import check_model_source

    named: dict[str, str] = {}
    for start in starts:
        name, _, model = start.rpartition("=") if "=" in start else ("", "", start)
        name = name or Path(model.rstrip("/")).name.replace(":", "-") or model
        if model.endswith(".ckpt"):
            raise InputError(f"--starts '{start}' is a checkpoint; export its policy first (python -m rmt_lightning "
                             "export CKPT OUT) and give the folder")
        check_model_source(model, f"--starts '{start}'")
        if not name.replace("-", "_").replace(".", "_").isidentifier():
            raise InputError(f"--starts '{start}': the name '{name}' names a run folder: use letters, digits, '-', '_'")
        if name in named:
            raise InputError(f"--starts names '{name}' twice; give each start its own NAME=MODEL")
        named[name] = model
    if not named:
        raise InputError("--posttrain needs at least one starting model (--starts NAME=MODEL ...)")
    return named


def plan_posttrain_rows(config: str, starts: dict[str, str], common: list[str]) -> list[Row]:
    """Two rows per starting model: its answer accuracy before post-training (``validate``) and after ``config``'s
    post-training from it, every start with the same config, data and seed."""
    rows = []
    for name, model in starts.items():
        arguments = [*common, "--model.model_name_or_path", model]
        for train, when in ((False, "before"), (True, "after")):
            rows.append(Row(config, name, f"{name}_{when}", train, arguments,
                            row_definition(config, arguments, train, None)))
    return rows
