#!/usr/bin/env bash
# Run on the GPU machine (benchmarks/gpu/prepare.sh first, here), in the project's root, e.g. with
# the device tool: run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=600).
# Installs the carried wheels into a venv layered over the image's PyTorch, then runs
# `fedcifar bench` twice: 2 clients sharing the GPU, with the stock baseline and the centralized
# loop (throughput_ratio, data_path_speedup, round_speedup), and 1 client alone on it. Logs and
# the JSON lines go to $OUT (or ./gpu-out). Extra arguments replace the bench's sizes (local checks).
# (--shared-network: the lent machine is ours alone, and a container there may refuse user namespaces.)
set -euo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
# shellcheck source=benchmarks/gpu/venv.sh
. benchmarks/gpu/venv.sh

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
    nproc
    python -c 'import torch, flwr; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "flwr", flwr.__version__)'
} 2>&1 | tee "$OUT/machine.txt"

SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(--examples-per-client 6000 --local-epochs 10 --rounds 3 --test-examples 1000)
bench() {  # a failed or hung bench is reported and the next one still runs (device time is scarce)
    local name=$1
    shift
    if timeout -k 20 "${BENCH_TIMEOUT:-270}" python -m fedcifar bench --shared-network --data .gpu/data --out "/tmp/bench-$name" "$@" 2>&1 | tee "$OUT/bench-$name.log"; then
        tail -n 1 "$OUT/bench-$name.log" >"$OUT/bench-$name.json"
    else
        echo "bench $name FAILED (log: $OUT/bench-$name.log)"
    fi
}
bench two-clients --device cuda --batch-size 512 --clients 2 "${SIZES[@]}"
bench one-client --device cuda --batch-size 512 --clients 1 --no-stock "${SIZES[@]}"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

keys = ("device", "round_speedup", "fixed_overhead_seconds", "client_images_per_second",
        "centralized_images_per_second", "throughput_ratio", "stock_client_images_per_second",
        "data_path_speedup", "client_peak_rss_bytes", "fedcifar_accuracy", "centralized_accuracy")
for name in ("two-clients", "one-client"):
    path = Path(sys.argv[1]) / f"bench-{name}.json"
    if not path.exists():
        print(name, "FAILED")
        continue
    result = json.loads(path.read_text())
    print(name, {k: round(result[k], 3) if isinstance(result[k], float) else result[k] for k in keys if k in result})
PY
