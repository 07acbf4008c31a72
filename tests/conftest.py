"""Shared fixtures: the small real CIFAR-10 sample kept in the repo, and the full copy beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "tests" / "data" / "cifar10-mini"  # 500 train + 200 test real images, 10 classes


@pytest.fixture(scope="session")
def mini_dir() -> Path:
    return MINI


@pytest.fixture(autouse=True)
def _no_ambient_data(monkeypatch):
    """Tests choose their data explicitly; a developer's FEDCIFAR_DATA must not leak in."""
    monkeypatch.delenv("FEDCIFAR_DATA", raising=False)
