"""CIFAR-10 loading and partitioning, shared by the federated and centralized paths.

Where the data comes from, in order of precedence:

1. an explicit path (``--data PATH``, or the SuperNode's node config ``data-path``);
2. the ``FEDCIFAR_DATA`` environment variable;
3. the Hugging Face Hub dataset ``uoft-cs/cifar10`` (needs internet, cached afterwards).

A path is either a folder of parquet files in the ``uoft-cs/cifar10`` schema
(``train.parquet`` + ``test.parquet``, or the Hub's ``train-*.parquet`` shards), or
the ``cifar-10-batches-py`` folder that torchvision's ``CIFAR10(download=True)`` leaves.

Every source becomes a ``datasets.Dataset`` with ``img`` and ``label`` columns, which is
split by a flwr-datasets partitioner and then decoded once into uint8 tensors
(N, 3, 32, 32): normalisation happens per batch on the training device.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedcifar.config import PARTITIONERS, check_partition

HUB_DATASET = "uoft-cs/cifar10"
DATA_ENV = "FEDCIFAR_DATA"
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SPLITS = ("train", "test")
_HOW_TO_FIX = (
    f"Pass --data PATH (or set {DATA_ENV}) to a folder holding train.parquet and "
    f"test.parquet in the {HUB_DATASET} schema, or to a cifar-10-batches-py folder."
)


class DataError(ValueError):
    """The data cannot be used; the message says what to do about it."""


@dataclass(frozen=True)
class DataSource:
    """Where CIFAR-10 is read from: ``kind`` is 'hub', 'parquet' or 'cifar-python'."""

    kind: str
    location: str
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.kind}:{self.location}"


@dataclass(frozen=True)
class ImageTensors:
    """Decoded images (uint8, N x 3 x 32 x 32) and their labels (int64, N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> ImageTensors:
        return ImageTensors(self.images.to(device), self.labels.to(device))


def resolve_source(path: str | os.PathLike | None = None) -> DataSource:
    """Find the data: an explicit path, then ``FEDCIFAR_DATA``, then the Hub."""
    chosen = str(path) if path else os.environ.get(DATA_ENV, "")
    if not chosen:
        return DataSource("hub", HUB_DATASET)
    root = Path(chosen).expanduser().resolve()
    if not root.exists():
        raise DataError(f"Data path {root} does not exist. {_HOW_TO_FIX}")
    if root.is_file():
        raise DataError(f"Data path {root} is a file; pass the folder that holds it instead. {_HOW_TO_FIX}")
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return DataSource("cifar-python", str(folder))
    train = _parquet_files(root, "train")
    test = _parquet_files(root, "test")
    if train and test:
        return DataSource("parquet", str(root), train, test)
    missing = " and ".join(s for s, f in (("train", train), ("test", test)) if not f)
    raise DataError(
        f"Data path {root} does not look like CIFAR-10: no {missing} split found "
        f"(looked for {missing}.parquet, {missing}-*.parquet and data_batch_1/test_batch). " + _HOW_TO_FIX
    )


def _parquet_files(root: Path, split: str) -> tuple[str, ...]:
    single = root / f"{split}.parquet"
    if single.is_file():
        return (str(single),)
    return tuple(str(p) for p in sorted(root.rglob(f"{split}-*.parquet")))


@lru_cache(maxsize=4)
def load_split(source: DataSource, split: str) -> datasets.Dataset:
    """Load one whole split as a ``datasets.Dataset`` with ``img`` and ``label``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source.kind == "hub":
        try:
            dataset = datasets.load_dataset(HUB_DATASET, split=split)
        except Exception as err:  # offline, no cache, hub errors: one actionable message
            raise DataError(
                f"Could not load {HUB_DATASET} from the Hugging Face Hub "
                f"({type(err).__name__}: {err}). Offline? {_HOW_TO_FIX}"
            ) from err
    elif source.kind == "parquet":
        files = source.train_files if split == "train" else source.test_files
        try:
            dataset = datasets.load_dataset("parquet", data_files={split: list(files)}, split=split)
        except Exception as err:
            raise DataError(f"Could not read parquet files {list(files)}: {err}. {_HOW_TO_FIX}") from err
    else:
        dataset = _load_cifar_python(Path(source.location), split)
    _check_is_cifar10(dataset, source, split)
    return dataset


class BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 python batch holds — a dict of bytes, ints, lists and numpy arrays —
    and nothing else: a pickle names any callable to run while loading, so a file in a data volume
    could otherwise run code on every node."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks to load {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def _load_cifar_python(folder: Path, split: str) -> datasets.Dataset:
    """Read torchvision's pickled ``cifar-10-batches-py`` batches without torchvision (nor arbitrary code)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        try:
            with open(folder / name, "rb") as fh:
                batch = BatchUnpickler(fh, encoding="bytes").load()
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(x) for x in batch[b"labels"])
        except (OSError, KeyError, TypeError, ValueError, pickle.UnpicklingError, EOFError) as err:
            raise DataError(f"{folder / name} is not a CIFAR-10 python batch ({err}). {_HOW_TO_FIX}") from err
    features = datasets.Features(
        {"img": datasets.Array3D((32, 32, 3), "uint8"), "label": datasets.ClassLabel(names=list(CLASSES))}
    )
    pixels = np.concatenate(images).transpose(0, 2, 3, 1)  # to HWC, as the Hub's images
    return datasets.Dataset.from_dict({"img": pixels, "label": labels}, features=features)


def _check_is_cifar10(dataset: datasets.Dataset, source: DataSource, split: str) -> None:
    where = f"{source.describe()} ({split} split)"
    missing = {"img", "label"} - set(dataset.column_names)
    if missing:
        raise DataError(f"{where} has columns {dataset.column_names}, not CIFAR-10's 'img' and 'label'. " + _HOW_TO_FIX)
    label = dataset.features["label"]
    if isinstance(label, datasets.ClassLabel) and tuple(label.names) != CLASSES:
        raise DataError(f"{where} has classes {label.names}, not CIFAR-10's {list(CLASSES)}. {_HOW_TO_FIX}")
    if len(dataset) == 0:
        raise DataError(f"{where} is empty. {_HOW_TO_FIX}")
    first = np.asarray(dataset.with_format("numpy")[0]["img"])
    if first.shape != (32, 32, 3):
        raise DataError(f"{where} holds images of shape {first.shape}, not 32x32 RGB. {_HOW_TO_FIX}")


def make_partitioner(kind: str, num_partitions: int, alpha: float = 0.5, seed: int = 42) -> Partitioner:
    """An IID or Dirichlet-by-label partitioner from flwr-datasets; ``dirichlet-balanced`` is
    NIID-Bench's: a client that holds its share stops drawing (``self_balancing``), each at least 10."""
    check_partition(0, num_partitions)
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind in ("dirichlet", "dirichlet-balanced"):
        if not alpha > 0:
            raise DataError(f"dirichlet-alpha must be > 0, got {alpha}")
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=10,
            self_balancing=kind == "dirichlet-balanced",
            seed=seed,
        )
    raise DataError(f"partitioner must be one of {', '.join(PARTITIONERS)}, got {kind!r}")


@lru_cache(maxsize=8)
def load_partition(
    source: DataSource,
    split: str,
    partition_id: int,
    num_partitions: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 42,
) -> ImageTensors:
    """One partition of a split, decoded to tensors (cached per process)."""
    check_partition(partition_id, num_partitions)
    cut = _partitions(
        load_split(source, split), f"the {split} split of {source.describe()}", num_partitions, partitioner, alpha, seed
    )
    return to_tensors(cut(partition_id))


def partition_sizes(
    source: DataSource, split: str, num_partitions: int, partitioner: str = "iid", alpha: float = 0.5, seed: int = 42
) -> tuple[int, ...]:
    """How many examples each partition of a split holds, as ``load_partition`` cuts them: from the
    labels alone (a Dirichlet split draws by label), so no image is decoded."""
    check_partition(0, num_partitions)
    labels = load_split(source, split).select_columns(["label"])
    cut = _partitions(labels, f"the {split} split of {source.describe()}", num_partitions, partitioner, alpha, seed)
    return tuple(len(cut(i)) for i in range(num_partitions))


def _partitions(
    dataset: datasets.Dataset, where: str, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> Callable[[int], datasets.Dataset]:
    """How ``dataset`` is cut into ``num_partitions``: partition id -> its rows."""
    if num_partitions > len(dataset):
        raise DataError(
            f"num-partitions={num_partitions} exceeds the {len(dataset)} examples of {where}: "
            "use fewer clients or more data."
        )
    if num_partitions == 1:
        return lambda _: dataset
    splitter = make_partitioner(partitioner, num_partitions, alpha, seed)
    splitter.dataset = dataset
    return splitter.load_partition


@lru_cache(maxsize=8)
def resident_partition(device: torch.device, *partition: Any) -> ImageTensors:
    """``load_partition(*partition)`` kept on ``device``: a GPU gets it once, not once per message."""
    return load_partition(*partition).to(device)


def load_full(source: DataSource, split: str) -> ImageTensors:
    """A whole split as tensors (centralized training and server-side evaluation)."""
    return load_partition(source, split, 0, 1)


def to_tensors(dataset: datasets.Dataset) -> ImageTensors:
    if len(dataset) == 0:
        return ImageTensors(torch.empty((0, 3, 32, 32), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    columns = dataset.with_format("numpy")[:]
    images = torch.from_numpy(np.ascontiguousarray(columns["img"], dtype=np.uint8))
    labels = torch.from_numpy(np.asarray(columns["label"], dtype=np.int64))
    return ImageTensors(images.permute(0, 3, 1, 2).contiguous(), labels)
