"""The strategies a run may use: one entry each, everything fedcifar knows about it in one place.

Each is one of Flower's (``flwr.serverapp.strategy``), named by its class in lowercase: how its
parameters come from the run config, the replies a round needs for it to mean anything, whether it
moves the model by more than the mean (a server optimiser) and so whether Flower's central-DP
wrappers may wrap it, what its training replies carry beyond the usual, what it keeps from round to
round (saved in the checkpoint), and what a client does differently for it. The run config's checks
(``config.py``), the aggregation (``server/strategies.py``), the reply checks (``server/replies.py``)
and the trainer (``node/trainer.py``) read it; ``tests/test_strategies.py`` holds the chart's enum, each
entry's state and parameters equal to it. Adding a strategy: one entry here, its test, its README row.

No torch and no Flower here: the ClientApp shim imports the run config, and with it this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedcifar.config import RunConfig

LOSS_BEFORE_TRAINING = "loss-before-training"  # the train reply's metric q-FedAvg weighs updates by
# why a run cannot carry a rule out, given (the run config, the replies it asks per round, where they
# come from); None: it can
Refusal = Callable[["RunConfig", int, str], "str | None"]


@dataclass(frozen=True)
class Strategy:
    flower_class: str  # in flwr.serverapp.strategy
    parameters: Callable[[RunConfig], dict[str, Any]] = lambda config: {}  # beyond the ones every strategy takes
    server_optimiser: bool = False  # moves the model by more than the mean of the updates
    robust: bool = False  # a rule against well-formed poisoned updates: may move the model by one update
    refuse: Refusal = lambda config, n, where: None
    extra_train_metrics: dict[str, type] = field(default_factory=dict)  # what its training replies add
    state: tuple[str, ...] = ()  # attributes it carries from round to round
    loss_before_training: bool = False  # a client reports the received model's loss on its data

    @property
    def central_dp(self) -> bool:
        """Flower's central-DP wrappers noise the mean of clipped updates, after the wrapped strategy."""
        return not (self.server_optimiser or self.robust)


def _fedopt(config: RunConfig, moments: bool = True) -> dict[str, Any]:
    chosen = {"eta": config.eta, "eta_l": config.learning_rate, "tau": config.tau}
    return {**chosen, "beta_1": config.beta_1, "beta_2": config.beta_2} if moments else chosen


def _at_least(least: Callable[[RunConfig], int], why: Callable[[RunConfig], str]) -> Refusal:
    """A rule that needs ``least`` replies per round, for the reason ``why``."""

    def refuse(config: RunConfig, n: int, where: str) -> str | None:
        if n >= least(config):
            return None
        return (
            f"strategy={config.strategy} cannot run: {why(config)}, and {where}. Add nodes, "
            "lower num-malicious-nodes, or choose another strategy (fedavg, fedmedian, ...)."
        )

    return refuse


def _trims_something(config: RunConfig, n: int, where: str) -> str | None:
    """FedTrimmedAvg trims int(trim-beta x n) replies from each end: none trimmed is the mean."""
    if int(config.trim_beta * n) >= 1:
        return None
    return (
        f"strategy=fedtrimmedavg with trim-beta={config.trim_beta} trims nothing from {n} replies "
        f"({where}): raise trim-beta to at least {1 / n:.3g} (below 0.5), or add nodes."
    )


MOMENTS = ("m_t", "v_t", "current_arrays")
STRATEGIES: dict[str, Strategy] = {
    "fedavg": Strategy("FedAvg"),
    "fedprox": Strategy("FedProx", lambda c: {"proximal_mu": c.proximal_mu}),
    "fedavgm": Strategy(
        "FedAvgM",
        lambda c: {"server_learning_rate": c.server_learning_rate, "server_momentum": c.server_momentum},
        server_optimiser=True,
        state=("momentum_vector", "current_arrays"),
    ),
    "fedadam": Strategy("FedAdam", _fedopt, server_optimiser=True, state=MOMENTS),
    "fedyogi": Strategy("FedYogi", _fedopt, server_optimiser=True, state=MOMENTS),
    "fedadagrad": Strategy("FedAdagrad", lambda c: _fedopt(c, moments=False), server_optimiser=True, state=MOMENTS),
    "qfedavg": Strategy(
        "QFedAvg",
        lambda c: {"client_learning_rate": c.learning_rate, "q": c.q, "train_loss_key": LOSS_BEFORE_TRAINING},
        server_optimiser=True,
        extra_train_metrics={LOSS_BEFORE_TRAINING: float},
        state=("current_arrays",),
        loss_before_training=True,
    ),
    "fedmedian": Strategy(
        "FedMedian",
        robust=True,
        refuse=_at_least(lambda c: 3, lambda c: "a median of fewer than 3 replies is their mean"),
    ),
    "fedtrimmedavg": Strategy("FedTrimmedAvg", lambda c: {"beta": c.trim_beta}, robust=True, refuse=_trims_something),
    "krum": Strategy(
        "Krum",
        lambda c: {"num_malicious_nodes": c.num_malicious_nodes},
        robust=True,
        refuse=_at_least(
            lambda c: 2 * c.num_malicious_nodes + 3,
            lambda c: (
                f"Krum tolerates num-malicious-nodes={c.num_malicious_nodes} only among at least 2f + 3 = "
                f"{2 * c.num_malicious_nodes + 3} replies"
            ),
        ),
    ),
    "multikrum": Strategy(
        "MultiKrum",
        lambda c: {"num_malicious_nodes": c.num_malicious_nodes, "num_nodes_to_select": c.num_nodes_to_select},
        robust=True,
        refuse=_at_least(
            lambda c: max(2 * c.num_malicious_nodes + 3, c.num_nodes_to_select + c.num_malicious_nodes),
            lambda c: (
                f"MultiKrum needs at least 2f + 3 = {2 * c.num_malicious_nodes + 3} replies and "
                f"num-nodes-to-select ({c.num_nodes_to_select}) + num-malicious-nodes ({c.num_malicious_nodes})"
            ),
        ),
    ),
    "bulyan": Strategy(
        "Bulyan",
        lambda c: {"num_malicious_nodes": c.num_malicious_nodes},
        robust=True,
        refuse=_at_least(
            lambda c: 4 * c.num_malicious_nodes + 3,
            lambda c: (
                f"Bulyan needs at least 4f + 3 = {4 * c.num_malicious_nodes + 3} replies for "
                f"num-malicious-nodes={c.num_malicious_nodes}"
            ),
        ),
    ),
}
