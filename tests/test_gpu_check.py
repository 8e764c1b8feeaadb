"""benchmarks/gpu_check.sh end to end on the CPU (``--smoke``): the same script and parts as on a GPU, with tiny
models, so a GPU run, whose device time is scarce, does not find a broken part first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ["environment", "models", "tests", "rollout", "budget_step", "entropy", "score", "rollout_1p5b"]
# What a GPU machine sends back is limited to 8 files: the check writes 8.
FILES = {"gpu_check.json", "gpu_check.log", "gpu_tests.json", "gpu_rollout_smollm2.json", "gpu_rollout_qwen2_1p5b.json",
         "gpu_budget_step.json", "gpu_entropy.json", "gpu_score.json"}


def test_smoke_run_writes_every_part(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "RMT_BENCH_OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(SCRIPT), "--smoke"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert {path.name for path in out.iterdir()} == FILES

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "smoke"
    assert [p["part"] for p in report["parts"]] == PARTS
    assert all(p["status"] == "ok" and p["seconds"] <= p["budget_s"] for p in report["parts"]), report["parts"]
    assert report["environment"]["versions"]["torch"] == torch.__version__
    assert [m["model"] for m in report["models"]] == ["smollm2-135m", "qwen2-1.5b"]
    assert all(m["parameters"] > 0 for m in report["models"])

    tests = json.loads((out / "gpu_tests.json").read_text())
    assert tests["complete"] and sum(tests["counts"].values()) == len(tests["tests"]) >= 4
    if not torch.cuda.is_available():
        assert set(tests["counts"]) == {"skipped"}

    for name in ("gpu_rollout_smollm2", "gpu_rollout_qwen2_1p5b"):
        rollout = json.loads((out / f"{name}.json").read_text())
        assert rollout["complete"] and rollout["rows"]
        for row in rollout["rows"]:
            assert row["ratio"] > 0 and row["ours_tok_s"] > 0 and row["generate_tok_s"] > 0 and row["copied_ratio"] > 0
            assert "unpacked_tok_s" not in row and "generate_packed_tok_s" not in row

    budget = json.loads((out / "gpu_budget_step.json").read_text())
    assert budget["complete"]
    assert {row["row"]: row["budget"] for row in budget["rows"]} == {"RPT, B=B_0": 4, "RMT, final B": 2}
    assert all(row["step_s"] > 0 and row["ratio"] > 0 for row in budget["rows"])

    entropy = json.loads((out / "gpu_entropy.json").read_text())
    assert entropy["complete"] and len(entropy["rows"]) == 2
    assert all(row["ours_tok_s"] > 0 and row["bare_tok_s"] > 0 for row in entropy["rows"])
    scored = json.loads((out / "gpu_score.json").read_text())
    assert scored["complete"] and scored["rows"][0]["shards"] > 1 and scored["rows"][0]["score_tok_s"] > 0

    log = (out / "gpu_check.log").read_text()
    assert "every part succeeded" in log


def test_unknown_argument_is_refused():
    result = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "usage: bash benchmarks/gpu_check.sh [--smoke]" in result.stderr
