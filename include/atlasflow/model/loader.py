"""Feeding the training loop: blocks read and tokenised in DataLoader workers, steps assembled ahead.

Two stages, both optional and both without effect on the numbers (only on when work happens):

1. **Workers**: :class:`ShardBlocks` is an ``IterableDataset`` over one shard of a batch's
   block-shuffled stream (:meth:`atlasflow.model.data.BatchData.stream`). Worker ``w`` of ``n``
   reads and tokenises every ``n``-th block from the ``w``-th; the DataLoader takes one item from
   each worker in turn, so the blocks come back in the shard's order whatever ``n`` is (0: read in
   this process). Shards (data-parallel ranks × accumulation steps) never share a block. A worker
   writes each block into one of a few shared-memory buffers it reuses: the DataLoader's queue
   passes a buffer's file descriptor once, and afterwards only which buffer holds the next block.
   The training process maps each buffer once and reads the block in place; when the last array
   of a block is gone it tells the worker that the buffer is free again. (A fresh buffer per block
   cost the worker ~7 ms of its ~90 ms per 2,048-cell block in page faults, and the training
   process another mapping.) A worker with no free buffer (the consumer still holds all of them)
   writes that block into a buffer of its own, used once: never waits, never overwrites.
2. **Prefetch**: :class:`Prefetch` runs the step assembly (cutting blocks into micro-batches,
   adding replay cells, building tensors, pinning them for a non-blocking copy to the GPU) in a
   background thread, ``depth`` steps ahead of the optimiser.

Worker processes are forked when an epoch's iterator is created, so that happens on the thread
that trains (never from the prefetch thread: forking a multi-threaded process is only safe from
the thread that owns its locks' state).
"""

from __future__ import annotations

import collections
import multiprocessing
import queue
import threading
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from atlasflow.core.cpus import usable_cpus
from atlasflow.model.data import BatchData, CellBatch, Split

__all__ = ["Prefetch", "ShardBlocks", "auto_workers", "shard_blocks"]

T = TypeVar("T")


class ShardBlocks(IterableDataset):
    """One shard's tokenised blocks from cell ``start_cell`` of its stream, split across workers."""

    def __init__(self, data: BatchData, *, epoch: int, start_cell: int, shard: int, shards: int,
                 split: Split = "train", shuffle: bool = True, returns: list[Connection] | None = None,
                 buffers: int = 0) -> None:
        super().__init__()
        self.data, self.epoch, self.start_cell = data, epoch, start_cell
        self.shard, self.shards, self.split, self.shuffle = shard, shards, split, shuffle
        self.returns, self.buffers = returns or [], buffers

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        blocks = self.data.stream(epoch=self.epoch, start_cell=self.start_cell, split=self.split,
                                  shuffle=self.shuffle, shard=self.shard, shards=self.shards, worker=worker,
                                  workers=workers)
        if info is None:
            return blocks
        ring = _BufferRing(worker, self.returns[worker] if self.returns else None, size=self.buffers)
        return map(ring.pack, blocks)


_Layout = tuple[tuple[str, tuple[int, ...], int], ...]


class _SharedBlock:
    """What a worker hands over for one block: where its arrays lie in a shared buffer.

    ``buffer`` travels only when the training process has not seen it yet (a new or grown ring
    buffer, or a one-off); otherwise ``(worker, slot)`` names a buffer it already mapped.
    """

    __slots__ = ("buffer", "layout", "nbytes", "shape", "slot", "worker")

    def __init__(self, worker: int, slot: int | None, buffer: torch.Tensor | None, layout: _Layout, nbytes: int,
                 shape: tuple[int, int]) -> None:
        self.worker, self.slot, self.buffer = worker, slot, buffer
        self.layout, self.nbytes, self.shape = layout, nbytes, shape


class _BufferRing:
    """A worker's reusable shared buffers (``size`` of them; ``returns`` says which are free again).

    Each block's arrays are packed into one buffer, so the queue passes at most one file descriptor
    per block. (Not :meth:`CellBatch.to_arrays`: that one narrows dtypes for an ``.npz``, a
    conversion the training process would have to undo.)
    """

    def __init__(self, worker: int, returns: Connection | None, *, size: int) -> None:
        self.worker, self.returns = worker, returns
        self.buffers: list[torch.Tensor] = []
        self.free: list[int] = []
        self.size = size if returns is not None else 0

    def _take(self, nbytes: int) -> tuple[int | None, torch.Tensor, bool]:
        """(slot or None for a one-off, the buffer, whether the training process has to be sent it)."""
        while self.returns is not None and self.returns.poll():
            self.free.append(self.returns.recv())
        if self.free:
            slot = self.free.pop()
            if self.buffers[slot].numel() >= nbytes:
                return slot, self.buffers[slot], False
        elif len(self.buffers) < self.size:
            slot = len(self.buffers)
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        else:
            return None, torch.empty(nbytes, dtype=torch.uint8).share_memory_(), True
        # new, or too small for this block: a larger one, with room for blocks a little larger still
        self.buffers[slot] = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8).share_memory_()
        return slot, self.buffers[slot], True

    def pack(self, cells: CellBatch) -> _SharedBlock:
        e = cells.expr
        arrays = [np.ascontiguousarray(a) for a in
                  (cells.tokens, cells.bins, cells.labels, e.data, e.indices, e.indptr, cells.panel, cells.measured)]
        offsets = np.cumsum([0] + [-(-a.nbytes // 8) * 8 for a in arrays])  # each array 8-byte aligned
        nbytes = int(offsets[-1])
        slot, buffer, send = self._take(nbytes)
        flat = buffer.numpy()
        for a, at in zip(arrays, offsets[:-1], strict=True):
            flat[at: at + a.nbytes] = a.reshape(-1).view(np.uint8)
        layout = tuple((a.dtype.str, a.shape, int(at)) for a, at in zip(arrays, offsets[:-1], strict=True))
        return _SharedBlock(self.worker, slot, buffer if send else None, layout, nbytes, e.shape)


class _Lease:
    """The owner every array of one block is a view of: when it is collected, the block's buffer
    is free for its worker again (numpy collapses a view's base to the first non-array object)."""

    __slots__ = ("__array_interface__", "__weakref__", "_flat")

    def __init__(self, flat: np.ndarray) -> None:
        self._flat = flat
        self.__array_interface__ = flat.__array_interface__


class _Unpacker:
    """The training process's side: buffers mapped once, blocks read in place, buffers given back."""

    def __init__(self, returns: list[Connection]) -> None:
        self.returns = returns
        self.mapped: dict[tuple[int, int], torch.Tensor] = {}
        # filled by finalizers, which may run on any thread (or inside the garbage collector), so
        # they only append here; the pipes are written on the next block's turn
        self.released: collections.deque[tuple[int, int]] = collections.deque()

    def cells(self, block: _SharedBlock) -> CellBatch:
        while self.released:
            worker, slot = self.released.popleft()
            self.returns[worker].send(slot)
        buffer = block.buffer
        if block.slot is not None:
            key = (block.worker, block.slot)
            if buffer is None:
                buffer = self.mapped[key]
            else:
                self.mapped[key] = buffer
        assert buffer is not None
        lease = _Lease(buffer.numpy()[: block.nbytes])
        flat = np.asarray(lease)
        if block.slot is not None:
            weakref.finalize(lease, self.released.append, (block.worker, block.slot))
        tokens, bins, labels, data, indices, indptr, panel, measured = (
            np.frombuffer(flat, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=at).reshape(shape)
            for dtype, shape, at in block.layout)
        # assigned, not passed to csr_matrix(...): its constructor copies arrays that are small views
        # of a larger buffer (scipy's prune), ~2 ms per block in the training process
        expr = sp.csr_matrix(block.shape, dtype=data.dtype)
        expr.data, expr.indices, expr.indptr = data, indices, indptr
        return CellBatch(tokens, bins, labels, expr, panel, measured)


def _identity(item: _SharedBlock) -> _SharedBlock:
    return item  # default collation would try to stack the block's tensors


def shard_blocks(data: BatchData, *, epoch: int, start_cell: int, shard: int, shards: int, workers: int,
                 prefetch_blocks: int = 2) -> Iterator[CellBatch]:
    """The shard's blocks, read by ``workers`` worker processes (0: here, lazily)."""
    if workers <= 0:
        return iter(ShardBlocks(data, epoch=epoch, start_cell=start_cell, shard=shard, shards=shards))
    pipes = [multiprocessing.get_context("fork").Pipe(duplex=False) for _ in range(workers)]
    # buffers per worker: the blocks the DataLoader may have asked for ahead, the one being cut into
    # steps, and two more for steps still queued or training
    dataset = ShardBlocks(data, epoch=epoch, start_cell=start_cell, shard=shard, shards=shards,
                          returns=[recv for recv, _ in pipes], buffers=prefetch_blocks + 3)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=prefetch_blocks,
                        collate_fn=_identity, multiprocessing_context="fork")
    unpacker = _Unpacker([send for _, send in pipes])
    return (unpacker.cells(block) for block in loader)


def auto_workers(*, cuda: bool, local_ranks: int = 1) -> int:
    """``training.loader_workers`` when empty: none on CPU (the cores train), else up to 4 per rank."""
    if not cuda:
        return 0
    return max(0, min(4, usable_cpus() // max(local_ranks, 1) - 1))


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
