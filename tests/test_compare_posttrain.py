"""Table B by one command: ``compare --posttrain CONFIG --starts NAME=MODEL ...`` evaluates each start, post-trains
it with the same config and seed, evaluates it again, and tabulates answer accuracy before and after with
intervals; a second run keeps the finished rows; bad starts stop it before any work."""

import json
import shutil
from pathlib import Path

import pytest

from rmt_lightning.commands.compare import TableB, compare
from rmt_lightning.engine.models import BUILTIN_TINY, build_builtin_tiny
from rmt_lightning.runtime.errors import InputError

pytest.importorskip("math_verify")

BUILTIN = str(Path(__file__).resolve().parents[1] / "configs" / "posttrain" / "builtin.yaml")
TINY_RUN = ["--model.max_response_length", "4", "--model.group_size", "2", "--trainer.max_steps", "2",
            "--data.embedded_questions", "32", "--data.val_questions", "6", "--data.batch_size", "2",
            "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("table_b")
    copy = folder / "tiny-copy"
    shutil.copytree(build_builtin_tiny(), copy)
    starts = [f"base={BUILTIN_TINY}", f"copy={copy}"]
    result = compare([], folder / "out", TINY_RUN, table_b=TableB(BUILTIN, tuple(starts)))
    return folder, starts, result


def test_each_start_is_evaluated_before_and_after_the_same_post_training(table):
    folder, _, result = table
    rows = result["rows"]
    assert [(r["method"], r["trained"]) for r in rows] == [("base", False), ("base", True), ("copy", False), ("copy", True)]
    assert all(r["scored_by"] == "answer" and r["questions"] == 6 for r in rows)
    assert [r["steps"] for r in rows if r["trained"]] == [2, 2]
    assert rows[2]["model"] == str(folder / "tiny-copy")
    for row in rows:
        low, high = row["answer_acc_interval"]
        assert low <= row["answer_acc"] <= high
    markdown = (folder / "out" / "comparison.md").read_text()
    assert "before: answer acc" in markdown and "| base |" in markdown and "| copy |" in markdown
    assert json.loads((folder / "out" / "comparison.json").read_text())["table"] == "posttrain"
    for picture in ("comparison.png", "curves.png"):
        assert (folder / "out" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_keeps_the_finished_rows(table, capsys):
    folder, starts, first = table
    again = compare([], folder / "out", TINY_RUN, table_b=TableB(BUILTIN, tuple(starts)))
    assert [r["log_dir"] for r in again["rows"]] == [r["log_dir"] for r in first["rows"]]
    assert capsys.readouterr().err.count(": kept, finished") == 4


@pytest.mark.parametrize("starts, message", [
    ([], "at least one starting model"),
    (["missing=/no/such/folder"], "does not exist"),
    (["a=x.ckpt"], "export its policy first"),
    ([f"a={BUILTIN_TINY}", f"a={BUILTIN_TINY}"], "names 'a' twice"),
])
def test_bad_starts_stop_before_any_work(starts, message, tmp_path):
    with pytest.raises(InputError, match=message):
        compare([], tmp_path / "out", TINY_RUN, table_b=TableB(BUILTIN, tuple(starts)))
    assert not (tmp_path / "out" / "runs").exists()


def test_the_command_line_gives_table_b_its_config_and_starts(monkeypatch):
    import rmt_lightning.commands.compare as compare_module
    from rmt_lightning.__main__ import main

    calls = []
    monkeypatch.setattr(compare_module, "compare", lambda *args, **kwargs: calls.append(kwargs["table_b"]))
    main(["compare", "--posttrain", "p.yaml", "--starts", "base=builtin:tiny-llama", "rmt=logs/x/hf_export"])
    assert calls == [TableB("p.yaml", ("base=builtin:tiny-llama", "rmt=logs/x/hf_export"))]
