"""Flower's DP clipping, safe for an update of zeros (``tuning.py``)."""

from __future__ import annotations

from fedcifar.flower.patch import replace


def clip_zero_updates() -> None:
    """Flower's DP clipping divides by the update's norm, so an update of zeros (a node that sends
    back the model it got, or a server-side norm that meets one) raised ZeroDivisionError: under
    server-side clipping one such reply cost the round every reply. An update of zeros is within any
    norm and is left as it is; every other update is scaled as Flower scales it."""
    from flwr.serverapp.strategy import dp_adaptive_clipping
    from flwr.supercore import differential_privacy

    def clip(arrays: list, clipping_norm: float) -> bool:
        norm = differential_privacy.get_norm(arrays)
        factor = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
        for array in arrays:
            array *= factor
        return factor < 1  # adaptive clipping's norm bit; fixed clipping ignores it

    replace(differential_privacy, "clip_inputs_inplace", clip)
    replace(differential_privacy, "adaptive_clip_inputs_inplace", clip)
    replace(dp_adaptive_clipping, "adaptive_clip_inputs_inplace", clip)  # imported by name there
