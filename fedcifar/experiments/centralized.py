"""The centralized baseline: what the original ``cifar.py`` did, on the same code as the federation.

Same model, same data loading, same training loop and seeds as a ClientApp holding the whole
training split (partition 0 of 1), so federated and centralized figures compare number for
number.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fedcifar.data import DataSource, load_full
from fedcifar.task import Recipe, evaluate, initial_model, pick_device, train


@dataclass(frozen=True)
class CentralizedResult:
    epochs: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float  # data loading, training and evaluation
    train_seconds: float
    examples: int
    # images per second after the first epoch, which pays the one-off costs (CUDA context, kernel
    # selection, caches): the warm figure a federated client's steady rounds compare against
    steady_images_per_second: float
    device: str
    data: str


def run_centralized(
    source: DataSource,
    recipe: Recipe,
    *,
    seed: int,
    device: str = "auto",
    on_epoch: Callable[[int, float], None] | None = None,
) -> CentralizedResult:
    started = time.perf_counter()
    train_data, test_data = load_full(source, "train"), load_full(source, "test")
    torch_device = pick_device(device)
    net = initial_model(seed)
    epoch_ends: list[float] = []

    def epoch_done(epoch: int, loss: float) -> None:
        epoch_ends.append(time.perf_counter())  # after train's host sync: the epoch's work is done
        if on_epoch:
            on_epoch(epoch, loss)

    result = train(net, train_data, recipe, device=torch_device, seed=seed, on_epoch=epoch_done)
    if len(epoch_ends) > 1:
        steady = len(train_data) * (len(epoch_ends) - 1) / (epoch_ends[-1] - epoch_ends[0])
    else:
        steady = result.examples / result.seconds
    test_loss, test_accuracy = evaluate(net, test_data, torch_device, normalize=recipe.normalize)
    return CentralizedResult(
        epochs=recipe.epochs,
        train_loss=result.loss,
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        seconds=time.perf_counter() - started,
        train_seconds=result.seconds,
        examples=result.examples,
        steady_images_per_second=steady,
        device=torch_device.type,
        data=source.describe(),
    )
