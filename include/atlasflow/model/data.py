"""Streaming a batch's processed h5ad files into cell batches, never loading a dataset whole.

Cells are read in contiguous blocks (one HDF5 read each) and shuffled within the block; the
order of blocks is shuffled too (block shuffle). The order is a pure function of (seed, batch,
epoch), so a stream can restart at any cell offset without reading what comes before it: that
is what makes intra-batch resume exact. Validation holds out whole datasets (files), so no
dataset is split between training and validation.

Every cell comes as a :class:`CellBatch`: its tokens and bins (what the network reads), its
label index, and its log-normalised expression over the whole vocabulary (what the cell
objective reconstructs), with the set of genes its dataset measured ("panel"), so a gene a
dataset never measured is not taken for a zero.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp

from atlasflow.model.integration_metrics import labelled_mask
from atlasflow.model.tokenizer import Tokenizer
from atlasflow.prep.genes import Vocabulary

__all__ = ["BatchData", "CellBatch", "DatasetFile", "HeldOutSample", "log_normalise", "rebatch", "split_datasets"]

Split = Literal["train", "val"]


def log_normalise(counts: sp.csr_matrix, totals: np.ndarray, *, target_sum: float = 1e4) -> sp.csr_matrix:
    """``log1p(counts / totals * target_sum)`` row by row, sparse, float32."""
    out = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    scale = (target_sum / np.maximum(totals, 1.0)).astype(np.float32)
    out.data *= np.repeat(scale, np.diff(out.indptr))
    np.log1p(out.data, out=out.data)
    return out


@dataclass(frozen=True)
class CellBatch:
    """Cells ready for the network and for the cell objective.

    ``measured[panel[i]]`` says which vocabulary genes cell ``i``'s dataset measured.
    """

    tokens: np.ndarray  # int64 [n, seq_len]
    bins: np.ndarray  # int64 [n, seq_len]
    labels: np.ndarray  # int64 [n]: index into the model's cell types, -100 when unlabelled
    expr: sp.csr_matrix  # float32 [n, n_genes]: log1p counts per 10k over the vocabulary
    panel: np.ndarray  # int32 [n]
    measured: np.ndarray  # bool [n_panels, n_genes]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, index: np.ndarray | slice) -> CellBatch:
        return CellBatch(self.tokens[index], self.bins[index], self.labels[index], self.expr[index],
                         self.panel[index], self.measured)

    def measured_mask(self) -> np.ndarray:
        """``bool[n, n_genes]``: the genes each cell's dataset measured."""
        return self.measured[self.panel]

    @staticmethod
    def concat(parts: Sequence[CellBatch]) -> CellBatch:
        """One batch of all ``parts``' cells, in order; identical panels are merged."""
        parts = [p for p in parts if len(p)] or list(parts[:1])
        measured, inverse = np.unique(np.concatenate([p.measured for p in parts]), axis=0, return_inverse=True)
        offsets = np.cumsum([0] + [p.measured.shape[0] for p in parts])
        panel = np.concatenate([inverse.reshape(-1)[offsets[k] + p.panel] for k, p in enumerate(parts)])
        return CellBatch(np.concatenate([p.tokens for p in parts]), np.concatenate([p.bins for p in parts]),
                         np.concatenate([p.labels for p in parts]), sp.vstack([p.expr for p in parts]).tocsr(),
                         panel.astype(np.int32), measured)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Compact arrays for an ``.npz`` (int32 tokens, int16 bins), read back by :meth:`from_arrays`."""
        e = self.expr
        return {f"{prefix}tokens": self.tokens.astype(np.int32), f"{prefix}bins": self.bins.astype(np.int16),
                f"{prefix}labels": self.labels.astype(np.int32), f"{prefix}expr_data": e.data.astype(np.float32),
                f"{prefix}expr_indices": e.indices.astype(np.int32), f"{prefix}expr_indptr": e.indptr.astype(np.int64),
                f"{prefix}panel": self.panel.astype(np.int32), f"{prefix}measured": np.packbits(self.measured, axis=1),
                f"{prefix}shape": np.array(e.shape, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, z: object, prefix: str) -> CellBatch:
        shape = tuple(int(x) for x in z[f"{prefix}shape"])  # type: ignore[index]
        expr = sp.csr_matrix((z[f"{prefix}expr_data"], z[f"{prefix}expr_indices"], z[f"{prefix}expr_indptr"]),  # type: ignore[index]
                             shape=shape)
        measured = np.unpackbits(z[f"{prefix}measured"], axis=1, count=shape[1]).astype(bool)  # type: ignore[index]
        return cls(z[f"{prefix}tokens"].astype(np.int64), z[f"{prefix}bins"].astype(np.int64),  # type: ignore[index]
                   z[f"{prefix}labels"].astype(np.int64), expr, z[f"{prefix}panel"].astype(np.int32),  # type: ignore[index]
                   measured)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.to_arrays("").values())


@dataclass(frozen=True)
class DatasetFile:
    path: Path
    dataset_id: str
    n_cells: int
    columns: np.ndarray  # file column -> vocabulary position (-1: not in the vocabulary)
    labels: np.ndarray  # per cell: index into the model's cell types, -100 when unlabelled
    measured: np.ndarray  # bool [n_genes]: the vocabulary genes this file has a column for


@dataclass(frozen=True)
class HeldOutSample:
    """A seeded sample of one split's cells with what evaluation needs besides the tokens."""

    cells: CellBatch
    cell_type: np.ndarray | None  # str per cell ("" when unlabelled); None when no file has the column
    dataset_ids: np.ndarray  # str per cell
    total_cells: int  # cells in the split, of which these are a sample


def _open(path: Path, vocab: Vocabulary, cell_types: list[str]) -> DatasetFile:
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        var = read_elem(f["var"])
        n_cells = int(f["X"].attrs["shape"][0])
        labels = np.full(n_cells, -100, dtype=np.int64)
        if cell_types and "cell_type" in f["obs"]:
            lookup = {c: i for i, c in enumerate(cell_types)}
            values = np.asarray(read_elem(f["obs"]["cell_type"])).astype(str)
            labels = np.array([lookup.get(v, -100) for v in values], dtype=np.int64)
    index = {g: i for i, g in enumerate(vocab.symbols)}
    columns = np.array([index.get(str(g).upper(), -1) for g in var.index], dtype=np.int64)
    measured = np.zeros(len(vocab), dtype=bool)
    measured[columns[columns >= 0]] = True
    return DatasetFile(path, path.stem, n_cells, columns, labels, measured)


def split_datasets(dataset_ids: list[str], *, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) dataset ids: a deterministic hash order, at least one dataset trains."""
    if len(dataset_ids) < 2 or val_fraction <= 0:
        return sorted(dataset_ids), []
    ranked = sorted(dataset_ids, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    n_val = min(max(1, round(val_fraction * len(ranked))), len(ranked) - 1)
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


def _labels_at(values: object, rows: np.ndarray) -> np.ndarray:
    """The labels of ``rows`` as str, "" where unlabelled; only those rows become strings (a
    categorical column of a million cells stays a million small codes)."""
    import pandas as pd

    if isinstance(values, pd.Categorical):
        codes = values.codes[rows]
        names = np.asarray(values.categories.astype(str))
        picked = np.where(codes >= 0, names[np.maximum(codes, 0)], "")
    else:
        picked = np.asarray(values)[rows]
        picked = np.where(pd.isna(picked), "", picked).astype(str)
    picked = picked.astype(str)
    return np.where(labelled_mask(picked), picked, "")  # the one rule for "unlabelled" (integration too)


def rebatch(parts: Iterable[CellBatch], *, batch_cells: int, start_step: int = 0) -> Iterator[tuple[int, CellBatch]]:
    """``(step, cells)`` of ``batch_cells`` consecutive cells of ``parts`` (the last may be smaller).

    A step inside one part is a view of it; only a step that straddles parts is copied (whole
    blocks are not: in a DataLoader's main process that copy would be the loader's bottleneck).
    """
    step = start_step
    carry: list[CellBatch] = []  # fewer than batch_cells cells, left over from earlier parts
    have = 0
    for part in parts:
        pos = 0
        if carry:
            need = batch_cells - have
            if len(part) < need:
                carry.append(part)
                have += len(part)
                continue
            yield step, CellBatch.concat([*carry, part.take(slice(0, need))])
            step += 1
            carry, have, pos = [], 0, need
        while len(part) - pos >= batch_cells:
            yield step, part.take(slice(pos, pos + batch_cells))
            step += 1
            pos += batch_cells
        if pos < len(part):
            carry, have = [part.take(slice(pos, None))], len(part) - pos
    if have:
        yield step, CellBatch.concat(carry)


class BatchData:
    """The training and validation cells of one batch folder.

    ``gene_scale`` switches the tokenizer to median ranking (see :mod:`atlasflow.model.tokenizer`).
    """

    def __init__(self, batch_dir: Path, vocab: Vocabulary, tokenizer: Tokenizer, *, seed: int, block_cells: int,
                 val_fraction: float, cell_types: list[str] | None = None,
                 gene_scale: np.ndarray | None = None) -> None:
        self.batch_dir = batch_dir
        self.n_genes = len(vocab)
        self.tokenizer = tokenizer
        self.seed = seed
        self.block_cells = block_cells
        self.gene_scale = gene_scale
        files = [_open(p, vocab, cell_types or []) for p in sorted(batch_dir.glob("*.h5ad"))]
        if not files:
            raise FileNotFoundError(f"{batch_dir}: no processed .h5ad files to train on")
        train_ids, val_ids = split_datasets([f.dataset_id for f in files], val_fraction=val_fraction, seed=seed)
        self.train = [f for f in files if f.dataset_id in train_ids]
        self.val = [f for f in files if f.dataset_id in val_ids]
        self.batch_key = zlib.crc32(batch_dir.name.encode())

    @property
    def n_train_cells(self) -> int:
        return sum(f.n_cells for f in self.train)

    def _files(self, split: Split) -> list[DatasetFile]:
        return self.train if split == "train" else self.val

    def _blocks(self, files: list[DatasetFile], epoch: int, shuffle: bool) -> list[tuple[int, int, int]]:
        blocks = [(i, start, min(start + self.block_cells, f.n_cells))
                  for i, f in enumerate(files) for start in range(0, f.n_cells, self.block_cells)]
        if shuffle:
            rng = np.random.default_rng([self.seed, self.batch_key, epoch])
            order = rng.permutation(len(blocks))
            blocks = [blocks[k] for k in order]
        return blocks

    def shard_cells(self, *, epoch: int, shards: int, split: Split = "train", shuffle: bool = True) -> list[int]:
        """Cells of each of ``shards`` shards of the epoch's block order (block ``k`` goes to shard ``k % shards``)."""
        blocks = self._blocks(self._files(split), epoch, shuffle)
        return [sum(stop - start for _, start, stop in blocks[v::shards]) for v in range(shards)]

    def _plan(self, files: list[DatasetFile], *, epoch: int, start_cell: int, shuffle: bool, shard: int,
              shards: int) -> list[tuple[int, int, int, int]]:
        """``(file, start, stop, skip)`` of the shard's blocks from cell ``start_cell`` of the shard's stream."""
        plan, skipped = [], 0
        for i, start, stop in self._blocks(files, epoch, shuffle)[shard::shards]:
            size = stop - start
            if skipped + size <= start_cell:  # wholly before the resume point: not even read
                skipped += size
                continue
            plan.append((i, start, stop, max(0, start_cell - skipped)))
            skipped += size
        return plan

    def cells_of(self, f: DatasetFile, block: sp.csr_matrix, labels: np.ndarray, *, tie_seed: int) -> CellBatch:
        """Tokens, bins and the vocabulary-wide log-normalised expression of a block of ``f``'s rows."""
        block = sp.csr_matrix(block, dtype=np.float32)
        tokens, bins = self.tokenizer.encode(block, f.columns, gene_scale=self.gene_scale, tie_seed=tie_seed)
        totals = np.asarray(block.sum(axis=1)).reshape(-1)
        known = np.flatnonzero(f.columns >= 0)
        sub = block[:, known].tocsr()
        in_vocab = sp.csr_matrix((sub.data, f.columns[known][sub.indices], sub.indptr),
                                 shape=(block.shape[0], self.n_genes))
        in_vocab.sum_duplicates()  # two file columns mapped to one gene add up
        expr = log_normalise(in_vocab, totals)
        return CellBatch(tokens, bins, labels.astype(np.int64), expr, np.zeros(block.shape[0], dtype=np.int32),
                         f.measured[None, :])

    def stream(self, *, epoch: int, start_cell: int = 0, split: Split = "train", shuffle: bool = True,
               shard: int = 0, shards: int = 1, worker: int = 0, workers: int = 1) -> Iterator[CellBatch]:
        """Yield cell blocks from cell ``start_cell`` of one shard's stream of the epoch's order.

        The epoch's shuffled blocks are dealt to ``shards`` shards (data-parallel ranks and
        gradient-accumulation steps) round-robin, so shards never overlap and one shard (the
        default) is the whole stream. ``worker`` of ``workers`` (DataLoader workers) yields every
        ``workers``-th of the shard's remaining blocks, starting with its own index: a DataLoader,
        which takes one item from each worker in turn, hands them back in the shard's order.
        """
        import h5py
        from anndata.io import sparse_dataset

        files = self._files(split)
        plan = self._plan(files, epoch=epoch, start_cell=start_cell, shuffle=shuffle, shard=shard, shards=shards)
        handles: dict[int, tuple[h5py.File, object]] = {}
        try:
            for i, start, stop, offset in plan[worker::workers]:
                if i not in handles:
                    h = h5py.File(files[i].path, "r")
                    handles[i] = (h, sparse_dataset(h["X"]))
                block = handles[i][1][start:stop].tocsr()
                labels = files[i].labels[start:stop]
                if shuffle:
                    perm = np.random.default_rng([self.seed, self.batch_key, epoch, i, start]).permutation(stop - start)
                    block, labels = block[perm], labels[perm]
                cells = self.cells_of(files[i], block, labels, tie_seed=self.seed + epoch)
                yield cells.take(slice(offset, None))
        finally:
            for h, _ in handles.values():
                h.close()

    def batches(self, *, epoch: int, batch_cells: int, start_step: int = 0, split: Split = "train",
                shuffle: bool = True, shard: int = 0, shards: int = 1) -> Iterator[tuple[int, CellBatch]]:
        """Yield ``(step_in_epoch, cells)`` of ``batch_cells`` cells (the last may be smaller) of one shard."""
        parts = self.stream(epoch=epoch, start_cell=start_step * batch_cells, split=split, shuffle=shuffle,
                            shard=shard, shards=shards)
        return rebatch(parts, batch_cells=batch_cells, start_step=start_step)

    def sample(self, split: Split, n_cells: int, *, seed: int) -> HeldOutSample | None:
        """A seeded sample of at most ``n_cells`` of the split's cells, read block by block.

        Memory is bounded by the sample and one block, whatever the split's size: only blocks
        holding sampled rows are read, and only those rows are kept.
        """
        import h5py
        from anndata.io import read_elem, sparse_dataset

        files = self._files(split)
        total = sum(f.n_cells for f in files)
        if total == 0:
            return None
        rng = np.random.default_rng([seed, self.batch_key, 0 if split == "train" else 1])
        picked = np.sort(rng.choice(total, size=min(n_cells, total), replace=False))
        offsets = np.cumsum([0] + [f.n_cells for f in files])
        parts, types, ids = [], [], []
        any_types = False
        for i, f in enumerate(files):
            rows = picked[(picked >= offsets[i]) & (picked < offsets[i + 1])] - offsets[i]
            if rows.size == 0:
                continue
            with h5py.File(f.path, "r") as h:
                x = sparse_dataset(h["X"])
                for start in range(0, f.n_cells, self.block_cells):
                    sel = rows[(rows >= start) & (rows < start + self.block_cells)]
                    if sel.size:
                        block = x[int(sel[0]): int(sel[-1]) + 1].tocsr()[sel - sel[0]]
                        parts.append(self.cells_of(f, block, f.labels[sel], tie_seed=seed))
                if "cell_type" in h["obs"]:
                    any_types = True
                    types.append(_labels_at(read_elem(h["obs"]["cell_type"]), rows))
                else:
                    types.append(np.full(rows.size, "", dtype=object).astype(str))
            ids.append(np.full(rows.size, f.dataset_id))
        return HeldOutSample(CellBatch.concat(parts), np.concatenate(types) if any_types else None,
                             np.concatenate(ids), total)
