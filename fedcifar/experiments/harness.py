"""What the experiments share (``bench``, ``soak``, ``niid-bench``): a subset of the data both apps
read, a local federation run to its end, the machine the figures come from, the output folder."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedcifar.common import procfs
from fedcifar.data import DataError, load_split, resolve_source
from fedcifar.local.federation import LocalFederation

console = Console(stderr=True)
PROJECT = Path(__file__).resolve().parents[2]
STOCK_APP = PROJECT / "benchmarks" / "stock_app"


def make_subset(data: str | None, train: int, test: int, dest: Path) -> Path:
    """The first ``train``/``test`` images of each split, as a parquet folder both apps read."""
    source = resolve_source(data)
    if source.kind == "cifar-python":
        raise DataError(
            "fedcifar bench needs parquet data (uoft-cs/cifar10 schema) or the hub, not cifar-10-batches-py"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        full = load_split(source, split)
        if count > len(full):
            raise DataError(f"asked for {count} {split} images, the data has {len(full)}")
        full.select(range(count)).to_parquet(str(dest / f"{split}.parquet"))
    return dest


def run_federation(
    stock: bool, clients: int, data: Path, out: Path, run_config: dict[str, Any], signed: bool = True
) -> tuple[dict, dict]:
    app = STOCK_APP if stock else PROJECT
    label = "stock" if stock else "fedcifar"
    local = LocalFederation(clients=clients, app_dir=app, work_dir=out, data=str(data), stock=stock, signed=signed)
    with local as fed:
        run_id = fed.submit({**run_config, "out-dir": str(out)})
        history = fed.follow(
            run_id,
            out,
            lambda r: console.print(
                f"  {label} round {r['round']}: {r['round_seconds']:.2f}s, "
                f"eval accuracy {100 * r['eval_accuracy']:.2f}%"
            ),
        )
        fed.sample_memory()
        return history, dict(fed.peak_rss)


def machine() -> str:
    """Where the figures come from: the same code runs ~3x slower on some 2-core CPUs than on others."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in procfs.cpu_info() if line.startswith("model name")), "")
    cpu = f"{model}, " if model else ""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{platform.machine()}, {cpu}{os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), "
        f"Python {platform.python_version()}{gpu}"
    )


def timestamped_out(base: Path | None) -> Path:
    return (base or Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
