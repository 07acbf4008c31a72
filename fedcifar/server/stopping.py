"""When a run ends before ``num-server-rounds``: early stopping on the server's own evaluation, and
the privacy budget (``max-epsilon``, enforced by ``privacy.PrivacyAccount`` before a release).

Early stopping reads only the test accuracy the ServerApp measured on its own split after each
round, never a figure a client reported: a hostile node cannot end a run. ``stop-target-accuracy``
ends it after the first round at or above the target; ``stop-patience`` after that many rounds
without an improvement of more than ``stop-min-delta`` over the best accuracy so far (Keras'
``EarlyStopping`` rule). 0 turns either off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fedcifar.config import RunConfig

REASONS = ("target_accuracy", "patience", "privacy_budget")


@dataclass(frozen=True)
class Stop:
    """Why a run ended early, after which completed round, in a sentence."""

    reason: str  # one of REASONS
    round: int  # the last completed round (0: none)
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StopRun(Exception):
    """The run ends after its last completed round, for ``stop``'s reason."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.detail)
        self.stop = stop


class BudgetReached(StopRun):
    """The next noised release would spend more than ``max-epsilon``: nothing more is released."""


def early_stop(config: RunConfig, accuracies: list[float]) -> Stop | None:
    """Whether the rounds so far (the server's test accuracy after each, in order) end the run."""
    if not accuracies:
        return None
    last_round = len(accuracies)
    target = config.stop_target_accuracy
    if target and accuracies[-1] >= target:
        return Stop(
            "target_accuracy",
            last_round,
            f"round {last_round} reached the target: test accuracy {accuracies[-1]:.4f} >= "
            f"stop-target-accuracy={target:g}",
        )
    patience = config.stop_patience
    if not patience:
        return None
    best_round, best = 1, accuracies[0]
    for server_round, accuracy in enumerate(accuracies[1:], start=2):
        if accuracy > best + config.stop_min_delta:
            best_round, best = server_round, accuracy
    if last_round - best_round < patience:
        return None
    return Stop(
        "patience",
        last_round,
        f"no round improved the test accuracy by more than stop-min-delta={config.stop_min_delta:g} for "
        f"stop-patience={patience} rounds: the best is round {best_round}'s {best:.4f}",
    )
