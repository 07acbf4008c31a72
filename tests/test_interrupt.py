"""Ctrl-C during a local federation stops every process it started, and nothing is left behind."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.support import as_foreground_job, processes_in, wait

pytestmark = pytest.mark.integration


def test_ctrl_c_mid_run_stops_everything(tmp_path, mini_dir):
    out = tmp_path / "run"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedcifar",
            "run",
            "--clients",
            "2",
            "--rounds",
            "50",
            "--data",
            str(mini_dir),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_foreground_job,
    )

    def started() -> bool:
        if (out / "history.json").exists():  # the run is under way: the ServerApp wrote round 0
            return True
        assert run.poll() is None, run.communicate()[1]
        return False

    wait("the run to start", started, 180, interval=0.2)
    assert len(processes_in(out)) >= 7  # superlink + 2 supernodes, their Flower children, trainers
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    assert "interrupted" in stderr
    assert processes_in(out) == []
