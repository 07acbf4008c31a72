"""Run configuration: pyproject defaults, type and range checks, -c parsing, partition checks."""

from __future__ import annotations

import dataclasses

import pytest

from fedcifar.config import ConfigError, RunConfig, app_defaults, check_partition, parse_overrides
from tests.conftest import ROOT


def test_pyproject_defaults_are_the_dataclass_defaults():
    defaults = app_defaults(ROOT)
    assert RunConfig.from_flower(defaults) == RunConfig()
    assert set(defaults) == {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}


def test_overrides_are_typed_and_checked():
    config = RunConfig.from_flower({"learning-rate": 1, "partitioner": "dirichlet", "local-epochs": 3})
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert (config.partitioner, config.local_epochs) == ("dirichlet", 3)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"learning-rate": "fast"}, "'learning-rate' must be a number"),
        ({"batch-size": 3.5}, "'batch-size' must be an integer"),
        ({"local-epochs": True}, "'local-epochs' must be an integer"),
        ({"num-server-rounds": 0}, "'num-server-rounds' must be >= 1"),
        ({"learning-rate": -0.1}, "'learning-rate' must be a finite number > 0"),
        ({"fraction-train": 0.0}, "fraction-train must be in (0, 1]"),
        ({"momentum": 1.0}, "momentum must be in [0, 1)"),
        ({"partitioner": "shards"}, "'partitioner' must be one of iid, dirichlet"),
        ({"device": "tpu"}, "'device' must be one of auto, cpu, cuda"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(values, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower(values)
    assert message in str(err.value)


def test_parse_overrides_reads_toml_values_and_bare_words():
    parsed = parse_overrides(["learning-rate=0.05 local-epochs=2", 'partitioner="dirichlet"', "device=cpu"])
    assert parsed == {"learning-rate": 0.05, "local-epochs": 2, "partitioner": "dirichlet", "device": "cpu"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["learning-rate"])


@pytest.mark.parametrize("pid, n", [(0, 1), (1, 2), (15, 16)])
def test_valid_partitions(pid, n):
    check_partition(pid, n)


@pytest.mark.parametrize(
    "pid, n, message",
    [
        (2, 2, r"partition-id must be an integer in \[0, 1\] for num-partitions=2, got 2"),
        (-1, 3, r"partition-id must be an integer in \[0, 2\]"),
        (0, 0, "num-partitions must be an integer >= 1, got 0"),
        (0, -4, "num-partitions must be an integer >= 1"),
        ("0", 2, "partition-id must be an integer"),
    ],
)
def test_invalid_partitions(pid, n, message):
    with pytest.raises(ConfigError, match=message):
        check_partition(pid, n)
