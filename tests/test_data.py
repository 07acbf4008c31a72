"""Data sources, the CIFAR-10 checks, partitioning and decoding, on real images."""

from __future__ import annotations

import http.server
import io
import os
import pickle
import re
import shutil
import sys
import threading

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
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


# --- a data volume is untrusted: images come only from the bytes inside the file -------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with a valid 32x32 RGB PNG and records it: a fetch would succeed."""

    seen: list[str]
    png: bytes

    def do_HEAD(self):  # noqa: N802 (http.server's name)
        self.seen.append(f"HEAD {self.path}")
        self._headers()

    def do_GET(self):  # noqa: N802
        self.seen.append(f"GET {self.path}")
        self._headers()
        self.wfile.write(self.png)

    def _headers(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()

    def log_message(self, *_args):
        pass


@pytest.fixture
def web(monkeypatch):
    """A local HTTP server that records every request made to it: (base URL, requests seen)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    seen: list[str] = []
    handler = type("Handler", (_Recorder,), {"seen": seen, "png": _png((32, 32), "RGB")})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()
    thread.join()


_OPENED: list[str] | None = None


def _record_reads(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        if not (args[2] or 0) & (os.O_WRONLY | os.O_RDWR):
            _OPENED.append(os.fspath(args[0]))


@pytest.fixture
def opened():
    """The paths this process opens for reading during the test (an audit hook, a no-op outside it)."""
    global _OPENED
    if not getattr(sys, "_fedcifar_open_hook", False):
        sys.addaudithook(_record_reads)
        sys._fedcifar_open_hook = True
    _OPENED = []
    yield _OPENED
    _OPENED = None


def _png(size, mode, fmt="PNG"):
    buffer = io.BytesIO()
    PIL.Image.new(mode, size, color=7 if mode in ("L", "P") else None).save(buffer, format=fmt)
    return buffer.getvalue()


def _folder_with(tmp_path, mini_dir, rows=None, labels=None, shards=1):
    """A parquet folder: the mini train split with some ``img`` (or ``label``) values replaced, the
    HF schema kept, and the mini test split beside it. Returns the train files."""
    table = pq.read_table(mini_dir / "train.parquet")
    if rows:
        images = table.column("img").to_pylist()
        for row, value in rows.items():
            images[row] = value
        table = table.set_column(0, "img", pa.array(images, type=table.schema.field("img").type))
    if labels:
        values = table.column("label").to_pylist()
        for row, value in labels.items():
            values[row] = value
        table = table.set_column(1, "label", pa.array(values, type=pa.int64()))
    shutil.copy(mini_dir / "test.parquet", tmp_path / "test.parquet")
    if shards == 1:
        pq.write_table(table, tmp_path / "train.parquet")
        return [tmp_path / "train.parquet"]
    files, step = [], -(-len(table) // shards)
    for i in range(shards):
        files.append(tmp_path / f"train-{i:05d}-of-{shards:05d}.parquet")
        pq.write_table(table.slice(i * step, step), files[-1])
    (tmp_path / "test.parquet").rename(tmp_path / "test-00000-of-00001.parquet")
    return files


def test_rows_that_point_at_urls_or_files_are_refused_and_nothing_is_fetched(tmp_path, mini_dir, web, opened):
    """The issue's case: rows 0.. are real, rows 123 and 321 name a URL, row 200 a local PNG file."""
    base, seen = web
    local = tmp_path / "elsewhere.png"
    local.write_bytes(_png((32, 32), "RGB"))
    train, *_ = _folder_with(
        tmp_path,
        mini_dir,
        {
            123: {"bytes": None, "path": f"{base}/x.png"},
            200: {"bytes": None, "path": str(local)},
            321: {"bytes": None, "path": f"{base}/y.png"},
        },
    )
    source = resolve_source(tmp_path)
    sentence = (
        rf"Row 123 of {re.escape(str(train))} \(the train split of parquet:.*\) has no image bytes but a path "
        rf"\('{re.escape(base)}/x\.png'\), and fedcifar never opens a path or URL that a data file names; "
        r"2 more rows are refused too\. Rewrite the file with each image's "
        r"32x32 RGB PNG bytes in its 'img' column \(as uoft-cs/cifar10's parquet files hold them\), or drop "
        r"those rows\. Pass --data PATH"
    )
    with pytest.raises(DataError, match=sentence):
        load_full(source, "train")  # the decode that fetched the URL and opened the file
    with pytest.raises(DataError, match=sentence):
        load_partition(source, "train", 1, 2, "dirichlet")
    # to_tensors checks on its own too: a dataset that skipped load_split is refused alike
    raw = datasets.load_dataset("parquet", data_files={"train": [str(train)]}, split="train")
    with pytest.raises(DataError, match=r"Row 123 of the data has no image bytes but a path"):
        data.to_tensors(raw)
    assert seen == []  # no HEAD, no GET
    assert str(local) not in opened


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ({"bytes": None, "path": "URL"}, r"has no image bytes but a path \('http://127\.0\.0\.1:\d+/x\.png'\)"),
        ({"bytes": None, "path": "LOCAL"}, r"has no image bytes but a path \('.*elsewhere\.png'\)"),
        ({"bytes": None, "path": "x.png"}, r"has no image bytes but a path \('x\.png'\)"),
        ({"bytes": None, "path": None}, r"has no image bytes"),
        (None, r"has no image"),
        ({"bytes": "PNG", "path": "URL"}, r"names a path \('http://127\.0\.0\.1:\d+/x\.png'\) beside its image"),
    ],
    ids=["url", "local-file", "relative-name", "no-bytes", "null-image", "bytes-and-url"],
)
def test_a_row_with_a_path_or_without_bytes_is_refused_by_name(tmp_path, mini_dir, web, opened, image, problem):
    base, seen = web
    local = tmp_path / "elsewhere.png"
    local.write_bytes(_png((32, 32), "RGB"))
    if image is not None:
        path = {"URL": f"{base}/x.png", "LOCAL": str(local)}.get(image["path"], image["path"])
        image = {"bytes": _png((32, 32), "RGB") if image["bytes"] else None, "path": path}
    train, *_ = _folder_with(tmp_path, mini_dir, {250: image})
    with pytest.raises(DataError, match=rf"Row 250 of {re.escape(str(train))} \(the train split .*\) {problem}"):
        load_full(resolve_source(tmp_path), "train")
    assert seen == [] and str(local) not in opened


@pytest.mark.parametrize(
    ("blob", "what"),
    [
        (_png((64, 64), "RGB"), "a 64x64 RGB PNG"),
        (_png((32, 32), "L"), "a 32x32 grayscale PNG"),
        (_png((32, 32), "RGBA"), "a 32x32 RGBA PNG"),
        (_png((32, 32), "P"), "a 32x32 palette PNG"),
        (_png((32, 32), "RGB", "JPEG"), "not a PNG"),
        (b"GIF89a" + bytes(100), "not a PNG"),
        (b"", "not a PNG"),
    ],
    ids=["64x64", "grayscale", "rgba", "palette", "jpeg", "gif-header", "empty"],
)
def test_an_image_that_is_not_32x32_rgb_png_is_refused_by_row(tmp_path, mini_dir, blob, what):
    train, *_ = _folder_with(tmp_path, mini_dir, {250: {"bytes": blob, "path": None}})
    with pytest.raises(DataError, match=rf"Row 250 of {re.escape(str(train))} .* is not a 32x32 RGB PNG \({what}"):
        load_split(resolve_source(tmp_path), "train")


def test_a_corrupt_png_body_is_refused_by_row_when_its_partition_is_decoded(tmp_path, mini_dir):
    """The header passes the split's check; the decode before use refuses it, naming the split's row."""
    good = pq.read_table(mini_dir / "train.parquet").column("img")[300].as_py()["bytes"]
    broken = good[:40] + bytes(len(good) - 52) + good[-12:]  # the header intact, the pixel data zeroed
    train, *_ = _folder_with(tmp_path, mini_dir, {300: {"bytes": broken, "path": None}})
    source = resolve_source(tmp_path)
    assert len(load_partition(source, "train", 0, 2)) == 250  # rows 0-249: the broken one is not in it
    with pytest.raises(DataError, match=rf"Row 300 of {re.escape(str(train))} .* does not decode as a 32x32 RGB PNG"):
        load_partition(source, "train", 1, 2)


@pytest.mark.parametrize("label", [10, -1, None])
def test_a_label_that_is_no_cifar10_class_is_refused_by_row(tmp_path, mini_dir, label):
    train, *_ = _folder_with(tmp_path, mini_dir, labels={250: label})
    with pytest.raises(DataError, match=rf"Row 250 of {re.escape(str(train))} .* has label {label}, not a class 0-9"):
        load_split(resolve_source(tmp_path), "train")


def test_a_bad_row_is_named_by_its_shard(tmp_path, mini_dir, web):
    base, seen = web
    files = _folder_with(tmp_path, mini_dir, {260: {"bytes": None, "path": f"{base}/x.png"}}, shards=2)
    with pytest.raises(DataError, match=rf"Row 10 of {re.escape(str(files[1]))} \(the train split of parquet:"):
        load_split(resolve_source(tmp_path), "train")
    assert seen == []


def test_decoding_gives_the_pixels_datasets_gives(mini_dir):
    """The decode from bytes returns exactly what datasets' own Image decoding returns."""
    split = load_split(resolve_source(mini_dir), "test")
    theirs = np.stack([np.asarray(row["img"]) for row in split]).transpose(0, 3, 1, 2)
    assert torch.equal(data.to_tensors(split).images, torch.from_numpy(theirs))


def test_a_python_batch_with_a_label_out_of_range_is_refused(tmp_path, mini_dir):
    test = load_full(resolve_source(mini_dir), "test")
    labels = test.labels.clone()
    labels[17] = 12
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        _write_batch(tmp_path / name, test.images, test.labels)
    _write_batch(tmp_path / "test_batch", test.images, labels)
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR-10 python batch \(label 12 at position 17"):
        load_full(resolve_source(tmp_path), "test")


def test_the_hub_source_and_partition_sizes_get_the_same_checks(tmp_path, mini_dir, web, monkeypatch):
    """The Hub's split goes through load_split's checks too (here the Hub is a crafted local file)."""
    base, seen = web
    train, *_ = _folder_with(tmp_path, mini_dir, {77: {"bytes": None, "path": f"{base}/x.png"}})
    load = datasets.load_dataset
    from_hub = lambda name, split: load("parquet", data_files={split: [str(train)]}, split=split)  # noqa: E731
    monkeypatch.setattr(data.datasets, "load_dataset", from_hub)
    hub = resolve_source(None)
    with pytest.raises(DataError, match=r"Row 77 of the train split of hub:uoft-cs/cifar10 has no image bytes"):
        load_partition(hub, "train", 0, 3, "dirichlet")
    with pytest.raises(DataError, match=r"Row 77 of the train split of hub:uoft-cs/cifar10 has no image bytes"):
        data.partition_sizes(hub, "train", 3)
    assert seen == []
