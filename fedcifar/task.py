"""The model and its training and evaluation loops, shared by the federated and centralized paths.

The CNN is the one from PyTorch's "Training a classifier" tutorial (the original ``cifar.py``):
conv 6 -> conv 16 -> fc 120 -> fc 84 -> fc 10. Data arrives as uint8 tensors and is normalised
per batch on the training device; the loss is accumulated on the device and read once per call,
so there is no host synchronisation per step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcifar.config import DEVICES
from fedcifar.data import ImageTensors

log = logging.getLogger(__name__)


class Net(nn.Module):
    """The PyTorch tutorial CNN for 32x32 RGB images and 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def initial_model(seed: int) -> Net:
    """The same starting weights for every run with the same seed."""
    torch.manual_seed(seed)
    return Net()


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' picks CUDA when a device is visible; asking for CUDA without one falls back to CPU."""
    if requested not in DEVICES:
        raise ValueError(f"device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        log.warning("CUDA was requested but no CUDA device is visible: training on the CPU")
    return torch.device("cpu")


def scale_pixels(images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the tutorial's Normalize((0.5,)*3, (0.5,)*3); or, not
    ``normalize``, -> [0, 1], ToTensor alone (NIID-Bench's protocol)."""
    if not normalize:
        return images.float().div_(255.0)
    return images.float().div_(127.5).sub_(1.0)


def augment(images: torch.Tensor, generator: torch.Generator, padding: str = "zeros") -> torch.Tensor:
    """Random crop from a copy padded by 4 pixels (``padding``: "zeros" or "reflect", as
    torchvision's RandomCrop(32, padding=4, padding_mode=...)) and horizontal flip, for a whole
    batch at once.

    The random draws come from a CPU generator (reproducible on every device); the pixels never
    leave the training device.
    """
    n, device = images.shape[0], images.device
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    padded = F.pad(images, (4, 4, 4, 4)) if padding == "zeros" else F.pad(images, (4, 4, 4, 4), mode="reflect")
    dy, dx = (torch.randint(0, 9, (n,), generator=generator).to(device) for _ in range(2))
    steps = torch.arange(32, device=device)
    rows = (dy[:, None] + steps)[:, None, :, None]  # n x 1 x 32 x 1
    cols = (dx[:, None] + steps)[:, None, None, :]  # n x 1 x 1 x 32
    batch = torch.arange(n, device=device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def add_proximal_gradient(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> None:
    """FedProx's proximal term (mu/2)*||w - w_global||^2 (the paper's squared norm; Flower's
    example adds the unsquared one), added as its gradient mu*(w - w_global) to each ``.grad``:
    a few fused device ops per step, no extra autograd graph and no host sync."""
    grads = [p.grad for p in params]
    torch._foreach_add_(grads, torch._foreach_sub([p.detach() for p in params], anchor), alpha=mu)


@dataclass(frozen=True)
class Recipe:
    """How a client trains: the run config's optimiser and input settings."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx; 0: none
    augmented: bool = False
    padding: str = "zeros"
    normalize: bool = True  # the run config's normalize: scale_pixels() to [-1, 1]; false: [0, 1]


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over all examples seen
    examples: int  # examples seen, epochs included
    seconds: float


def train(
    net: nn.Module,
    data: ImageTensors,
    recipe: Recipe,
    *,
    device: torch.device,
    seed: int,
    first_epoch: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """SGD with momentum over shuffled mini-batches; epoch ``first_epoch + e`` uses its own seed.

    With ``recipe.proximal_mu`` the weights are pulled towards the ones ``net`` starts from (the
    global model: FedProx). ``on_epoch(epoch, mean_loss_so_far)`` is called after each epoch (one
    host sync per epoch).
    """
    started = time.perf_counter()
    net.to(device).train()
    data = data.to(device)
    params = list(net.parameters())
    anchor = [p.detach().clone() for p in params] if recipe.proximal_mu else []
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    total_loss = torch.zeros((), device=device)
    seen = 0
    for epoch in range(first_epoch, first_epoch + recipe.epochs):
        generator = epoch_generator(seed, epoch)
        order = torch.randperm(len(data), generator=generator).to(device)
        for batch in order.split(recipe.batch_size):
            images, labels = scale_pixels(data.images[batch], recipe.normalize), data.labels[batch]
            if recipe.augmented:
                images = augment(images, generator, recipe.padding)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(images), labels)
            loss.backward()
            if recipe.proximal_mu:
                add_proximal_gradient(params, anchor, recipe.proximal_mu)
            optimizer.step()
            total_loss += loss.detach() * len(batch)
            seen += len(batch)
        if on_epoch:
            on_epoch(epoch + 1, total_loss.item() / max(seen, 1))
    mean_loss = total_loss.item() / seen if seen else float("nan")
    return TrainResult(mean_loss, seen, time.perf_counter() - started)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling order of one epoch, the same in centralized and federated training."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def evaluate(
    net: nn.Module, data: ImageTensors, device: torch.device, batch_size: int | None = None, normalize: bool = True
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (0..1) of ``net`` on ``data``; ``net`` stays trainable."""
    # on a CPU, batches of 256 keep the activations in cache: 10,000 test images took 0.18 s
    # instead of 0.33 s at 1,000 (2-core x86_64)
    batch_size = batch_size or (256 if device.type == "cpu" else 1000)
    # channels-last convolutions: the server's evaluation of 10,000 test images took 0.30 s
    # instead of 0.42 s (2-core AMD EPYC, AVX2; training was no faster). Not measured on a GPU.
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    # Moved outside inference mode: parameters converted inside it become inference tensors, and
    # the next load_state_dict into them fails (the ServerApp's model, reused every round).
    net.to(device, memory_format=layout).eval()
    try:
        with torch.inference_mode():
            return _loss_and_accuracy(net, data.to(device), batch_size, layout, normalize)
    finally:
        net.to(memory_format=torch.contiguous_format)  # the layout train() and flat_weights() expect


def _loss_and_accuracy(
    net: nn.Module, data: ImageTensors, batch_size: int, layout: torch.memory_format, normalize: bool
) -> tuple[float, float]:
    if len(data) == 0:
        return float("nan"), float("nan")
    total_loss = torch.zeros((), device=data.labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.labels.device)
    for start in range(0, len(data), batch_size):
        images = scale_pixels(data.images[start : start + batch_size], normalize).contiguous(memory_format=layout)
        labels = data.labels[start : start + batch_size]
        logits = net(images)
        total_loss += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
    return total_loss.item() / len(data), correct.item() / len(data)


# Messages carry the model as one array under this key: every weight, in state_dict order. Flower
# moves each array of an ArrayRecord as separate objects (an Array and its chunks), one HTTP
# request each on each of the six hops of a round trip: 23 objects per message for the CNN's 10
# tensors, 5 for one vector (benchmarks/RESULTS.md).
MODEL_KEY = "model"


def flat_weights(net: nn.Module) -> np.ndarray:
    """Every weight of ``net`` in one float32 vector (what a message carries under ``MODEL_KEY``)."""
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in net.state_dict().values()]).numpy()


def load_flat_weights(net: nn.Module, flat: np.ndarray) -> None:
    """The inverse of ``flat_weights``."""
    state = net.state_dict()
    sizes = [t.numel() for t in state.values()]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} weights in one vector, got an array of shape {flat.shape}")
    parts = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)).split(sizes)
    net.load_state_dict({name: part.view_as(t) for (name, t), part in zip(state.items(), parts, strict=True)})
