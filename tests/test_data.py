"""Data sources, the CIFAR-10 checks, partitioning and decoding, on real images."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fedcifar import data
from fedcifar.config import ConfigError
from fedcifar.data import DataError, load_full, load_partition, load_split, resident_partition, resolve_source


@pytest.fixture(autouse=True)
def _fresh_caches():
    data.load_split.cache_clear()
    data.load_partition.cache_clear()


def test_default_source_is_the_hub():
    assert resolve_source(None) == data.DataSource("hub", "uoft-cs/cifar10")


def test_env_var_selects_local_data(monkeypatch, mini_dir):
    monkeypatch.setenv("FEDCIFAR_DATA", str(mini_dir))
    source = resolve_source(None)
    assert source.kind == "parquet" and source.train_files[0].endswith("train.parquet")


def test_parquet_folder_loads_real_cifar10(mini_dir):
    source = resolve_source(mini_dir)
    train, test = load_full(source, "train"), load_full(source, "test")
    assert (len(train), len(test)) == (500, 200)
    assert train.images.shape == (500, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [50] * 10
    # the first train image of CIFAR-10 is a frog (label 6), the first test image a cat (3)
    assert (int(train.labels[0]), int(test.labels[0])) == (6, 3)


def test_hub_shard_layout_is_accepted(tmp_path, mini_dir):
    shards = tmp_path / "plain_text"
    shards.mkdir()
    shutil.copy(mini_dir / "train.parquet", shards / "train-00000-of-00001.parquet")
    shutil.copy(mini_dir / "test.parquet", shards / "test-00000-of-00001.parquet")
    source = resolve_source(tmp_path)
    assert source.kind == "parquet"
    assert len(load_full(source, "test")) == 200


def test_torchvision_python_batches_match_the_parquet_pixels(tmp_path, mini_dir):
    """A cifar-10-batches-py folder (torchvision's download) gives the same tensors."""
    parquet = resolve_source(mini_dir)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train, test = load_full(parquet, "train"), load_full(parquet, "test")
    chunks = np.array_split(np.arange(len(train)), 5)
    for i, idx in enumerate(chunks, start=1):
        _write_batch(folder / f"data_batch_{i}", train.images[idx], train.labels[idx])
    _write_batch(folder / "test_batch", test.images, test.labels)
    source = resolve_source(tmp_path)  # the parent folder works too
    assert source.kind == "cifar-python"
    again = load_full(source, "train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


def _write_batch(path, images, labels, protocol=pickle.DEFAULT_PROTOCOL):
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"data": images.reshape(len(images), -1).numpy(),
        b"labels": labels.tolist(),
        b"filenames": [b"x.png"] * len(labels),
    }  # as in the real batches
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)


class RunsCode:
    """A pickle payload: loading it calls a function of the file's choosing (here: creates a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_python_batches_load_with_every_pickle_protocol(tmp_path, mini_dir, protocol):
    test = load_full(resolve_source(mini_dir), "test")
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_batch(tmp_path / name, test.images, test.labels, protocol)
    assert torch.equal(load_full(resolve_source(tmp_path), "test").images, test.images)


def test_a_python_batch_that_would_run_code_is_refused(tmp_path, mini_dir):
    test = load_full(resolve_source(mini_dir), "test")
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        _write_batch(tmp_path / name, test.images, test.labels)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": RunsCode(tmp_path / "pwned"), b"labels": [0]}, fh)
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR-10 python batch \(it asks to load posix.system"):
        load_full(resolve_source(tmp_path), "test")
    assert not (tmp_path / "pwned").exists()


def test_missing_path_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist.*--data PATH"):
        resolve_source(tmp_path / "nope")


def test_a_file_is_not_a_data_folder(mini_dir):
    with pytest.raises(DataError, match="is a file; pass the folder"):
        resolve_source(mini_dir / "train.parquet")


def test_folder_without_cifar10_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="does not look like CIFAR-10: no train and test split"):
        resolve_source(tmp_path)


def test_parquet_with_other_columns_is_refused(tmp_path, mini_dir):
    table = pq.read_table(mini_dir / "test.parquet").rename_columns(["image", "fine_label"])
    for split in ("train", "test"):
        pq.write_table(table.replace_schema_metadata(None), tmp_path / f"{split}.parquet")
    with pytest.raises(DataError, match="not CIFAR-10's 'img' and 'label'"):
        load_split(resolve_source(tmp_path), "train")


def test_offline_without_local_data_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(data.datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="Could not load uoft-cs/cifar10.*Offline\\? Pass --data PATH"):
        load_split(resolve_source(None), "test")


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_the_split(mini_dir, partitioner):
    source = resolve_source(mini_dir)
    parts = [load_partition(source, "train", i, 3, partitioner, 0.5, 42) for i in range(3)]
    assert sum(len(p) for p in parts) == 500
    seen = torch.cat([p.images.reshape(len(p), -1) for p in parts])
    assert len(torch.unique(seen, dim=0)) == 500  # every image exactly once
    if partitioner == "iid":
        assert sorted(len(p) for p in parts) == [166, 167, 167]


def test_partitioning_is_deterministic(mini_dir):
    source = resolve_source(mini_dir)
    a = load_partition(source, "train", 1, 4, "dirichlet", 0.3, 7)
    data.load_partition.cache_clear()
    data.load_split.cache_clear()
    b = load_partition(source, "train", 1, 4, "dirichlet", 0.3, 7)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


def test_resident_partition_is_decoded_and_moved_once(mini_dir):
    """The trainer's partition stays on its device between messages; on the CPU it is no copy."""
    source, cpu = resolve_source(mini_dir), torch.device("cpu")
    resident = resident_partition(cpu, source, "train", 1, 2)
    assert resident_partition(cpu, source, "train", 1, 2) is resident
    decoded = load_partition(source, "train", 1, 2)  # the call resident_partition makes
    assert resident.images is decoded.images and resident.labels is decoded.labels
    assert resident_partition(cpu, source, "train", 0, 2).labels.tolist() != resident.labels.tolist()


def test_dirichlet_skews_labels(mini_dir):
    source = resolve_source(mini_dir)
    iid = load_partition(source, "train", 0, 2, "iid")
    skewed = load_partition(source, "train", 0, 2, "dirichlet", 0.1, 42)
    spread = lambda p: torch.bincount(p.labels, minlength=10).float().std().item()  # noqa: E731
    assert spread(skewed) > 2 * spread(iid)


def test_partition_out_of_range_is_refused(mini_dir):
    source = resolve_source(mini_dir)
    with pytest.raises(ConfigError, match="partition-id must be an integer in \\[0, 1\\]"):
        load_partition(source, "train", 2, 2)
    with pytest.raises(ConfigError, match="num-partitions must be an integer >= 1"):
        load_partition(source, "train", 0, 0)


def test_more_partitions_than_examples_is_refused(mini_dir):
    with pytest.raises(DataError, match="num-partitions=300 exceeds the 200 examples"):
        load_partition(resolve_source(mini_dir), "test", 0, 300)
