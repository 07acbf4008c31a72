#!/usr/bin/env bash
# What a user sees after tracking two runs: FedAvg and FedProx, 2 local SuperNodes, real CIFAR-10,
# each `fedcifar run --mlflow` (the local store), then `mlflow ui` in that folder and MLflow's own
# "compare runs" page, rendered by headless Chromium into compare-runs.png beside this script.
#   usage: benchmarks/mlflow_ui/compare.sh CIFAR10_DIR [ROUNDS]
# Needs the README's venv and a Chromium (Debian: apt-get install chromium).
set -euo pipefail
data=$(realpath "${1:?usage: compare.sh CIFAR10_DIR [ROUNDS]}")
rounds=${2:-3}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
cd "$work"
echo "== runs in $work"
fedcifar run --clients 2 --rounds "$rounds" --data "$data" --mlflow --out fedavg
fedcifar run --clients 2 --rounds "$rounds" --data "$data" --mlflow --out fedprox \
  -c strategy=fedprox -c proximal-mu=0.1

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mlflow ui --host 127.0.0.1 --port "$port" --workers 1 >ui.log 2>&1 &
ui=$!
trap 'kill $ui 2>/dev/null || true' EXIT
curl -sf --retry 60 --retry-connrefused --retry-delay 1 "http://127.0.0.1:$port/health" >/dev/null   # fails if it never comes up

# the page's query names the two runs and their experiment, as the UI's own "Compare" button does
query=$(python - <<'EOF'
import json, urllib.parse
runs = [json.load(open(f"{name}/mlflow-run.json")) for name in ("fedavg", "fedprox")]
print(urllib.parse.urlencode({
    "runs": json.dumps([r["run_id"] for r in runs]),
    "experiments": json.dumps(sorted({r["experiment_id"] for r in runs})),
}))
EOF
)
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1500 \
  --virtual-time-budget=30000 --screenshot="$here/compare-runs.png" \
  "http://127.0.0.1:$port/#/compare-runs?$query" 2>/dev/null
echo "== $here/compare-runs.png"
