#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh needs on a GPU machine that has PyTorch but no network and not all of this
# project's requirements. Run it where the project is installed and PyPI is reachable:
#
#   bash benchmarks/gpu_prepare.sh
#
# Writes two ignored folders, which the GPU run carries along with the working tree:
#   .whl/         the wheels the GPU image lacks, for CPython 3.12 on x86-64 Linux, at the versions installed here
#                 (the versions the tests ran with);
#   .gpu_assets/  SmolLM2-135M's tokenizer and config, and a Qwen2-1.5B-shaped config (benchmarks/gpu_models.py).
# Every requirement of the carried wheels is checked against what they carry and what the image holds; the two
# folders must stay well under the 64 MiB a GPU run may carry, working tree included.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT_MB=55

# What transformers >= 5.24 (the image has 5.17) and huggingface_hub 2 need beyond the image, what jsonargparse
# needs for LightningCLI's signatures, and datasets with its pure-Python needs. anyio, idna, h11, tqdm and fsspec
# are in the image at versions nobody has read there, below the minimums of the wheels carried with them for all
# anyone knows: their wheels are small, so they travel at the versions tested here.
PACKAGES=(transformers huggingface_hub httpx2 httpcore2 truststore anyio idna h11 kernels tomlkit tqdm regex
          jsonargparse docstring_parser typeshed_client datasets dill multiprocess fsspec)

# The Python packages of the GPU machines' image ('cuda', as read on 2026-11-17). A requirement that neither this
# list nor the wheels hold stops the preparation; versions are checked on the GPU machine by gpu_check.sh.
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

specs=$("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

missing, specs = [], []
for name in sys.argv[1:]:
    try:
        specs.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"not installed here: {missing}; install the project first (pip install -e .)")
print(" ".join(specs))
EOF
)
echo "== wheels: $specs"
rm -rf .whl
# shellcheck disable=SC2086  # one argument per requirement
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $specs

IMAGE="$IMAGE" "$PY" - .whl <<'EOF'
import os
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The GPU machine's interpreter: CPython 3.12 on x86-64 Linux.
target = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
          "platform_python_implementation": "CPython"}
image = {canonicalize_name(n) for n in os.environ["IMAGE"].split()}
carried, needs = {}, {}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = canonicalize_name(wheel.name.split("-")[0])
    if name in carried:
        sys.exit(f"two wheels of {name}: {carried[name]} and {wheel.name}; keep one")
    carried[name] = wheel.name
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines = archive.read(metadata).decode().splitlines()
    extras = {"signatures"} if name == "jsonargparse" else set()  # LightningCLI needs jsonargparse[signatures]
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        wanted = requirement.marker is None or any(requirement.marker.evaluate({**target, "extra": e}) for e in extras | {""})
        if wanted:
            needs.setdefault(canonicalize_name(requirement.name), []).append(f"{name}: {requirement}")
lacking = {n: why for n, why in needs.items() if n not in carried and n not in image}
from_image = sorted(n for n in needs if n not in carried)
print(f"{len(carried)} wheels; taken from the image: {', '.join(from_image)}")
if lacking:
    sys.exit(f"required by the wheels but neither carried nor in the GPU image: {lacking}")
EOF

echo "== assets"
rm -rf .gpu_assets
"$PY" benchmarks/gpu_models.py assets .gpu_assets
du -sh .whl .gpu_assets
total_mb=$(du -smc .whl .gpu_assets | tail -1 | cut -f1)
echo "together: ${total_mb} MiB (limit ${LIMIT_MB})"
if (( total_mb > LIMIT_MB )); then
    echo "error: .whl and .gpu_assets take ${total_mb} MiB; the GPU run carries 64 MiB with the working tree" >&2
    exit 1
fi
echo "Now, on the GPU machine (carrying .whl and .gpu_assets): bash benchmarks/gpu_check.sh"
