"""A run-config key in one place: ``RunConfig`` (``fedcifar/config.py``) defines it; the chart's table of
keys is generated from it (``scripts/chart_run_config.py``), and values.yaml, its schema, the chart's
rendered run config and the README's table are held to it here."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from fedcifar import config
from fedcifar.config import RunConfig, chart_values
from fedcifar.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "fedcifar"
DEFAULTS = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
# where the chart's default is its own, on purpose
CHART_DEFAULTS = {"resume": True}  # a retry of the run Job continues from the checkpoint
ENUMS = {
    "partitioner": config.PARTITIONERS,
    "device": config.DEVICES,
    "strategy": tuple(STRATEGIES),
    "dp": config.DP_MODES,
    "augment-padding": config.PADDINGS,
}


def test_the_charts_table_of_keys_is_generated_from_the_run_config():
    done = subprocess.run(
        [sys.executable, "scripts/chart_run_config.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_key_but_out_dir_is_a_chart_value_by_the_rule():
    assert [key for _, key, _ in chart_values()] == [k for k in DEFAULTS if k not in config.CHART_SETS_ITSELF]
    named = {key: value for value, key, _ in chart_values()}
    assert named["beta-1"] == "beta1" and named["dp-delta"] == "dpDelta" and named["num-server-rounds"] == "rounds"


def test_values_yaml_holds_every_key_with_the_run_configs_default():
    run = yaml.safe_load((CHART / "values.yaml").read_text())["run"]
    for value, key, kind in chart_values():
        assert value in run, f"values.yaml has no run.{value} (run-config {key})"
        if kind == "computed":
            assert run[value] is None  # computed from the release's shape unless set
        else:
            assert run[value] == CHART_DEFAULTS.get(key, DEFAULTS[key]), (value, run[value], DEFAULTS[key])


def test_the_schema_types_every_key_as_the_run_config_does():
    properties = json.loads((CHART / "values.schema.json").read_text())["properties"]["run"]["properties"]
    for value, key, kind in chart_values():
        schema = properties[value]
        options = [schema] if "type" in schema else schema["anyOf"]
        types = {tuple(o["type"]) if isinstance(o.get("type"), list) else o.get("type") for o in options}
        expected = {
            "int": {"integer"},
            "float": {"number", None},  # or a numeric string (helm --set), by reference
            "bool": {"boolean"},
            "str": {"string"},
            "computed": {("integer", "null")},
        }[kind]
        assert types == expected, (value, schema)
        if key in ENUMS:
            assert tuple(schema["enum"]) == ENUMS[key], value


@pytest.mark.skipif(not shutil.which("helm"), reason="needs helm")
def test_the_chart_renders_every_key_and_the_run_config_accepts_it():
    rendered = subprocess.run(
        ["helm", "template", "r", str(CHART), "--show-only", "templates/run-job.yaml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    args = yaml.safe_load(rendered)["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = args[args.index("--run-config") + 1]
    parsed = tomllib.loads(pairs.replace(" ", "\n"))
    assert list(parsed) == [key for _, key, _ in chart_values()] + ["out-dir"]
    chart = RunConfig.from_flower(parsed)  # every value checked as the ServerApp checks it
    expected = {**DEFAULTS, **CHART_DEFAULTS, "num-partitions": 2, "min-nodes": 2, "out-dir": parsed["out-dir"]}
    assert {k: chart.value(k) for k in DEFAULTS} == expected


def test_the_readmes_configuration_names_every_key_with_its_default():
    """Its tables: the keys (a row each), the strategies' and the DP modes' parameters (`key` (default))."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration") :].split("\n## ", 1)[0]
    keys_table = section[section.index("| key | default | meaning |") :].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| ([^|]+?) \| ", keys_table, flags=re.M)
    parameters = re.findall(r"`([a-z0-9-]+)` \(([-+0-9.e]+)[:)]", section)
    named = {key: default.strip().strip("`") for key, default in rows + parameters if key in DEFAULTS}
    assert sorted(named) == sorted(DEFAULTS), sorted(set(DEFAULTS) - set(named))
    for key, default in named.items():
        assert tomllib.loads(f"v = {default}")["v"] == DEFAULTS[key], key
