"""A run's outputs: ``history.json`` (per-round figures), the model checkpoint, the best model and
``history.png``.

Files are replaced whole (``atomic.py``), so a crash never leaves a half-written file behind, and
they are rewritten after every round.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedcifar.common import atomic

HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "model.pt"
BEST_MODEL_FILE = "best-model.pt"
PLOT_FILE = "history.png"
OUTPUT_FILES = (HISTORY_FILE, PLOT_FILE, CHECKPOINT_FILE, BEST_MODEL_FILE)  # what an operator fetches


@dataclass
class RoundRecord:
    round: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    round_seconds: float
    participating_clients: int
    partitions: list[int]  # the slots aggregated, in order (history.json calls them partitions)
    examples_trained: int
    sent_bytes: int
    received_bytes: int
    failures: int = 0  # replies missing by the deadline or carrying an error
    rejected_updates: int = 0  # replies refused (train and evaluate): see ``refusals``
    attempts: int = 1  # training attempts; more than 1 when an attempt aggregated nothing
    client_train_seconds: list[float] = field(default_factory=list)  # per reply, in the order of the slots
    client_eval_loss: float | None = None
    client_eval_accuracy: float | None = None
    sites: list[str] = field(default_factory=list)  # the site of each slot in ``partitions``
    refusals: list[dict[str, str]] = field(default_factory=list)  # slot, site and reason of each refused reply
    clipping_norm: float | None = None  # central DP: the norm this round's updates were clipped to
    epsilon: float | None = None  # central DP: the privacy spent after this round, at the run's dp-delta
    # where the server's round time went (``recorder.PHASES``), attempts summed; the rest is waiting for nodes
    phase_seconds: dict[str, float] = field(default_factory=dict)
    finished_at: float = field(default_factory=time.time)


@dataclass
class History:
    run_id: int
    config: dict[str, Any]
    data: str
    device: str
    privacy: dict[str, Any] = field(default_factory=dict)  # the differential privacy in force (server/privacy.py)
    initial_eval_loss: float | None = None
    initial_eval_accuracy: float | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    status: str = "running"  # running | completed
    stopped: dict[str, Any] | None = None  # a run that ended before num-server-rounds: reason, round, detail
    started_at: float = field(default_factory=time.time)
    resumes: list[dict[str, Any]] = field(default_factory=list)  # run id, after which round, when
    # the round whose global model scored the highest accuracy on the server's test split (best-model.pt)
    best: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """The history as saved (``asdict``), e.g. from a checkpoint."""
        rounds = [RoundRecord(**r) for r in data.get("rounds", [])]
        return cls(**{**data, "rounds": rounds})

    def resumed(self, run_id: int, after_round: int, config: dict[str, Any]) -> None:
        """Continue this history in a new Flower run (with possibly more rounds)."""
        self.resumes.append({"run_id": run_id, "after_round": after_round, "at": time.time()})
        self.run_id, self.config, self.status, self.stopped = run_id, config, "running", None
        self.rounds = self.rounds[:after_round]

    def save(self, out_dir: Path) -> Path:
        """Strict JSON: a figure that is not finite (no reply, an unusable aggregate) is written as null."""
        return atomic.write_bytes(
            out_dir / HISTORY_FILE, json.dumps(_finite(asdict(self)), indent=2, allow_nan=False).encode()
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def load_history(out_dir: Path) -> dict[str, Any] | None:
    """The history as plain JSON, or None while it is not written yet."""
    try:
        return json.loads((out_dir / HISTORY_FILE).read_text())
    except FileNotFoundError:
        return None


def plot_history(history: dict[str, Any], path: Path) -> Path:
    """Loss (train and eval) and eval accuracy per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = history["rounds"]
    xs = [r["round"] for r in rounds]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(xs, [r["train_loss"] for r in rounds], "o-", label="train (clients)")
    ax_loss.plot(xs, [r["eval_loss"] for r in rounds], "s-", label="eval (server, test split)")
    ax_loss.set(xlabel="round", ylabel="cross-entropy loss", title="Loss")
    ax_loss.legend()
    ax_acc.plot(xs, [100 * r["eval_accuracy"] for r in rounds], "s-", color="tab:green")
    ax_acc.set(xlabel="round", ylabel="accuracy (%)", title="Test accuracy (server)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole; a few ticks, however many
    fig.suptitle(f"fedcifar run {history['run_id']}: {len(rounds)} rounds")
    with atomic.replacing(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
