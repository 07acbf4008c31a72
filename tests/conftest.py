"""Shared fixtures: the small real CIFAR-10 sample kept in the repo, and the full copy beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "tests" / "data" / "cifar10-mini"  # 500 train + 200 test real images, 10 classes


@pytest.fixture(scope="session")
def mini_dir() -> Path:
    return MINI


@pytest.fixture(autouse=True)
def _no_ambient_data(monkeypatch):
    """Tests choose their data explicitly; a developer's FEDCIFAR_DATA must not leak in."""
    monkeypatch.delenv("FEDCIFAR_DATA", raising=False)


@pytest.fixture
def task_identity():
    """Messages take their run id from the process's task identity, as inside a ServerApp."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
