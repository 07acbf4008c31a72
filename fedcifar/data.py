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

Every file in a data volume is untrusted. A parquet image is the ``{bytes, path}`` pair of
``datasets.Image``, and ``datasets`` opens the path (a local file, or a URL it fetches) when the
bytes are missing. So images are decoded here, by Pillow, from the PNG bytes inside the file and
nothing else: ``load_split`` refuses, naming the row, any row without bytes, with a path, or whose
PNG header is not 32x32 8-bit RGB, and any label outside 0-9; ``to_tensors`` decodes a partition's
images and refuses any that does not decode as such, before it can reach a model.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
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
DATASET_SPLITS = ("train", "test")
_HOW_TO_FIX = (
    f"Pass --data PATH (or set {DATA_ENV}) to a folder holding train.parquet and "
    f"test.parquet in the {HUB_DATASET} schema, or to a cifar-10-batches-py folder."
)
_PNG_HEADER = (
    b"\x89PNG\r\n\x1a\n"  # the PNG signature, then the header chunk a PNG must start with:
    + b"\x00\x00\x00\x0dIHDR"
    + (32).to_bytes(4, "big") * 2  # width 32, height 32,
    + b"\x08\x02\x00\x00"  # 8 bits per channel, colour type 2 (RGB), deflate, adaptive filtering
)
_PNG_COLOURS = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
_REFUSES_PATHS = "fedcifar never opens a path or URL that a data file names"
_FIX_IMAGES = (
    "Rewrite the file with each image's 32x32 RGB PNG bytes in its 'img' column "
    f"(as {HUB_DATASET}'s parquet files hold them), or drop those rows."
)
_FIX_LABELS = f"Give each row a class number 0-9 ({', '.join(CLASSES)}), or drop those rows."
_ROW = "fedcifar-row"  # the row of the split, which load_partition adds to name rows in messages


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
    if split not in DATASET_SPLITS:
        raise ValueError(f"split must be one of {DATASET_SPLITS}, got {split!r}")
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
    return dataset.select_columns(["img", "label"])


def _row_namer(dataset: datasets.Dataset, source: DataSource | None, split: str | None) -> Callable[[int], str]:
    """Names row ``k`` of ``dataset`` for a message: by its file and row there where the source is
    parquet files (datasets reads them in order), else by its row in the split. A partition knows
    the rows of the split it holds by the ``_ROW`` column ``load_partition`` adds before cutting."""

    def name(k: int) -> str:
        row = int(dataset.with_format("arrow")[_ROW][k].as_py()) if _ROW in dataset.column_names else k
        if source is None:
            return f"Row {row} of the data"
        where = f"the {split} split of {source.describe()}"
        if source.kind == "parquet":
            start = 0
            for file in source.train_files if split == "train" else source.test_files:
                try:
                    count = pq.ParquetFile(file).metadata.num_rows
                except (OSError, pa.ArrowException):
                    break
                if row < start + count:
                    return f"Row {row - start} of {file} ({where})"
                start += count
        return f"Row {row} of {where}"

    return name


def _refuse_rows(bad: np.ndarray, name_row: Callable[[int], str], problem: Callable[[int], str], fix: str) -> None:
    """Raise a DataError naming the first row of ``bad`` (a mask), what is wrong with it and what to do."""
    rows = np.flatnonzero(bad)
    if len(rows):
        raise _row_error(name_row(int(rows[0])), problem(int(rows[0])), fix, len(rows) - 1)


def _row_error(row: str, problem: str, fix: str, more: int = 0) -> DataError:
    also = f"; {more} more row{'s are' if more > 1 else ' is'} refused too" if more else ""
    return DataError(f"{row} {problem}{also}. {fix} {_HOW_TO_FIX}")


def _checked_png_bytes(images: pa.ChunkedArray, name_row: Callable[[int], str]) -> pa.ChunkedArray:
    """The PNG bytes of every image of an ``Image`` column (its arrow storage, nothing decoded), once
    every row is seen to hold bytes, no path, and a PNG header that says 32x32 8-bit RGB."""
    blobs = pc.struct_field(images, "bytes")  # null where the image or its bytes are
    paths = pc.struct_field(images, "path")
    header = pc.binary_slice(blobs, 0, len(_PNG_HEADER))
    png = pc.fill_null(pc.equal(header, pa.scalar(_PNG_HEADER, header.type)), False)
    ok = pc.and_(pc.and_(pc.is_valid(blobs), pc.is_null(paths)), png)
    _refuse_rows(~ok.to_numpy(), name_row, lambda k: _image_problem(images[k].as_py()), _FIX_IMAGES)
    return blobs


def _image_problem(image: dict | None) -> str:
    if image is None or (image["bytes"] is None and image["path"] is None):
        return "has no image bytes"
    path = repr((image["path"] or "")[:200]) + ("..." if len(image["path"] or "") > 200 else "")  # it is untrusted
    if image["bytes"] is None:
        return f"has no image bytes but a path ({path}), and {_REFUSES_PATHS}"
    if image["path"] is not None:
        return f"names a path ({path}) beside its image bytes, and {_REFUSES_PATHS}"
    blob = image["bytes"]
    if blob[:16] != _PNG_HEADER[:16] or len(blob) < len(_PNG_HEADER):
        return "is not a 32x32 RGB PNG (not a PNG)"
    if blob[: len(_PNG_HEADER) - 2] == _PNG_HEADER[:-2]:  # what differs is the next two bytes
        return "is not a 32x32 RGB PNG (a PNG of an unknown compression or filter method)"
    width, height = int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")
    depth, colour = blob[24], _PNG_COLOURS.get(blob[25], f"colour type {blob[25]}")
    bits = f" of {depth} bits per channel" if depth != 8 else ""
    return f"is not a 32x32 RGB PNG (a {width}x{height} {colour} PNG{bits})"


def _checked_labels(labels: pa.ChunkedArray, where: str, name_row: Callable[[int], str]) -> np.ndarray:
    """The labels as int64, once each is seen to be a class number 0-9."""
    if not pa.types.is_integer(labels.type):
        raise DataError(f"{where} has labels of type {labels.type}, not class numbers 0-9. {_HOW_TO_FIX}")
    ok = pc.fill_null(pc.and_(pc.greater_equal(labels, 0), pc.less(labels, len(CLASSES))), False)
    _refuse_rows(
        ~ok.to_numpy(),
        name_row,
        lambda k: f"has label {labels[k].as_py()}, not a class 0-9",
        _FIX_LABELS,
    )
    return labels.to_numpy().astype(np.int64)


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
            batch_labels = [int(x) for x in batch[b"labels"]]
            if len(batch_labels) != len(images[-1]):
                raise ValueError(f"{len(batch_labels)} labels for {len(images[-1])} images")
            for at, label in enumerate(batch_labels):
                if not 0 <= label < len(CLASSES):
                    raise ValueError(f"label {label} at position {at}, not a class 0-9")
            labels.extend(batch_labels)
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
    image = dataset.features["img"]
    name_row = _row_namer(dataset, source, split)
    if source.kind == "cifar-python":  # built above from checked batches: pixels already
        if image != datasets.Array3D((32, 32, 3), "uint8"):
            raise DataError(f"{where} holds images of {image}, not 32x32 RGB. {_HOW_TO_FIX}")
    elif isinstance(image, datasets.Image):
        _checked_png_bytes(dataset.with_format("arrow")["img"], name_row)  # every row, not the first only
    else:
        raise DataError(f"{where} has an 'img' column of {image}, not PNG images. {_HOW_TO_FIX}")
    _checked_labels(dataset.with_format("arrow")["label"], where, name_row)


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
    rows = load_split(source, split)
    rows = rows.add_column(_ROW, np.arange(len(rows)))  # so that a message names the split's row
    cut = _partitions(rows, f"the {split} split of {source.describe()}", num_partitions, partitioner, alpha, seed)
    return to_tensors(cut(partition_id), source, split)


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


def to_tensors(dataset: datasets.Dataset, source: DataSource | None = None, split: str | None = None) -> ImageTensors:
    """Decode ``dataset`` (rows of ``split`` of ``source``, which name rows in messages) into tensors.

    PNG images are decoded by Pillow from the bytes in the data and from nothing else, each checked
    to be 32x32 RGB: ``datasets``' own decoding would open the path a row names when its bytes are
    missing. The rows are checked again here, so a dataset that did not come from ``load_split`` is
    refused alike."""
    if len(dataset) == 0:
        return ImageTensors(torch.empty((0, 3, 32, 32), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    name_row = _row_namer(dataset, source, split)
    where = f"the {split} split of {source.describe()}" if source is not None else "the data"
    image = dataset.features.get("img")
    if isinstance(image, datasets.Image):
        pixels = _decode_pngs(_checked_png_bytes(dataset.with_format("arrow")["img"], name_row), name_row)
    elif image == datasets.Array3D((32, 32, 3), "uint8"):  # a cifar-10-batches-py folder's pixels
        pixels = np.ascontiguousarray(dataset.with_format("numpy")["img"], dtype=np.uint8)
    else:
        raise DataError(f"{where} has an 'img' column of {image}, not PNG images. {_HOW_TO_FIX}")
    labels = _checked_labels(dataset.with_format("arrow")["label"], where, name_row)
    return ImageTensors(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))


def _decode_pngs(blobs: pa.ChunkedArray, name_row: Callable[[int], str]) -> np.ndarray:
    """Decode PNG bytes into (N, 32, 32, 3) uint8 pixels, refusing any image that is not 32x32 RGB."""
    pixels = np.empty((len(blobs), 32, 32, 3), dtype=np.uint8)
    k = 0
    for chunk in blobs.chunks:
        for blob in chunk.to_pylist():
            try:
                with PIL.Image.open(io.BytesIO(blob), formats=["PNG"]) as image:
                    if image.size != (32, 32) or image.mode != "RGB":
                        raise ValueError(f"it is {image.size[0]}x{image.size[1]} {image.mode}")
                    pixels[k] = np.asarray(image)
            except Exception as err:  # Pillow raises many types at a broken file; each means the same here
                why = "Pillow cannot read it" if isinstance(err, PIL.UnidentifiedImageError) else f"{err}"
                raise _row_error(name_row(k), f"does not decode as a 32x32 RGB PNG ({why})", _FIX_IMAGES) from err
            k += 1
    return pixels
