"""`fedcifar bench` end to end on the small real sample: stock Flower, fedcifar and centralized."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_bench_reports_every_figure(tmp_path, mini_dir):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedcifar",
            "bench",
            "--clients",
            "2",
            "--rounds",
            "2",
            "--examples-per-client",
            "100",
            "--test-examples",
            "100",
            "--data",
            str(mini_dir),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in (
        "stock_round_seconds",
        "fedcifar_round_seconds",
        "round_speedup",
        "fixed_overhead_seconds",
        "client_images_per_second",
        "centralized_images_per_second",
        "throughput_ratio",
        "stock_client_images_per_second",
        "data_path_speedup",
        "client_peak_rss_bytes",
        "bytes_per_round",
        "stock_accuracy",
        "fedcifar_accuracy",
        "centralized_accuracy",
    ):
        assert key in result, key
    assert result["fedcifar_round_seconds"] > result["fixed_overhead_seconds"] > 0
    # where the fixed overhead goes: its parts add up to it; the server's evaluation (beside the next
    # round, outside the overhead) took time
    parts = ("overhead_transport_seconds", "overhead_other_seconds")
    assert sum(result[p] for p in parts) == pytest.approx(result["fixed_overhead_seconds"])
    assert result["overhead_transport_seconds"] > 0 and result["server_evaluate_seconds"] > 0
    assert result["bytes_per_round"] > 4 * 62_006  # the model travels both ways for both clients
    assert result["client_peak_rss_by_process"]["fedcifar trainer"] > 0
    # both federations really ran their rounds
    for app in ("stock", "fedcifar"):
        history = json.loads((tmp_path / app / "history.json").read_text())
        assert [r["round"] for r in history["rounds"]] == [1, 2] and history["status"] == "completed"
        assert result[f"{app}_accuracy"] == history["rounds"][-1]["eval_accuracy"]  # the figures are the runs' own
        assert result[f"{app}_round_seconds"] == history["rounds"][1]["round_seconds"]  # round 1 left out
