#!/usr/bin/env bash
# Every benchmark, then the summary table: bash benchmarks/run_all.sh [--threads N]
# The RL-step comparison needs TRL: pip install -e ".[bench]". Arguments are passed to every benchmark
# (only the common ones make sense: --threads, --seed). Results: benchmarks/results/*.json and summary.md.
set -euo pipefail
cd "$(dirname "$0")"
for bench in rollout entropy budget_step rl_step checkpoint_cost; do
    echo "== $bench"
    python "$bench.py" "$@"
done
# The rollout at the batch RMT trains with (4 prompts of G 8), where the prompts' keys and values are the larger read.
python rollout.py --models builtin:smollm2-135m-instruct --contexts 256 1024 --caps 256 --prompts 4 --repeats 1 \
    --out rollout_p4 "$@"
python profile_step.py --tag after "$@"
python summary.py
