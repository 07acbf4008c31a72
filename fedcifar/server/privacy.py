"""Differential privacy on the server: Flower's central-DP wrappers as the run config asks for them
(corrected where Flower 1.42 does not give the guarantee it states), and the privacy a run spends.

Central DP (``dp`` = server-/client-fixed or -adaptive) releases one noised aggregate per training
attempt: the sum of the clipped updates of the run's slots over the number of slots, a slot without
an accepted reply counting as an update of zeros (DP-FedAvg's fixed denominator: one client more or
less moves it by at most clipping-norm / slots), plus Gaussian noise of clipping-norm x multiplier /
slots. Flower's RDP accountant composes one Gaussian event per release, without amplification by
sampling (every slot is asked every round), for add-or-remove-one neighbouring client sets; the
epsilon spent is reported at ``dp-delta``. Adaptive clipping also releases a noised count of the
clipped updates: the multiplier accounted is that of both releases together, which is below the
run's ``noise-multiplier`` (``effective_noise_multiplier``). Local DP (``dp = local``) is each
client's own (epsilon, delta) per update, and no accountant composes it: reported as not computed.

No noise is ever drawn twice, whatever crashes where. Flower's wrappers draw it from numpy's global
generator; it is seeded afresh from the OS (128 bits, numpy's ``SeedSequence``) before every
release, and no generator state is kept anywhere: a resumed run draws new noise for a round the
nodes may have seen already (the same noise twice would give away the noise-free difference of the
two aggregates). Every release is written to ``privacy-releases.json`` (atomically, before the
noised model can leave the ServerApp: its evaluation, the next round's messages), and a resumed run
composes every release recorded there, those of a round that crashed included.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant  # dp-accounting, loaded when built

from fedcifar.common import atomic
from fedcifar.config import CENTRAL_DP, RunConfig
from fedcifar.server.checkpoint import CheckpointError
from fedcifar.server.replies import Refused
from fedcifar.server.stopping import BudgetReached, Stop

RELEASES_FILE = "privacy-releases.json"
NOT_COMPUTED = {
    "none": "no differential privacy",
    "local": "local DP: each client's update is (local-epsilon, local-delta)-DP; no accountant composes the rounds",
}


class AdaptiveClippingFixes:
    """Two corrections to Flower 1.42's adaptive-clipping wrappers (mixed in before them):

    - the norm moved the wrong way: Flower multiplies it by exp(-lr (f - q)) where f is the
      fraction of updates that were *clipped*; Andrew et al.'s rule, written for that fraction,
      is exp(+lr (f - q)): more clipping than the target raises the norm (Flower's lowered it,
      and the norm ran off to zero or to infinity);
    - the noise was scaled by the norm after that update, not by the norm the updates were
      clipped to: too little noise whenever the norm shrank.
    """

    def aggregate_train(self, server_round: int, replies: list[Message]):
        self.clipped_at = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        moved, self.clipping_norm = self.clipping_norm, self.clipped_at
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = moved


class ServerSideAdaptiveClipping(AdaptiveClippingFixes, DifferentialPrivacyServerSideAdaptiveClipping):
    pass


class ClientSideAdaptiveClipping(AdaptiveClippingFixes, DifferentialPrivacyClientSideAdaptiveClipping):
    pass


CENTRAL_DP_WRAPPERS = (
    DifferentialPrivacyServerSideFixedClipping,
    DifferentialPrivacyClientSideFixedClipping,
    ServerSideAdaptiveClipping,
    ClientSideAdaptiveClipping,
)


def with_privacy(strategy: Strategy, config: RunConfig) -> Strategy:
    """The central-DP wrapper the run config asks for (``dp``), or the strategy as it is."""
    z, norm, n = config.noise_multiplier, config.clipping_norm, config.replies_per_round
    adaptive = {
        "initial_clipping_norm": norm,
        "target_clipped_quantile": config.target_clipped_quantile,
        "clip_norm_lr": config.clip_norm_lr,
    }
    wrap = {
        "server-fixed": lambda: DifferentialPrivacyServerSideFixedClipping(strategy, z, norm, n),
        "client-fixed": lambda: DifferentialPrivacyClientSideFixedClipping(strategy, z, norm, n),
        "server-adaptive": lambda: ServerSideAdaptiveClipping(strategy, z, n, **adaptive),
        "client-adaptive": lambda: ClientSideAdaptiveClipping(strategy, z, n, **adaptive),
    }.get(config.dp)
    return wrap() if wrap else strategy


def private_replies(strategy: Strategy, replies: list[Message], arrays: ArrayRecord) -> list[Message]:
    """Under central DP, the replies as the noise is scaled for them: one per slot with equal
    weights, a slot without a reply as an update of zeros (the global model ``arrays`` itself).
    Flower's wrapper adds noise for a plain mean over ``num_sampled_clients`` (the run's slots);
    a mean over fewer replies, or weighted by example counts, would let one client move it by more
    than the noise covers."""
    if not isinstance(strategy, CENTRAL_DP_WRAPPERS):
        return replies
    weighted_by = strategy.strategy.weighted_by_key
    for reply in replies:
        reply.content["metrics"][weighted_by] = 1
    # Flower aggregates only replies whose metrics have the same keys: the real ones' keys, all 0 (not
    # clipped, for adaptive clipping's bit: an update of zeros is within any norm), weight 1
    zeros = MetricRecord({key: 0 for key in replies[0].content["metrics"]} | {weighted_by: 1})
    missing = strategy.num_sampled_clients - len(replies)
    return replies + [
        Message(RecordDict({"arrays": arrays, "metrics": zeros.copy()}), dst_node_id=0, message_type="train")
        for _ in range(missing)
    ]


def check_clipped(strategy: Strategy, reply: RecordDict, sent: ArrayRecord) -> None:
    """Under client-side clipping, refuse a training reply whose update (from the model ``sent``) is
    above the norm the server sent: a node that does not clip gets no more say than one that does.
    ``reply`` has passed ``replies.check_train_reply`` (the model's exact layout)."""
    if not isinstance(strategy, DifferentialPrivacyClientSideFixedClipping | ClientSideAdaptiveClipping):
        return
    received = reply["arrays"]
    norm = math.sqrt(
        sum(float(np.sum((received[k].numpy() - a.numpy()) ** 2, dtype=np.float64)) for k, a in sent.items())
    )
    if norm > strategy.clipping_norm * (1 + 1e-4):  # float32 rounding of a clipped update
        raise Refused(
            "unclipped", f"its update's norm {norm:.4g} is above the clipping norm {strategy.clipping_norm:.4g}"
        )


def clipping_norm(strategy: Strategy) -> float | None:
    """The clipping norm in force (central DP), None without one."""
    return float(strategy.clipping_norm) if isinstance(strategy, CENTRAL_DP_WRAPPERS) else None


def effective_noise_multiplier(strategy: Strategy) -> float:
    """The multiplier of one Gaussian mechanism equivalent to what the wrapper releases per round.
    Adaptive clipping releases the model with Flower's adjusted multiplier and the clipped count
    (sensitivity 1: one client more or less changes it by one) with its own stdev: together
    (z_model^-2 + stdev^-2)^-1/2, below the run's ``noise-multiplier`` (Flower's split assumes
    Andrew et al.'s centred bits, of sensitivity 1/2)."""
    if isinstance(strategy, ServerSideAdaptiveClipping | ClientSideAdaptiveClipping):
        return (strategy.noise_multiplier**-2 + strategy.clipped_count_stddev**-2) ** -0.5
    return float(strategy.noise_multiplier)


@dataclass
class PrivacyAccount:
    config: RunConfig
    noise_multiplier: float = 0.0  # the effective one of the run's wrapper (central DP)
    out_dir: Path | None = None  # where ``privacy-releases.json`` is kept (None: nowhere, in tests)
    accountant: Any = field(init=False, default=None)
    releases: list[dict[str, Any]] = field(init=False, default_factory=list)  # every noised aggregate, in order

    def __post_init__(self) -> None:
        if self.config.dp in CENTRAL_DP:
            self.accountant = self._new_accountant()

    def _new_accountant(self) -> RdpAccountant:
        return RdpAccountant(
            PrivacyConfig(
                target_delta=self.config.dp_delta,
                population_size=self.config.num_partitions,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )

    @classmethod
    def of(cls, strategy: Strategy, config: RunConfig, out_dir: Path | None = None) -> PrivacyAccount:
        central = isinstance(strategy, CENTRAL_DP_WRAPPERS)
        return cls(config, effective_noise_multiplier(strategy) if central else 0.0, out_dir)

    def in_force(self) -> dict[str, Any]:
        """What ``history.json`` says about the run's privacy."""
        c = self.config
        if c.dp in CENTRAL_DP:
            return {
                "dp": c.dp,
                "noise_multiplier": c.noise_multiplier,
                "effective_noise_multiplier": self.noise_multiplier,
                "clipping_norm": c.clipping_norm,
                "clipping": "adaptive" if c.dp.endswith("adaptive") else "fixed",
                "epsilon": f"RDP accountant, no amplification, add-or-remove-one, at delta={c.dp_delta}",
                "noise": "drawn afresh from the OS's entropy for every release, never twice (also after a resume)",
                "not_covered": "metrics (losses, example counts, client evaluation) are published without noise",
            }
        described = {"dp": c.dp, "epsilon": f"not computed: {NOT_COMPUTED[c.dp]}"}
        if c.dp == "local":
            described |= {"local_epsilon": c.local_epsilon, "local_delta": c.local_delta, "sensitivity": c.sensitivity}
        return described

    def fresh_noise(self) -> None:
        """Before an aggregate is noised: numpy's global generator (Flower's wrappers draw from it)
        seeded from the OS, so that no state of it, saved or inherited, can draw the same noise again."""
        if self.accountant is not None:
            np.random.seed()

    def _next_event(self) -> dict[str, Any]:
        """The record of one noised aggregate of the run's slots."""
        n = self.config.num_partitions
        return {"noise_multiplier": self.noise_multiplier, "sample_size": n, "population_size": n}

    def check_budget(self, server_round: int) -> None:
        """Before a training attempt: raise ``BudgetReached`` when its release would spend more than
        ``max-epsilon`` (the run's budget at ``dp-delta``), so nothing past the budget is ever released."""
        budget = self.config.max_epsilon
        if self.accountant is None or not budget:
            return
        then = self._new_accountant()  # the releases so far and the next one
        for event in [*self.releases, self._next_event()]:
            then.compose(gaussian(event))
        would = float(then.get_privacy_spent().epsilon)
        if would <= budget:
            return
        spent = self.releases[-1]["epsilon"] if self.releases else 0.0
        raise BudgetReached(
            Stop(
                "privacy_budget",
                server_round - 1,
                f"the privacy budget is reached: round {server_round}'s release would spend epsilon={would:.4g}, "
                f"above max-epsilon={budget:g} at delta={self.config.dp_delta:g} (spent: {spent:.4g} in "
                f"{len(self.releases)} noised release(s)); nothing more is released",
            )
        )

    def release(self, server_round: int, attempt: int) -> float | None:
        """One more noised aggregate of the run's slots, recorded before it can leave the ServerApp:
        the epsilon spent so far (None: not computed)."""
        if self.accountant is None:
            return None
        event = self._next_event()
        self.accountant.compose(gaussian(event))
        epsilon = float(self.accountant.get_privacy_spent().epsilon)
        self.releases.append({"round": server_round, "attempt": attempt, **event, "epsilon": epsilon})
        if self.out_dir is not None:
            atomic.write_bytes(self.out_dir / RELEASES_FILE, json.dumps({"releases": self.releases}, indent=1).encode())
        return epsilon

    def state_dict(self) -> dict[str, Any] | None:
        """What the checkpoint keeps: how many releases its rounds made (resuming checks the record against it)."""
        return {"releases": len(self.releases)} if self.accountant else None

    def resume(self, checkpointed: dict[str, Any] | None) -> None:
        """Before the first round: every release ``privacy-releases.json`` records is spent, those
        after the checkpoint ``checkpointed`` (a round the nodes saw before a crash) included."""
        if self.accountant is None:
            return
        path = self.out_dir / RELEASES_FILE
        advice = "without it the privacy already spent is unknown; start a new run (a new --out) instead"
        if not path.exists() and not (checkpointed or {}).get("releases"):
            return  # nothing released yet
        try:
            releases = json.loads(path.read_text())["releases"]
            events = [gaussian(r) for r in releases]
        except (OSError, ValueError, KeyError, TypeError) as err:
            unreadable = f"{path}, the record of every noised release, is unreadable ({err})"
            raise CheckpointError(f"{unreadable}; {advice}") from err
        if len(releases) < (checkpointed or {}).get("releases", 0):
            raise CheckpointError(
                f"{path} records {len(releases)} releases, fewer than the checkpoint's rounds made "
                f"({checkpointed['releases']}): it is older than the checkpoint; {advice}"
            )
        for event in events:
            self.accountant.compose(event)
        self.releases = releases


def gaussian(release: dict[str, Any]) -> GaussianPrivacyEvent:
    """The accountant's event of a release as ``privacy-releases.json`` records it."""
    return GaussianPrivacyEvent(release["noise_multiplier"], release["sample_size"], release["population_size"])
