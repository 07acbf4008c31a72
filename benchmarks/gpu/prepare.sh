#!/usr/bin/env bash
# Run here, in the project's virtual environment, before a GPU session: gathers into .gpu/
# (git-ignored, under 64 MiB so that it travels in one call) what benchmarks/gpu/run.sh needs on
# a GPU machine that has PyTorch but no internet:
#   .gpu/wheels/  every package of this venv that the GPU image lacks or holds in another
#                 version (Flower, flwr-datasets, datasets, protobuf, grpcio, ...), for CPython 3.12
#   .gpu/data/    the first TRAIN train images and TEST test images of CIFAR-10 (parquet)
# Usage: benchmarks/gpu/prepare.sh [DATA_DIR] (default $FEDCIFAR_DATA or ../shared/data/cifar10)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-${FEDCIFAR_DATA:-../shared/data/cifar10}}
TRAIN=${TRAIN:-12000}
TEST=${TEST:-1000}
PY=${PY_VERSION:-3.12}  # the GPU image's Python
python -c 'import fedcifar, flwr' 2>/dev/null || {
    echo "prepare.sh carries this venv's packages: activate the project's venv first (. .venv/bin/activate)" >&2
    exit 2
}

# What the GPU image brings at a version that works (torch with CUDA, the scientific stack, the
# HTTP clients, Hugging Face's hub: see the device tool's KINDS.md) or what run.sh does not need
# (tests, cluster clients, uv: the SuperLink installs no run dependencies). Everything else, Flower
# and the versions it pins (grpcio, protobuf, typer, rich, ...) included, is carried at the version
# this venv resolved.
PROVIDED='torch|scipy|ruff|numpy|pandas|pyarrow|matplotlib|contourpy|kiwisolver|fonttools|pillow|pyparsing|cycler|python-dateutil|six|seaborn|sympy|mpmath|networkx|tzdata|jinja2|markupsafe|pygments|markdown-it-py|mdurl|pyyaml|filelock|tqdm|xxhash|certifi|idna|urllib3|requests|charset-normalizer|anyio|h11|httpcore|httpx|packaging|typing-extensions|shellingham|huggingface-hub|hf-xet|aiohttp|aiohappyeyeballs|aiosignal|attrs|frozenlist|multidict|propcache|yarl|uvloop|uv|py-spy|pytest|iniconfig|pluggy|kubernetes|kubernetes-validate|durationpy|oauthlib|requests-oauthlib|websocket-client|jsonschema|jsonschema-specifications|referencing|rpds-py|importlib-resources'

rm -rf .gpu
mkdir -p .gpu/wheels
# fedcifar's own dependencies, transitively, as this venv resolved them (never the test or tracking
# extras: MLflow's server alone is larger than the 64 MiB a call carries)
python - <<'PY' | grep -vE "^($PROVIDED)==" >.gpu/requirements.txt
import re
from importlib.metadata import PackageNotFoundError, distribution, requires

def name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()

def needed(requirement: str) -> bool:  # no extra's requirement, unless it is flwr[dp]'s
    marker = requirement.partition(";")[2]
    return "extra" not in marker or '"dp"' in marker

seen, todo = set(), [name(r) for r in requires("fedcifar") if needed(r)]
while todo:
    if (package := todo.pop()) in seen:
        continue
    seen.add(package)
    try:
        todo += [name(r) for r in distribution(package).requires or [] if needed(r)]
    except PackageNotFoundError:
        continue
for package in sorted(seen):
    try:
        print(f"{package}=={distribution(package).version}")
    except PackageNotFoundError:
        pass
PY
python -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PY" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d .gpu/wheels -r .gpu/requirements.txt

python - "$DATA" "$TRAIN" "$TEST" <<'PY'
import sys
from pathlib import Path

from fedcifar.experiments.harness import make_subset

make_subset(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(".gpu/data"))
PY
du -sh .gpu/wheels .gpu/data
size=$(du -sm .gpu | cut -f1)
if [ "$size" -ge 64 ]; then
    echo "prepare.sh: .gpu holds ${size} MiB, over the 64 MiB one call to the GPU machine carries: leave out what the GPU image provides (PROVIDED above) or lower TRAIN/TEST" >&2
    exit 1
fi
echo "== .gpu: ${size} MiB (a call carries 64 MiB)"
