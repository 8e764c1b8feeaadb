"""Every YAML in configs/ parses and instantiates; the baselines and ablations differ from rmt.yaml only in their own keys."""

import re
from pathlib import Path

import pytest
import yaml

from rmt_lightning import RMTDataModule, RMTModule, TokenBudget
from rmt_lightning.cli import build_cli

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_every_config_the_readme_and_compare_name_is_there():
    from rmt_lightning.commands.compare import DEFAULT_CONFIGS

    pages = [CONFIG_DIR.parent / "README.md", *(CONFIG_DIR.parent / "docs").glob("*.md")]
    named = {name for page in pages for name in re.findall(r"configs/[a-z0-9_/]+\.yaml", page.read_text())} | set(DEFAULT_CONFIGS)
    assert len(named) >= 9
    assert sorted(name for name in named if not (CONFIG_DIR.parent / name).is_file()) == []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI may create logs/ relative to the working directory
    cli = build_cli(["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                     "--trainer.precision", "32-true"], run=False)
    assert isinstance(cli.model, RMTModule)
    assert isinstance(cli.datamodule, RMTDataModule)
    # The CLI link hands the policy's name to the datamodule, which tokenizes with its tokenizer.
    assert cli.datamodule.hparams.model_name_or_path == cli.model.hparams.model_name_or_path
    assert cli.trainer.max_epochs >= 1 or cli.trainer.max_steps >= 1  # the schedule ends (format_sft: by steps)
    raw = yaml.safe_load(path.read_text())
    assert set(raw["model"]) <= set(cli.model.hparams), "unknown model keys"


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def _load(name):
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


def _differences(name, base="rmt"):
    flat_base, flat_other = _flatten(_load(base)), _flatten(_load(name))
    return {k for k in set(flat_base) | set(flat_other) if flat_base.get(k) != flat_other.get(k)}


def _without_token_budget(callbacks):
    return [c for c in callbacks if "TokenBudget" not in c["class_path"]]


# What each row of the paper's table changes in rmt.yaml, and nothing else (the logger name is the run's name).
NO_BUDGET = {"trainer.callbacks", "model.length_reward_weight"}
NO_CURRICULUM = {"data.curriculum"}
NO_NTP = {"model.ntp_weight"}
ROW_KEYS = {
    "rmt_no_budget": NO_BUDGET,
    "rmt_no_curriculum": NO_CURRICULUM,
    "rmt_no_ntp": NO_NTP,
    "rpt_baseline": NO_BUDGET | NO_CURRICULUM | NO_NTP,
    "ntp_only": {"model.rl", "model.ntp_weight", "model.format_warmup_steps"},
    "rmt_length_when_correct": {"model.length_reward_only_when_correct"},
}


@pytest.mark.parametrize("name", sorted(ROW_KEYS))
def test_baselines_and_ablations_differ_from_rmt_only_in_their_keys(name):
    assert _differences(name) == ROW_KEYS[name] | {"trainer.logger.init_args.name"}
    assert _load(name)["trainer"]["logger"]["init_args"]["name"] == name
    rmt, other = _load("rmt"), _load(name)
    if "trainer.callbacks" in ROW_KEYS[name]:
        # Without a budget: the TokenBudget callback is the one callback removed, and B stays at its b0.
        assert other["trainer"]["callbacks"] == _without_token_budget(rmt["trainer"]["callbacks"])
        schedule = next(c for c in rmt["trainer"]["callbacks"] if "TokenBudget" in c["class_path"])
        assert other["model"]["budget"] == schedule["init_args"]["b0"]
        assert other["model"]["length_reward_weight"] == 0.0
    if NO_CURRICULUM <= ROW_KEYS[name]:
        assert rmt["data"]["curriculum"] is True and other["data"]["curriculum"] is False
    if NO_NTP <= ROW_KEYS[name] and name != "ntp_only":  # NTP only turns lambda up, not off
        assert other["model"]["ntp_weight"] == 0.0 and rmt["model"]["ntp_weight"] > 0


def test_ntp_only_trains_next_token_prediction_alone():
    rmt, ntp = _load("rmt"), _load("ntp_only")
    assert ntp["model"]["rl"] is False and ntp["model"]["ntp_weight"] == 1.0
    assert rmt["model"]["format_warmup_steps"] > 0 and ntp["model"]["format_warmup_steps"] == 0


def test_rmt_is_the_quickstart_with_evaluation_settings():
    # The compare command's RMT row and the README's quickstart must not drift apart.
    assert _differences("quickstart") == {
        "trainer.logger.init_args.name", "trainer.accelerator", "trainer.check_val_every_n_epoch",
        "model.budget", "model.val_reasoning", "model.val_group_size", "model.val_temperature", "data.curriculum",
    }
    rmt = _load("rmt")
    assert rmt["data"]["curriculum"] is True and RMTDataModule().hparams.curriculum is True
    schedule = next(c for c in rmt["trainer"]["callbacks"] if "TokenBudget" in c["class_path"])
    assert rmt["model"]["budget"] == schedule["init_args"]["b0"]


def test_gsm8k_data_config_composes_with_a_method_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(CONFIG_DIR / "rmt.yaml"), "--config", str(CONFIG_DIR / "data" / "gsm8k.yaml"),
                     "--trainer.accelerator", "cpu"], run=False)
    data = cli.datamodule.hparams
    # What a user has: the hub dataset, its train and test splits (no path that exists only beside this project).
    assert (data.corpus, data.subset, data.split, data.val_corpus, data.val_split) == ("openai/gsm8k", "main", "train", "openai/gsm8k", "test")
    assert data.text_template == "{question}\n{answer}"
    assert data.batch_size == _load("rmt")["data"]["batch_size"]  # the method's keys are untouched
    assert cli.model.hparams.ntp_weight == _load("rmt")["model"]["ntp_weight"]


def test_print_config_prints_every_section(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(CONFIG_DIR / "tiny.yaml"), "--model.lr", "0.5", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    # The task's classes by name (a plain config is mid-training), their arguments under init_args.
    assert printed["model"]["class_path"] == "rmt_lightning.RMTModule"
    assert printed["data"]["class_path"] == "rmt_lightning.RMTDataModule"
    assert printed["model"]["init_args"]["lr"] == 0.5
    assert printed["model"]["init_args"]["model_name_or_path"] == "builtin:tiny-llama"
    assert "model_name_or_path" not in printed["data"]["init_args"]  # linked from model, so not settable twice
    assert any("TokenBudget" in c["class_path"] for c in printed["trainer"]["callbacks"])


def test_bad_choice_is_rejected_before_training():
    with pytest.raises(ValueError, match="correctness 'fuzzy'"):
        RMTModule(correctness="fuzzy")
    with pytest.raises(ValueError, match="G >= 2"):
        RMTModule(group_size=1)
    with pytest.raises(ValueError, match="gamma"):
        TokenBudget(gamma=1.5)
    with pytest.raises(ValueError, match="b_min"):
        TokenBudget(b0=4, b_min=8)


@pytest.mark.parametrize(("name", "minutes"), [("rmt", 5), ("quickstart", 5), ("rmt_paper", 30)])
def test_long_run_configs_checkpoint_periodically_and_on_preemption(name, minutes, tmp_path, monkeypatch):
    from rmt_lightning import PeriodicCheckpoint, PreemptionCheckpoint

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(CONFIG_DIR / f"{name}.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                     "--trainer.precision", "32-true"], run=False)
    [periodic] = [c for c in cli.trainer.callbacks if isinstance(c, PeriodicCheckpoint)]
    assert periodic.every_minutes == minutes and periodic.keep_last == 2
    # The CLI adds the preemption checkpoint to every run, whatever the config.
    [preemption] = [c for c in cli.trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
    assert preemption.signals == ["SIGTERM", "SIGINT", "SIGUSR1"]


def test_no_shipped_config_names_a_path_outside_the_project():
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        assert "../" not in path.read_text(), path


def test_the_front_door_lists_every_command_and_each_one_parses(capsys):
    """``python -m rmt_lightning --help`` names the program as typed and every command with one line; every
    LightningCLI command it lists parses (predict, which an RMT model has no meaning for, is not offered)."""
    from rmt_lightning.__main__ import COMMANDS, main

    main(["--help"])
    printed = capsys.readouterr().out
    assert printed.startswith("usage: python -m rmt_lightning COMMAND")
    for command in ("fit", "validate", "test", "score", "compare", "export"):
        assert re.search(rf"^  {command} +\S", printed, re.MULTILINE), command
    for command in set(COMMANDS) - {"compare", "export"}:
        with pytest.raises(SystemExit) as ended:
            build_cli([command, "--config", str(CONFIG_DIR / "tiny.yaml"), "--print_config"])
        assert ended.value.code in (0, None)
        capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        build_cli(["predict", "--config", str(CONFIG_DIR / "tiny.yaml")])
    assert ended.value.code == 2 and "invalid choice: 'predict'" in capsys.readouterr().err


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m rmt_lightning fit|validate|test|score`` command in a bash block of README.md and the
    reference pages of docs/ (results.md is the dated record of runs, with placeholders) that names a config:
    (where, its arguments). A quoted argument may run over several lines."""
    import shlex

    found = []
    pages = [CONFIG_DIR.parent / "README.md", *sorted((CONFIG_DIR.parent / "docs").glob("*.md"))]
    for path in [page for page in pages if page.name != "results.md"]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.DOTALL):
            pending = ""
            for line in block.replace("\\\n", " ").splitlines():
                pending = f"{pending}\n{line}" if pending else line
                command = re.search(r"-m rmt_lightning ((?:fit|validate|test|score) .*)", pending, re.DOTALL)
                if not command:
                    pending = ""
                    continue
                try:
                    # Bash's $'...' quoting (a newline inside a template) reads as plain quotes here.
                    words = shlex.split(command.group(1).replace("$'", "'"), comments=True)
                except ValueError:  # a quote still open: the argument goes on on the next line
                    continue
                if "configs/" in pending:
                    found.append((f"{path.name}: {' '.join(words)[:80]}", words))
                pending = ""
    return found


@pytest.mark.parametrize(("where", "words"), documented_commands(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_documented_command_parses_as_written(where, words, monkeypatch, capsys):
    monkeypatch.chdir(CONFIG_DIR.parent)  # the docs name configs relative to the repository root
    with pytest.raises(SystemExit) as ended:
        build_cli([*words, "--print_config"])
    assert ended.value.code in (0, None), capsys.readouterr().err[-2000:]
