"""How fedcifar changes Flower: ``replace`` one attribute of one of Flower's modules or classes, after
checking that it is there, so that on a Flower release that renamed or moved it the change fails
loudly when its process starts instead of silently doing nothing."""

from __future__ import annotations

import types
from typing import Any

VERIFIED_FLWR = "1.42"  # the Flower release these changes were read against and tested on


class FlowerChanged(RuntimeError):
    """What fedcifar changes in Flower is not where it was in the release it was verified on."""


def replace(owner: Any, name: str, new: Any) -> Any:
    """Set ``owner.name`` to ``new`` and return what it was; FlowerChanged if ``owner`` has no ``name``."""
    if not hasattr(owner, name):
        where = getattr(owner, "__name__", type(owner).__name__)
        raise FlowerChanged(
            f"{where}.{name} is gone: fedcifar's change to it was verified on flwr {VERIFIED_FLWR}.*; "
            f"install flwr=={VERIFIED_FLWR}.* (pip install -e .)"
        )
    old = getattr(owner, name)
    setattr(owner, name, new)
    return old


def module_view(module: types.ModuleType, **changed: Any) -> types.SimpleNamespace:
    """``module`` as one of Flower's modules will see it: the same names, ``changed`` ones replaced."""
    public = {name: getattr(module, name) for name in dir(module) if not name.startswith("__")}
    missing = sorted(set(changed) - set(public))
    if missing:
        raise FlowerChanged(f"{module.__name__} has no {', '.join(missing)}")
    return types.SimpleNamespace(**{**public, **changed})


def replace_defaults(function: Any, **defaults: Any) -> dict[str, Any]:
    """Change keyword-only defaults of ``function`` and return what they were; FlowerChanged if it has
    no such parameter."""
    current = function.__kwdefaults__ or {}
    missing = sorted(set(defaults) - set(current))
    if missing:
        raise FlowerChanged(
            f"{function.__module__}.{function.__qualname__} has no keyword {', '.join(missing)} "
            f"(verified on flwr {VERIFIED_FLWR}.*)"
        )
    old = {key: current[key] for key in defaults}
    current.update(defaults)
    return old
