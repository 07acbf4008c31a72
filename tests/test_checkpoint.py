"""Checkpoints: a round trip, and refusals of corrupt, incompatible or re-configured ones."""

from __future__ import annotations

import pytest
import torch

from fedcifar.config import RunConfig
from fedcifar.server.checkpoint import CheckpointError, check_same_training, load_checkpoint
from fedcifar.server.history import History
from fedcifar.task import Net, initial_model
from tests.support import checkpoint_of


def test_checkpoint_round_trip(tmp_path):
    config = RunConfig()
    checkpoint_of(1, config).save(tmp_path)
    loaded = load_checkpoint(tmp_path, Net().state_dict())
    assert loaded.round == 1 and loaded.fingerprint == config.training_fingerprint()
    assert torch.equal(loaded.model["fc3.bias"], initial_model(1).state_dict()["fc3.bias"])
    restored = History.from_dict(loaded.history)
    assert restored.rounds[0].partitions == [0, 1]
    loaded.restore_rng()
    assert load_checkpoint(tmp_path / "empty", Net().state_dict()) is None


def test_a_corrupt_checkpoint_is_refused_and_left_untouched(tmp_path):
    path = checkpoint_of(1, RunConfig()).save(tmp_path)
    truncated = path.read_bytes()[:2000]
    path.write_bytes(truncated)
    with pytest.raises(CheckpointError, match="unreadable.*left as it is"):
        load_checkpoint(tmp_path, Net().state_dict())
    assert path.read_bytes() == truncated


def test_an_incompatible_checkpoint_is_refused(tmp_path):
    checkpoint = checkpoint_of(1, RunConfig())
    checkpoint.model["fc3.weight"] = torch.zeros(5, 84)
    checkpoint.save(tmp_path)
    with pytest.raises(CheckpointError, match=r"incompatible model \(fc3.weight"):
        load_checkpoint(tmp_path, Net().state_dict())
    torch.save({"weights": 1}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a fedcifar checkpoint"):
        load_checkpoint(tmp_path, Net().state_dict())


def test_resuming_with_other_hyper_parameters_is_refused(tmp_path):
    checkpoint = checkpoint_of(1, RunConfig(learning_rate=0.01))
    check_same_training(checkpoint, RunConfig(learning_rate=0.01, num_server_rounds=9).training_fingerprint(), tmp_path)
    with pytest.raises(CheckpointError, match=r"learning-rate: 0.01 -> 0.1"):
        check_same_training(checkpoint, RunConfig(learning_rate=0.1).training_fingerprint(), tmp_path)
