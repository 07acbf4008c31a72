"""The server's checkpoint: everything needed to resume a run after its last completed round.

``model.pt`` in the run's output folder holds the global model, the round it completed, the
run's history up to that round, the training part of the run config, the server's random state
(Flower samples clients with ``random``), what the strategy carries between rounds
(``server/strategies.py``: moments, momentum, the adaptive clipping norm) and how many noised
aggregates its rounds released (central DP; the DP noise's generator is never kept:
``server/privacy.py``) and the best global model so far (``best-model.pt`` is rewritten from it, so
the two never disagree after a crash). It is written after every round, atomically,
and read with ``weights_only=True``, so a checkpoint from elsewhere cannot run code.

A checkpoint that cannot be read, that holds another model, or that was trained with other
hyper-parameters is refused with ``CheckpointError``, and left untouched.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcifar.common import atomic
from fedcifar.server.history import BEST_MODEL_FILE, CHECKPOINT_FILE

# 2: strategy and privacy accountant states; 3: no DP noise state (drawn afresh on resume); 4: the best model
FORMAT = 4
MODEL_CLASS = "Net"


class CheckpointError(ValueError):
    """The checkpoint cannot be resumed from; the message says why and what to do."""


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    round: int
    history: dict[str, Any]
    fingerprint: dict[str, Any]
    rng_state: Any
    strategy_state: dict[str, Any]
    privacy_state: dict[str, Any] | None
    best_model: dict[str, torch.Tensor] | None  # the global model of ``history["best"]["round"]``

    def save(self, out_dir: Path) -> Path:
        path = out_dir / CHECKPOINT_FILE
        payload = {
            "format": FORMAT,
            "model_class": MODEL_CLASS,
            "model": self.model,
            "round": self.round,
            "history": self.history,
            "fingerprint": self.fingerprint,
            "rng_state": self.rng_state,
            "strategy_state": self.strategy_state,
            "privacy_state": self.privacy_state,
            "best_model": self.best_model,
        }
        with atomic.replacing(path) as tmp:
            torch.save(payload, tmp)
        return path

    def restore_rng(self) -> None:
        random.setstate(_as_rng_state(self.rng_state))


def load_checkpoint(out_dir: Path, reference: dict[str, torch.Tensor]) -> Checkpoint | None:
    """The checkpoint in ``out_dir`` (None if there is none), checked against the model's state dict."""
    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    advice = "it is left as it is; move it away to start this run over, or resume another folder"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); {advice}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("model_class") != MODEL_CLASS:
        raise CheckpointError(
            f"checkpoint {path} is not a fedcifar checkpoint of format {FORMAT} for {MODEL_CLASS} "
            f"(it may come from an older version); {advice}"
        )
    model = payload.get("model")
    problems = _state_dict_problems(model, reference)
    if problems:
        raise CheckpointError(f"checkpoint {path} holds an incompatible model ({problems}); {advice}")
    return Checkpoint(
        model=model,
        round=int(payload["round"]),
        history=payload["history"],
        fingerprint=payload["fingerprint"],
        rng_state=payload["rng_state"],
        strategy_state=payload["strategy_state"],
        privacy_state=payload["privacy_state"],
        best_model=payload["best_model"],
    )


def save_best_model(out_dir: Path, model: dict[str, torch.Tensor], best: dict[str, Any]) -> Path:
    """``best-model.pt``: ``{"model": state_dict, "round", "eval_accuracy", "eval_loss"}`` (``best``: the
    history's record of that round); load with ``torch.load(path, weights_only=True)``."""
    path = out_dir / BEST_MODEL_FILE
    with atomic.replacing(path) as tmp:
        torch.save({"format": FORMAT, "model_class": MODEL_CLASS, "model": model, **best}, tmp)
    return path


def check_same_training(checkpoint: Checkpoint, fingerprint: dict[str, Any], path: Path) -> None:
    """Refuse to resume with hyper-parameters or data splits other than the checkpoint's."""
    changed = {
        key: (checkpoint.fingerprint.get(key), value)
        for key, value in fingerprint.items()
        if checkpoint.fingerprint.get(key) != value
    }
    if changed:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
        raise CheckpointError(
            f"cannot resume {path}: the run config changed ({details}); resume with the original "
            "values (fedcifar run --resume reads them from history.json) or start a new run"
        )


def _state_dict_problems(model: Any, reference: dict[str, torch.Tensor]) -> str:
    if not isinstance(model, dict):
        return "no state dict"
    missing, extra = sorted(set(reference) - set(model)), sorted(set(model) - set(reference))
    if missing or extra:
        return f"missing {missing}, unexpected {extra}"
    for name, tensor in reference.items():
        got = model[name]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape or got.dtype != tensor.dtype:
            shape = getattr(got, "shape", type(got).__name__)
            return f"{name} is {shape}, expected {tuple(tensor.shape)} {tensor.dtype}"
        if not torch.isfinite(got).all():
            return f"{name} holds NaN or Inf"
    return ""


def _as_rng_state(state: Any) -> tuple:
    """``random.getstate()`` survives torch.save as nested lists/tuples; setstate needs tuples."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
