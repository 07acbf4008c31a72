"""Differential privacy on the server: what is in force, and the privacy a run has spent.

Central DP (``dp`` = server-/client-fixed or -adaptive) releases one noised aggregate per completed
round: a Gaussian mechanism with the run's ``noise-multiplier`` over the clipped updates of the
clients that replied, accounted with Flower's RDP accountant, without amplification by sampling
(every slot is asked every round), for add-or-remove-one neighbouring client sets; the epsilon spent
is reported at ``dp-delta``. Adaptive clipping spends part of that noise on the clipped-count
estimate; Flower splits it so that both together are one Gaussian mechanism with the run's
multiplier, which is what is accounted. Local DP (``dp = local``) is each client's own (epsilon,
delta) per update, and no accountant composes it: its epsilon is reported as not computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant  # dp-accounting, loaded when built

from fedcifar.config import CENTRAL_DP, RunConfig

NOT_COMPUTED = {
    "none": "no differential privacy",
    "local": "local DP: each client's update is (local-epsilon, local-delta)-DP; no accountant composes the rounds",
}


@dataclass
class PrivacyAccount:
    config: RunConfig
    accountant: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.config.dp in CENTRAL_DP:
            self.accountant = RdpAccountant(
                PrivacyConfig(
                    target_delta=self.config.dp_delta,
                    population_size=self.config.num_partitions,
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                )
            )

    def in_force(self) -> dict[str, Any]:
        """What ``history.json`` says about the run's privacy."""
        c = self.config
        if c.dp in CENTRAL_DP:
            return {
                "dp": c.dp,
                "noise_multiplier": c.noise_multiplier,
                "clipping_norm": c.clipping_norm,
                "clipping": "adaptive" if c.dp.endswith("adaptive") else "fixed",
                "epsilon": f"RDP accountant, no amplification, at delta={c.dp_delta}",
            }
        described = {"dp": c.dp, "epsilon": f"not computed: {NOT_COMPUTED[c.dp]}"}
        if c.dp == "local":
            described |= {"local_epsilon": c.local_epsilon, "local_delta": c.local_delta, "sensitivity": c.sensitivity}
        return described

    def release(self, replies: int) -> float | None:
        """One more noised aggregate of ``replies`` clipped updates: the epsilon spent so far (None:
        not computed)."""
        if self.accountant is None:
            return None
        self.accountant.compose(GaussianPrivacyEvent(self.config.noise_multiplier, replies, self.config.num_partitions))
        return float(self.accountant.get_privacy_spent().epsilon)

    def state_dict(self) -> dict[str, Any] | None:
        return self.accountant.state_dict() if self.accountant else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.accountant and state:
            self.accountant.load_state_dict(state)
