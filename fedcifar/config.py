"""The run configuration: the typed, checked form of ``[tool.flwr.app.config]``.

Flower hands the ServerApp and ClientApp a flat dict of kebab-case keys (pyproject defaults
merged with ``flwr run -c key=value`` overrides). ``RunConfig.from_flower`` turns it into
a dataclass and refuses values of the wrong type or range with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedcifar.strategies import STRATEGIES

DEVICES = ("auto", "cpu", "cuda")
# dirichlet-balanced: NIID-Bench's split (self-balancing: a client stops drawing once it holds its share)
PARTITIONERS = ("iid", "dirichlet", "dirichlet-balanced")
PADDINGS = ("zeros", "reflect")  # what ``augment`` crops from
NODE_DATA_SPLITS = ("global", "site")  # what a node slot trains: its slice of the whole data, or of its site's
# differential privacy: Flower's central-DP wrappers (clipping on the server or, through the ClientApp's
# mods, on the clients) or its LocalDpMod (each client noises its own update)
DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive", "local")
CENTRAL_DP = ("server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
# Flower's names for what fedcifar calls learning-rate: one value, one key
CLIENT_LEARNING_RATE_ALIASES = ("eta-l", "client-learning-rate")
SITE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS label, like a Helm release name

# The chart: every run-config key is a chart value of its own, run.<the key in camelCase> (``beta-1``:
# ``run.beta1``), but for the keys below; run.extraConfig is for other apps' keys. The chart's table of
# them (``templates/_runconfig_keys.tpl``) is written from here by ``scripts/chart_run_config.py``;
# ``tests/test_run_config_keys.py`` holds values.yaml, its schema and both READMEs to it.
CHART_VALUE_NAMES = {"num-server-rounds": "rounds"}  # named before the rule
CHART_COMPUTED = ("min-nodes", "num-partitions")  # from run.minNodes, run.numPartitions and the release's shape
CHART_SETS_ITSELF = ("out-dir",)  # per revision, on the SuperLink's state volume (run.extraConfig may override)


class ConfigError(ValueError):
    """A run-config value is wrong; the message names the key and how to set it."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    augment: bool = False
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_nodes: int = 2
    num_partitions: int = 0
    round_timeout: float = 3600.0
    round_retries: int = 2
    seed: int = 42
    device: str = "auto"
    out_dir: str = ""
    resume: bool = False
    strategy: str = "fedavg"
    trim_beta: float = 0.2  # fedtrimmedavg: the fraction cut at each end
    num_malicious_nodes: int = 0  # krum, multikrum, bulyan: the f they tolerate
    num_nodes_to_select: int = 1  # multikrum: the replies averaged
    max_examples: int = 0  # the most examples a reply may weigh; 0: its slot's size in the server's split
    weight_decay: float = 0.0  # the clients' SGD weight decay (NIID-Bench: 1e-5)
    augment_padding: str = "zeros"  # augment's random crop: from a zero- or reflect-padded copy (NIID-Bench)
    normalize: bool = True  # pixels to [-1, 1] (the tutorial's); false: to [0, 1] (NIID-Bench's ToTensor alone)
    proximal_mu: float = 0.01  # fedprox: the proximal term's weight, (mu/2)*||w - w_global||^2
    eta: float = 0.1  # fedadam, fedyogi, fedadagrad: the server's learning rate
    beta_1: float = 0.9  # fedadam, fedyogi: the first moment's decay
    beta_2: float = 0.99  # fedadam, fedyogi: the second moment's decay
    tau: float = 1e-3  # fedadam, fedyogi, fedadagrad: the adaptivity (added to the root of the second moment)
    server_learning_rate: float = 1.0  # fedavgm
    server_momentum: float = 0.9  # fedavgm
    q: float = 0.1  # qfedavg: the fairness exponent (0 is FedAvg's objective)
    dp: str = "none"  # one of DP_MODES
    noise_multiplier: float = 1.0  # central DP: noise stdev over the clipping norm
    clipping_norm: float = 10.0  # central and local DP: the clipping norm (adaptive: the initial one)
    target_clipped_quantile: float = 0.5  # adaptive clipping: the fraction of updates to clip
    clip_norm_lr: float = 0.2  # adaptive clipping: the norm's geometric learning rate
    dp_delta: float = 1e-5  # central DP: the delta the privacy spent (epsilon) is reported for
    local_epsilon: float = 0.5  # local DP: each update's epsilon (below 1: the Gaussian mechanism's bound)
    local_delta: float = 1e-5  # local DP: each update's delta
    sensitivity: float = 20.0  # local DP: the L2 sensitivity the noise is scaled to (>= 2 x clipping-norm)
    max_epsilon: float = 0.0  # central DP: the privacy budget at dp-delta; no release may spend past it (0: none)
    stop_target_accuracy: float = 0.0  # early stopping: end once the server's test accuracy reaches it (0: off)
    stop_patience: int = 0  # early stopping: end after this many rounds without improvement (0: off)
    stop_min_delta: float = 0.0  # early stopping: the least gain in test accuracy that counts as an improvement

    @classmethod
    def from_flower(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config, refusing unknown keys and wrong values or combinations."""
        check_known_keys(values)
        kwargs = {}
        for field in dataclasses.fields(cls):
            key = field.name.replace("_", "-")
            if key in values:
                kwargs[field.name] = _coerce(key, values[key], field.type)
        config = cls(**kwargs)
        config.check()
        return config

    def check(self) -> None:
        _at_least("num-server-rounds", self.num_server_rounds, 1)
        _at_least("local-epochs", self.local_epochs, 1)
        _at_least("batch-size", self.batch_size, 1)
        _at_least("min-nodes", self.min_nodes, 1)
        _at_least("num-partitions", self.num_partitions, 0)
        _at_least("round-retries", self.round_retries, 0)
        _positive("learning-rate", self.learning_rate)
        _positive("dirichlet-alpha", self.dirichlet_alpha)
        _positive("round-timeout", self.round_timeout)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}: set -c momentum=0.9")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        _one_of("partitioner", self.partitioner, PARTITIONERS)
        _one_of("device", self.device, DEVICES)
        _one_of("strategy", self.strategy, tuple(STRATEGIES))
        _at_least("num-malicious-nodes", self.num_malicious_nodes, 0)
        _at_least("num-nodes-to-select", self.num_nodes_to_select, 1)
        _at_least("max-examples", self.max_examples, 0)
        if not 0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim-beta must be in [0, 0.5), got {self.trim_beta}: e.g. -c trim-beta=0.2")
        _one_of("augment-padding", self.augment_padding, PADDINGS)
        _one_of("dp", self.dp, DP_MODES)
        for key in ("eta", "tau", "server-learning-rate", "noise-multiplier", "clipping-norm", "clip-norm-lr"):
            _positive(key, self.value(key))
        for key in ("local-epsilon", "sensitivity"):
            _positive(key, self.value(key))
        for key in ("proximal-mu", "q"):
            _at_least(key, self.value(key), 0)
        for key in ("weight-decay", "beta-1", "beta-2", "server-momentum"):
            _in_range(key, self.value(key), "[0, 1)", lambda v: 0 <= v < 1)
        _in_range("target-clipped-quantile", self.target_clipped_quantile, "[0, 1]", lambda v: 0 <= v <= 1)
        for key in ("dp-delta", "local-delta"):
            _in_range(key, self.value(key), "(0, 1)", lambda v: 0 < v < 1)
        _in_range("stop-target-accuracy", self.stop_target_accuracy, "[0, 1]", lambda v: 0 <= v <= 1)
        _at_least("stop-patience", self.stop_patience, 0)
        for key in ("stop-min-delta", "max-epsilon"):
            _in_range(key, self.value(key), "[0, inf)", lambda v: 0 <= v < float("inf"))
        check_private(self)
        if self.num_partitions:
            check_strategy_fits(self)

    def value(self, key: str) -> Any:
        """The value of a kebab-case run-config key."""
        return getattr(self, key.replace("-", "_"))

    @property
    def replies_per_round(self) -> int:
        """The training replies a round asks for: every slot, times ``fraction-train`` (as Flower samples)."""
        return max(1, int(self.num_partitions * self.fraction_train))

    def training_fingerprint(self) -> dict[str, Any]:
        """The keys that shape the model's training: a resumed run must keep them."""
        loose = {
            "num_server_rounds",
            "round_timeout",
            "round_retries",
            "min_nodes",
            "device",
            "out_dir",
            "resume",
            "max_examples",
            # early stopping may be changed to train a stopped run further (max-epsilon may not)
            "stop_target_accuracy",
            "stop_patience",
            "stop_min_delta",
        }
        return {k: v for k, v in self.to_flower().items() if k.replace("-", "_") not in loose}

    def to_flower(self) -> dict[str, Any]:
        """The kebab-case dict Flower uses (``-c`` keys)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def check_known_keys(values: Mapping[str, Any]) -> None:
    """Refuse a key the run config does not have, naming the ones it has."""
    known = {field.name.replace("_", "-") for field in dataclasses.fields(RunConfig)}
    for key in values:
        if key in CLIENT_LEARNING_RATE_ALIASES:
            raise ConfigError(
                f"run config {key!r} is Flower's name for the clients' learning rate, which fedcifar calls "
                f"learning-rate (the clients train with it, the strategy is told it): set -c learning-rate=0.01"
            )
        if key not in known:
            raise ConfigError(f"unknown run config key {key!r}; the keys are: {', '.join(sorted(known))}")


def check_private(config: RunConfig) -> None:
    """Refuse a differential-privacy setting whose guarantee would not hold."""
    if config.dp in CENTRAL_DP and not STRATEGIES[config.strategy].central_dp:
        why = (
            "its server optimiser would see the un-noised mean (Flower adds the noise after the wrapped strategy)"
            if STRATEGIES[config.strategy].server_optimiser
            else "the noise is scaled for a mean of clipped updates, and this rule can move the model by one update"
        )
        raise ConfigError(
            f"dp={config.dp} cannot be combined with strategy={config.strategy}: {why}. Use strategy=fedavg or "
            f"fedprox with central DP, or dp=local (each client noises its own update) with any strategy."
        )
    if (
        config.dp.endswith("adaptive")
        and config.num_partitions
        and config.noise_multiplier >= config.replies_per_round / 10
    ):
        # Flower spends part of the noise on the clipped count, whose stdev it sets to replies/20
        raise ConfigError(
            f"dp={config.dp} with noise-multiplier={config.noise_multiplier} and {config.replies_per_round} "
            f"replies per round: adaptive clipping (Flower's) reaches a noise multiplier only below replies/10 = "
            f"{config.replies_per_round / 10:g}; lower noise-multiplier, add nodes, or use dp=server-fixed"
        )
    if config.dp == "local" and config.sensitivity < 2 * config.clipping_norm:
        raise ConfigError(
            f"dp=local with sensitivity={config.sensitivity} below 2 x clipping-norm={config.clipping_norm}: two "
            f"clipped updates can lie twice the clipping norm apart, so the noise would be too small; set "
            f"-c sensitivity={2 * config.clipping_norm:g} (or more)"
        )
    if config.dp == "local" and config.local_epsilon >= 1:
        raise ConfigError(
            f"dp=local with local-epsilon={config.local_epsilon}: LocalDpMod's noise (the classic Gaussian "
            f"mechanism) guarantees epsilon only below 1; set -c local-epsilon=0.5 (or lower)"
        )
    if config.max_epsilon and config.dp not in CENTRAL_DP:
        raise ConfigError(
            f"max-epsilon={config.max_epsilon:g} with dp={config.dp}: a privacy budget is kept only under central "
            f"DP, where an accountant composes the rounds; set -c dp=server-fixed (or another central mode), or "
            f"leave max-epsilon out"
        )
    if config.dp in CENTRAL_DP and config.fraction_train != 1:
        raise ConfigError(
            f"dp={config.dp} needs fraction-train=1: the privacy spent is accounted without amplification by "
            f"sampling, over the clients that replied (got fraction-train={config.fraction_train})"
        )


def check_strategy_fits(config: RunConfig) -> None:
    """Refuse a robust strategy that the run's replies per round cannot carry out."""
    n = config.replies_per_round
    where = (
        f"the run asks {n} node(s) per round "
        f"(num-partitions={config.num_partitions} x fraction-train={config.fraction_train})"
    )
    if why := STRATEGIES[config.strategy].refuse(config, n, where):
        raise ConfigError(why)


def check_partition(partition_id: int, num_partitions: int) -> None:
    """Refuse partition ids and counts that cannot map to a partition."""
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ConfigError(
            f"num-partitions must be an integer >= 1, got {num_partitions!r}: "
            "set it to the number of SuperNodes (clients)."
        )
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition-id must be an integer in [0, {num_partitions - 1}] for "
            f"num-partitions={num_partitions}, got {partition_id!r}: give every SuperNode "
            "a distinct id below num-partitions (e.g. its StatefulSet ordinal)."
        )


def check_site(site: str) -> None:
    """A site name becomes a Prometheus label and a Flower node name: keep it a DNS label."""
    if not SITE_NAME.fullmatch(site):
        raise ConfigError(
            f"site must be a DNS label (lowercase letters, digits and '-', at most 63 characters), "
            f"got {site!r}: e.g. --site hospital-a"
        )


def _coerce(key: str, value: Any, kind: str) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        expected = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[kind]
        raise ConfigError(
            f"run config {key!r} must be {expected}, got {value!r} ({type(value).__name__}): "
            f"set it with -c {key}={_example(kind)}"
        )
    return float(value) if kind == "float" else value


def _example(kind: str) -> str:
    return {"int": "2", "float": "0.5", "str": '"value"', "bool": "true"}[kind]


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"run config {key!r} must be >= {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(f"run config {key!r} must be a finite number > 0, got {value}")


def _in_range(key: str, value: float, interval: str, inside: Callable[[float], bool]) -> None:
    if not inside(value):
        raise ConfigError(f"run config {key!r} must be in {interval}, got {value}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"run config {key!r} must be one of {', '.join(allowed)}, got {value!r}")


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the app's pyproject.toml."""
    with open(app_dir / "pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)
    try:
        return project["tool"]["flwr"]["app"]["config"]
    except KeyError:
        raise ConfigError(
            f"{app_dir / 'pyproject.toml'} has no [tool.flwr.app.config] table: is {app_dir} a Flower app?"
        ) from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["k=v", "a=1 b=2"]`` -> dict, with values parsed as TOML like ``flwr run -c`` does."""
    overrides: dict[str, Any] = {}
    for pair in " ".join(pairs).split():
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"-c expects key=value, got {pair!r}: e.g. -c learning-rate=0.05")
        try:
            overrides[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = raw  # bare words are strings, as in `-c partitioner=dirichlet`
    return overrides


def chart_values() -> list[tuple[str, str, str]]:
    """(chart value under run, run-config key, kind) for every key the chart sets from a value of its
    own, in the run config's order; kind: int, float, str, bool, or computed (a helper's)."""
    found = []
    for field in dataclasses.fields(RunConfig):
        key = field.name.replace("_", "-")
        if key in CHART_SETS_ITSELF:
            continue
        head, *rest = key.split("-")
        value = CHART_VALUE_NAMES.get(key) or head + "".join(word.capitalize() for word in rest)
        found.append((value, key, "computed" if key in CHART_COMPUTED else field.type))
    return found
