"""Small filesystem helpers shared by every module that writes results."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

__all__ = ["DecompressionLimit", "GzipDamaged", "discard_dir", "fsync_dir", "fsync_tree", "gunzip_blocks", "open_bounded", "owner_alive",
           "owner_tag", "partial_path", "prune_stale_temps", "write_json_atomic", "write_text_atomic"]

log = logging.getLogger(__name__)
# the owner a temporary name records: ``<pid>@<host>`` (see :func:`owner_tag`)
_OWNED_TEMP = re.compile(r"\.(?P<pid>[0-9]+)@(?P<host>[^/]+?)\.(?:partial|tmp)$")
STALE_UNOWNED_S = 24 * 3600  # a temporary name without an owner (older releases) is stale after a day


class DecompressionLimit(ValueError):
    """Decompressing (or extracting) produced more bytes than the caller allows: a bomb, or a file far
    larger than its reservation. ``limit`` and ``seen`` are the figures for the message."""

    def __init__(self, reason: str, *, limit: int, seen: int) -> None:
        super().__init__(reason)
        self.limit = limit
        self.seen = seen


class GzipDamaged(ValueError):
    """A gzip stream that cannot be decompressed; ``truncated`` when it ends before its last member does."""

    def __init__(self, reason: str, *, truncated: bool = False) -> None:
        super().__init__(reason)
        self.truncated = truncated


def gunzip_blocks(fh: BinaryIO, *, size: int = 1 << 20, max_length: int = 1 << 20,
                  max_total: int | None = None) -> Iterator[bytes]:
    """Decompressed blocks of a gzip stream read from ``fh``, checked to its very end.

    Handles multi-member streams (bgzip, concatenated files). Python's ``gzip`` module accepts a
    stream cut at a member boundary and reports some damage late; this raises
    :class:`GzipDamaged` on damaged data and on a stream whose last member has no end marker
    (an interrupted download).

    Memory is bounded whatever the compression ratio: no block is longer than ``max_length``
    (a 1 MB read of a zero-filled bomb would otherwise inflate to ~1 GB at once), and
    :class:`DecompressionLimit` is raised once more than ``max_total`` bytes came out.
    """
    d = zlib.decompressobj(wbits=31)
    member_open = False
    total = 0
    while block := fh.read(size):
        while True:
            try:
                out = d.decompress(block, max_length)
            except zlib.error as exc:
                raise GzipDamaged(f"damaged gzip data: {exc}") from exc
            member_open = True
            if out:
                total += len(out)
                if max_total is not None and total > max_total:
                    raise DecompressionLimit(f"decompresses to over {max_total} bytes (the limit)",
                                             limit=max_total, seen=total)
                yield out
            if d.eof:  # one member ended; another may follow in the same block
                block, d, member_open = d.unused_data, zlib.decompressobj(wbits=31), False
                if not block:
                    break
                continue
            block = d.unconsumed_tail
            if not block and len(out) < max_length:  # input used up and no output held back
                break
    if member_open:
        raise GzipDamaged("the gzip stream is truncated", truncated=True)


class _Capped(io.RawIOBase):
    """A readable stream that raises :class:`DecompressionLimit` past ``limit`` bytes."""

    def __init__(self, inner: IO[bytes], limit: int, name: str) -> None:
        self._inner, self._limit, self._seen, self.name = inner, limit, 0, name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        n = self._inner.readinto(view) if hasattr(self._inner, "readinto") else 0  # type: ignore[union-attr]
        self._seen += n
        if self._seen > self._limit:
            raise DecompressionLimit(f"{self.name}: decompresses to over {self._limit} bytes (the limit)",
                                     limit=self._limit, seen=self._seen)
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


def open_bounded(path: Path, *, max_bytes: int | None, text: bool = False) -> IO[Any]:
    """Open ``path`` for streaming reads, gunzipping it when it is gzip data, never yielding more than
    ``max_bytes`` bytes (:class:`DecompressionLimit` past that; None: no limit)."""
    import gzip

    with path.open("rb") as probe:
        is_gzip = probe.read(2) == b"\x1f\x8b"
    inner: IO[bytes] = gzip.open(path, "rb") if is_gzip else path.open("rb")  # type: ignore[assignment]
    stream: IO[bytes] = inner
    if max_bytes is not None:
        stream = io.BufferedReader(_Capped(inner, max_bytes, path.name), 1 << 16)  # type: ignore[assignment]
    return io.TextIOWrapper(stream, encoding="utf-8", errors="replace") if text else stream


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync and rename.

    Readers see the old file or the new one, never half of one, and a crash leaves at most a
    ``.tmp`` file behind: this is what makes every task safe to clear and re-run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temp name records its owner so that a task start can prune it once that owner is dead
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{owner_tag()}.tmp", dir=path.parent)
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


def owner_tag() -> str:
    """``<pid>@<host>``: who owns a temporary file or folder, recorded in its name."""
    return f"{os.getpid()}@{socket.gethostname()}"


def partial_path(path: Path) -> Path:
    """A sibling of ``path`` to build it under, renamed into place when complete; its name records
    the owner (``<name>.<pid>@<host>.partial``) so a later task can tell a stale one from a live one."""
    return path.with_name(f"{path.name}.{owner_tag()}.partial")


def owner_alive(pid: int, host: str) -> bool | None:
    """Whether process ``pid`` on ``host`` runs; None when ``host`` is another machine (cannot tell)."""
    if host != socket.gethostname():
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _is_stale(path: Path, now: float, unowned_after_s: float) -> bool:
    m = _OWNED_TEMP.search(path.name)
    if m is not None:
        alive = owner_alive(int(m.group("pid")), m.group("host"))
        if alive is not None:
            return not alive
    try:  # no owner recorded, or one on another host: stale only when old
        return now - path.lstat().st_mtime > unowned_after_s
    except FileNotFoundError:
        return False


def prune_stale_temps(root: Path, *, unowned_after_s: float = STALE_UNOWNED_S) -> list[Path]:
    """Delete leftover ``*.tmp`` / ``*.partial`` files and folders under ``root`` whose owner is dead.

    A kill leaves them behind; they count against the disk budget until removed. One owned by a
    live process (this one included) is kept; one without an owner, or owned on another host, only
    goes once older than ``unowned_after_s``. Returns what was deleted.
    """
    if not root.is_dir():
        return []
    now, gone = time.time(), []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            if not name.endswith((".tmp", ".partial")):
                continue
            path = here / name
            if not _is_stale(path, now, unowned_after_s):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                dirnames.remove(name)
            else:
                path.unlink(missing_ok=True)
            log.info("removed stale temporary %s (its owner is gone)", path)
            gone.append(path)
    return gone


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself), then the folders: what a rename of it then
    publishes is on disk, not only in the page cache."""
    paths = [path] if path.is_file() else sorted(path.rglob("*"))
    for p in paths:
        if p.is_file() and not p.is_symlink():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
    for d in ([path] if path.is_dir() else []) + [p for p in paths if p.is_dir()]:
        fsync_dir(d)


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries: a rename into it, a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard_dir(path: Path) -> None:
    """Delete a folder so that no kill leaves it half-deleted under its own name.

    It is first renamed to an owner-named temporary sibling (atomic), then removed; a kill during
    the removal leaves only that temporary, which :func:`prune_stale_temps` deletes later, never a
    half folder that a reader would take for a whole one.
    """
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.{owner_tag()}.tmp")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
