"""The command line: the centralized baseline's JSON, and bad input refused before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def fedcifar(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedcifar", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_centralized_prints_json_last(mini_dir):
    done = fedcifar("centralized", "--epochs", "1", "--data", str(mini_dir), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["seconds"] >= result["train_seconds"] > 0  # the wall time includes the training
    assert result["examples"] == 500 and result["epochs"] == 1
    assert result["data"].startswith("parquet:")


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--data", "/no/such/folder"], "does not exist"),
        (["run", "-c", "learning-rate=fast"], "'learning-rate' must be a number"),
        (["run", "-c", "bogus-key=1"], "unknown run config key 'bogus-key'; the keys are: augment,"),
        (["run", "-c", "eta-l=0.1"], "Flower's name for the clients' learning rate"),
        (["run", "-c", "strategy=fedadam", "-c", "dp=server-fixed"], "would see the un-noised mean"),
        (["run", "--clients", "0"], "--clients must be >= 1"),
        (["run", "-c", "partitioner=shards"], "'partitioner' must be one of iid, dirichlet"),
        (["centralized", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["centralized", "--lr", "0"], "'learning-rate' must be a finite number > 0"),
        (["supernode", "--num-partitions", "2", "--partition-id", "2"], "partition-id must be an integer in [0, 1]"),
        (
            ["supernode", "--num-partitions", "4", "--partition-id", "1", "--partition-offset", "3"],
            "partition-id must be an integer in [0, 3]",
        ),  # slot 3 + 1 beyond the federation's 4
        (
            ["supernode", "--num-partitions", "2", "--partition-id", "0", "--split", "site"],
            "--split site needs --site-partitions",
        ),
        (
            ["supernode", "--num-partitions", "2", "--partition-id", "0", "--site", "Hospital A"],
            "site must be a DNS label",
        ),
        # a SuperLink whose APIs would open beside its proxy and the Fleet guard
        (["superlink", "--behind-proxy", "--host", "0.0.0.0"], "--behind-proxy refuses --host 0.0.0.0"),
        (["superlink", "--host=10.0.0.5", "--behind-proxy"], "--behind-proxy refuses --host 10.0.0.5"),
        (["superlink", "--fleet-api-address", "0.0.0.0:9092"], "refuses --fleet-api-address"),
        # as Flower's parser reads them: the last one wins, abbreviations count
        (["superlink", "--behind-proxy", "--host", "127.0.0.1", "--ho", "0.0.0.0"], "refuses --host 0.0.0.0"),
        (["superlink", "--control-api-address=0.0.0.0:9093"], "refuses --control-api-address"),
        (["superlink", "--fleet-max-reply-bytes", "0"], "the Fleet guard's budgets must be positive numbers"),
        (["scale", "--schedules", "fixed,warp"], "--schedules takes some of fixed, backoff, backoff-10s, busy-1s"),
        (["scale", "--nodes", "10,0"], "scale needs positive --nodes counts"),
        (["hollow", "--superlink", "x:1", "--control", "x:2", "--nodes", "0", "--insecure"], "--nodes must be >= 1"),
        (["hollow", "--superlink", "x:1", "--control", "x:2", "--nodes", "3"], "--root-certificates"),
        (
            ["hollow", "--superlink", "x:1", "--control", "x:2", "--nodes", "3", "--insecure", "--slots", "4"]
            + ["--first-slot", "2"],
            "slots 2..4 are not all among the 4 slots",
        ),
        (  # a pod of hollow nodes whose key folder lacks a slot's key
            ["hollow", "--superlink", "x:1", "--keys", "/nonexistent", "--nodes", "2", "--insecure", "--site", "h"],
            "no private key for slot 0 of site h: /nonexistent/h.slot-0.key",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(args, message, tmp_path, mini_dir):
    if args[0] == "run":
        args = [*args, "--out", str(tmp_path / "out")]
        if "--data" not in args:
            args += ["--data", str(mini_dir)]
    done = fedcifar(*args, timeout=60)
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split()), done.stderr
    assert not (tmp_path / "out" / "logs").exists()  # nothing was started


def test_the_superlink_refuses_flowers_legacy_grpc_apis():
    done = fedcifar("superlink", "--insecure", env={**os.environ, "FLWR_INTERNAL_GRPC_FLEET_API": "1"}, timeout=60)
    assert done.returncode == 2
    assert "refuses FLWR_INTERNAL_GRPC_FLEET_API: it would open Flower's legacy gRPC API" in " ".join(
        done.stderr.split()
    )
