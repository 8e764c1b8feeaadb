"""Every YAML in configs/ parses and instantiates; the baselines differ from quickstart only in their own keys."""

from pathlib import Path

import pytest
import yaml

from rmt_lightning import RMTDataModule, RMTModule, TokenBudget
from rmt_lightning.cli import build_cli

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_configs_exist():
    names = {path.stem for path in CONFIGS}
    assert {"quickstart", "tiny", "rpt_baseline", "ntp_only", "smollm2_gsm8k", "rmt_paper"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI may create logs/ relative to the working directory
    cli = build_cli(["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                     "--trainer.precision", "32-true"], run=False)
    assert isinstance(cli.model, RMTModule)
    assert isinstance(cli.datamodule, RMTDataModule)
    # The CLI link hands the policy's name to the datamodule, which tokenizes with its tokenizer.
    assert cli.datamodule.hparams.model_name_or_path == cli.model.hparams.model_name_or_path
    assert cli.trainer.max_epochs >= 1
    raw = yaml.safe_load(path.read_text())
    assert set(raw["model"]) <= set(cli.model.hparams), "unknown model keys"


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def _differences(name):
    base = yaml.safe_load(Path(CONFIGS[0]).with_name("quickstart.yaml").read_text())
    other = yaml.safe_load(Path(CONFIGS[0]).with_name(f"{name}.yaml").read_text())
    flat_base, flat_other = _flatten(base), _flatten(other)
    keys = set(flat_base) | set(flat_other)
    return {k for k in keys if flat_base.get(k) != flat_other.get(k)}


def test_rpt_baseline_differs_only_in_budget_curriculum_and_ntp():
    assert _differences("rpt_baseline") == {
        "trainer.logger.init_args.name", "trainer.callbacks",  # the TokenBudget callback is removed
        "model.budget", "model.length_reward_weight", "model.ntp_weight", "data.curriculum",
    }
    cli_callbacks = yaml.safe_load(Path(CONFIGS[0]).with_name("rpt_baseline.yaml").read_text())["trainer"]["callbacks"]
    assert not any("TokenBudget" in c["class_path"] for c in cli_callbacks)


def test_ntp_only_differs_only_in_rl():
    assert _differences("ntp_only") == {
        "trainer.logger.init_args.name", "model.rl", "model.ntp_weight", "model.format_warmup_steps",
    }


def test_print_config_prints_every_section(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(Path(CONFIGS[0]).with_name("tiny.yaml")), "--model.lr", "0.5", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["lr"] == 0.5
    assert printed["model"]["model_name_or_path"] == "builtin:tiny-llama"
    assert "model_name_or_path" not in printed["data"]  # linked from model, so not settable twice
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
