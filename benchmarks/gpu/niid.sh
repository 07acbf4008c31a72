#!/usr/bin/env bash
# One NIID-Bench cell at the full protocol (all 50,000 training images) on the GPU machine. The data
# (137 MB of parquet) is over what one call carries (64 MiB), so it travels in three calls to one
# warm machine (its idle release is 30 s: make the calls back to back) and is gathered in /tmp:
#   here:  benchmarks/gpu/prepare.sh && benchmarks/gpu/niid.sh split [DATA]
#          -> .gpu-niid-1/ (test split), .gpu-niid-2/ and .gpu-niid-3/ (a half of the train split each)
#   there: run(command="bash benchmarks/gpu/niid.sh stage", carry=[".gpu", ".gpu-niid-1"])
#          run(command="bash benchmarks/gpu/niid.sh stage", carry=[".gpu-niid-2"])
#          run(command="bash benchmarks/gpu/niid.sh run fedavg-iid", carry=[".gpu-niid-3"], timeout_s=580)
# `run` stages what it carries, then runs `fedcifar niid-bench --cells CELLS` for at most
# NIID_TIMEOUT seconds (default 520; a full cell took 456 s on an H200); the log and the cell's
# history.json (rewritten after every round, so a cut run keeps its rounds) go to $OUT.
set -euo pipefail
STAGE=/tmp/fedcifar-niid
case "${1:-}" in
split)
    cd "$(dirname "$0")/../.."
    DATA=${2:-${FEDCIFAR_DATA:-../shared/data/cifar10}}
    rm -rf .gpu-niid-1 .gpu-niid-2 .gpu-niid-3
    mkdir -p .gpu-niid-1 .gpu-niid-2 .gpu-niid-3
    cp "$DATA/test.parquet" .gpu-niid-1/
    python - "$DATA/train.parquet" <<'PY'
import sys

import pyarrow.parquet as pq

train = pq.read_table(sys.argv[1])
half = train.num_rows // 2
# data.py reads a folder's train-*.parquet shards as one split
pq.write_table(train.slice(0, half), ".gpu-niid-2/train-1.parquet")
pq.write_table(train.slice(half), ".gpu-niid-3/train-2.parquet")
PY
    du -sh .gpu-niid-*
    ;;
stage | run)
    mkdir -p "$STAGE"
    cp -v .gpu-niid-*/*.parquet "$STAGE"/ 2>/dev/null || true
    [ -d .gpu/wheels ] || [ -x /tmp/fedcifar-venv/bin/flower-superlink ] || {
        echo "no venv yet: carry .gpu in the first call" >&2
        exit 2
    }
    # shellcheck source=benchmarks/gpu/venv.sh
    . benchmarks/gpu/venv.sh
    ls -la "$STAGE"
    [ "$1" = run ] || exit 0
    OUT=${OUT:-$PWD/gpu-out}
    mkdir -p "$OUT"
    status=0
    timeout -k 10 "${NIID_TIMEOUT:-520}" python -m fedcifar niid-bench --shared-network --cells "${2:-fedavg-iid}" --device cuda \
        --data "$STAGE" --out /tmp/niid-bench >"$OUT/niid.log" 2>&1 || status=$?
    find /tmp/niid-bench -name history.json -exec cp {} "$OUT/" \; -quit
    grep -E "round [0-9]+:" "$OUT/niid.log" | tail -n 60
    tail -n 1 "$OUT/niid.log"
    exit "$status"
    ;;
*)
    echo "usage: $0 split [DATA] | stage | run [CELLS]" >&2
    exit 2
    ;;
esac
