"""Small filesystem helpers shared by every module that writes results."""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["GzipDamaged", "gunzip_blocks", "write_json_atomic", "write_text_atomic"]


class GzipDamaged(ValueError):
    """A gzip stream that cannot be decompressed; ``truncated`` when it ends before its last member does."""

    def __init__(self, reason: str, *, truncated: bool = False) -> None:
        super().__init__(reason)
        self.truncated = truncated


def gunzip_blocks(fh: BinaryIO, *, size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed blocks of a gzip stream read from ``fh``, checked to its very end.

    Handles multi-member streams (bgzip, concatenated files). Python's ``gzip`` module accepts a
    stream cut at a member boundary and reports some damage late; this raises
    :class:`GzipDamaged` on damaged data and on a stream whose last member has no end marker
    (an interrupted download).
    """
    d = zlib.decompressobj(wbits=31)
    member_open = False
    while block := fh.read(size):
        while block:
            try:
                out = d.decompress(block)
            except zlib.error as exc:
                raise GzipDamaged(f"damaged gzip data: {exc}") from exc
            member_open = True
            if out:
                yield out
            if d.eof:  # one member ended; another may follow in the same block
                block, d, member_open = d.unused_data, zlib.decompressobj(wbits=31), False
            else:
                block = b""
    if member_open:
        raise GzipDamaged("the gzip stream is truncated", truncated=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync and rename.

    Readers see the old file or the new one, never half of one, and a crash leaves at most a
    ``.tmp`` file behind: this is what makes every task safe to clear and re-run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
