"""Feeding the training loop: blocks read and tokenised in DataLoader workers, steps assembled ahead.

Two stages, both optional and both without effect on the numbers (only on when work happens):

1. **Workers**: :class:`ShardBlocks` is an ``IterableDataset`` over one shard of a batch's
   block-shuffled stream (:meth:`atlasflow.model.data.BatchData.stream`). Worker ``w`` of ``n``
   reads and tokenises every ``n``-th block from the ``w``-th; the DataLoader takes one item from
   each worker in turn, so the blocks come back in the shard's order whatever ``n`` is (0: read in
   this process). Shards (data-parallel ranks × accumulation steps) never share a block. A worker
   writes each block once into a shared-memory tensor, which the DataLoader's queue passes as a file
   descriptor: the training process maps it instead of unpickling a copy, so it stays free for the
   steps.
2. **Prefetch**: :class:`Prefetch` runs the step assembly (cutting blocks into micro-batches,
   adding replay cells, building tensors, pinning them for a non-blocking copy to the GPU) in a
   background thread, ``depth`` steps ahead of the optimiser.

Worker processes are forked when an epoch's iterator is created, so that happens on the thread
that trains (never from the prefetch thread: forking a multi-threaded process is only safe from
the thread that owns its locks' state).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from atlasflow.model.data import BatchData, CellBatch, Split

__all__ = ["Prefetch", "ShardBlocks", "auto_workers", "shard_blocks"]

T = TypeVar("T")


class ShardBlocks(IterableDataset):
    """One shard's tokenised blocks from cell ``start_cell`` of its stream, split across workers."""

    def __init__(self, data: BatchData, *, epoch: int, start_cell: int, shard: int, shards: int,
                 split: Split = "train", shuffle: bool = True) -> None:
        super().__init__()
        self.data, self.epoch, self.start_cell = data, epoch, start_cell
        self.shard, self.shards, self.split, self.shuffle = shard, shards, split, shuffle

    def __iter__(self) -> Iterator[CellBatch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        blocks = self.data.stream(epoch=self.epoch, start_cell=self.start_cell, split=self.split,
                                  shuffle=self.shuffle, shard=self.shard, shards=self.shards, worker=worker,
                                  workers=workers)
        return blocks if info is None else map(_SharedBlock.of, blocks)


class _SharedBlock:
    """A block's arrays packed into one shared-memory tensor: the worker's queue passes one file
    descriptor per block, not one per array. (Not :meth:`CellBatch.to_arrays`: that one narrows
    dtypes for an ``.npz``, a conversion the training process would have to undo.)"""

    __slots__ = ("buffer", "layout", "shape")

    def __init__(self, buffer: torch.Tensor, layout: tuple[tuple[str, tuple[int, ...], int], ...],
                 shape: tuple[int, int]) -> None:
        self.buffer, self.layout, self.shape = buffer, layout, shape

    @classmethod
    def of(cls, cells: CellBatch) -> _SharedBlock:
        e = cells.expr
        arrays = [np.ascontiguousarray(a) for a in
                  (cells.tokens, cells.bins, cells.labels, e.data, e.indices, e.indptr, cells.panel, cells.measured)]
        offsets = np.cumsum([0] + [-(-a.nbytes // 8) * 8 for a in arrays])  # each array 8-byte aligned
        buffer = torch.empty(int(offsets[-1]), dtype=torch.uint8).share_memory_()  # written once, in place
        flat = buffer.numpy()
        for a, at in zip(arrays, offsets[:-1], strict=True):
            flat[at: at + a.nbytes] = a.reshape(-1).view(np.uint8)
        layout = tuple((a.dtype.str, a.shape, int(at)) for a, at in zip(arrays, offsets[:-1], strict=True))
        return cls(buffer, layout, e.shape)

    def cells(self) -> CellBatch:
        """The block again, as views of the shared buffer (no copy)."""
        flat = self.buffer.numpy()
        tokens, bins, labels, data, indices, indptr, panel, measured = (
            np.frombuffer(flat, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=at).reshape(shape)
            for dtype, shape, at in self.layout)
        expr = sp.csr_matrix((data, indices, indptr), shape=self.shape, copy=False)
        return CellBatch(tokens, bins, labels, expr, panel, measured)


def _identity(item: _SharedBlock) -> _SharedBlock:
    return item  # default collation would try to stack the block's tensors


def shard_blocks(data: BatchData, *, epoch: int, start_cell: int, shard: int, shards: int, workers: int,
                 prefetch_blocks: int = 2) -> Iterator[CellBatch]:
    """The shard's blocks, read by ``workers`` worker processes (0: here, lazily)."""
    dataset = ShardBlocks(data, epoch=epoch, start_cell=start_cell, shard=shard, shards=shards)
    if workers <= 0:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=prefetch_blocks,
                        collate_fn=_identity, multiprocessing_context="fork")
    return (block.cells() for block in loader)


def auto_workers(*, cuda: bool, local_ranks: int = 1) -> int:
    """``training.loader_workers`` when empty: none on CPU (the cores train), else up to 4 per rank."""
    if not cuda:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(local_ranks, 1) - 1))


_DONE = object()


class Prefetch(Iterator[T]):
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead (0: no thread at all).

    An exception in the thread is raised by the ``next`` that would have returned the item;
    :meth:`close` (also on garbage collection of a half-read iterator) stops the thread.
    """

    def __init__(self, source: Iterator[T], *, depth: int) -> None:
        self._source = source
        self._depth = depth
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="atlasflow-prefetch", daemon=True)
            self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def __next__(self) -> T:
        if self._thread is None:
            return next(self._source)
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # every later next() stops too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __del__(self) -> None:
        self._stop.set()


def pinned(array: Any, *, pin: bool) -> torch.Tensor:
    """``array`` as a tensor, in page-locked memory when ``pin`` (so ``.to(cuda, non_blocking=True)`` is async)."""
    t = torch.from_numpy(array)
    return t.pin_memory() if pin else t
