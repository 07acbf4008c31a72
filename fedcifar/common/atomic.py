"""Files replaced whole: written to a temporary file beside the target, flushed to disk, then
renamed over it (``os.replace``), so a crash never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path, suffix: str = "", mode: int = 0o666) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to (``suffix``: for writers that choose the
    format by extension); it replaces ``path`` when the block ends without an error. ``mode``: the
    file's permissions, less the umask (as a plain write gives them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
    tmp.touch(mode=mode, exist_ok=False)  # less the umask, as open() would
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, payload: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(payload)
    return path
