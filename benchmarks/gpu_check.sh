#!/usr/bin/env bash
# What only a GPU shows, in one run of about 10 minutes on one H100/H200: the GPU tests (bf16-mixed under DDP,
# FSDP1 and FSDP2) and the rollout and budget-step benchmarks in bfloat16, where `generate` and the copied-cache
# path attend with PyTorch's SDPA (transformers' default) and ours with shared-prompt attention.
#
#   RMT_BENCH_OUT=<folder> bash benchmarks/gpu_check.sh      # JSON results to <folder> (default: benchmarks/results)
#
# Each part has its own time limit, so one that hangs does not take the others' time; the exit status is the
# tests'. The prepacked weights are a CPU path: on the GPU "unpacked" equals "ours".
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
timeout 300 python -m pytest -q tests/test_gpu.py
status=$?
cd benchmarks
timeout 150 python rollout.py --models builtin:smollm2-135m-instruct --contexts 256 1024 --caps 32 256 --prompts 1 \
    --repeats 3 --dtype bfloat16 --out gpu_rollout_p1_bf16
timeout 100 python rollout.py --models builtin:smollm2-135m-instruct --contexts 1024 --caps 256 --prompts 4 \
    --repeats 3 --dtype bfloat16 --out gpu_rollout_p4_bf16
timeout 150 python budget_step.py --dtype bfloat16 --out gpu_budget_step_bf16
exit $status
