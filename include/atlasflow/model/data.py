"""Streaming a batch's processed h5ad files into token batches, never loading a dataset whole.

Cells are read in contiguous blocks (one HDF5 read each) and shuffled within the block; the
order of blocks is shuffled too (block shuffle). The order is a pure function of (seed, batch,
epoch), so a stream can restart at any cell offset without reading what comes before it: that
is what makes intra-batch resume exact. Validation holds out whole datasets (files), so no
dataset is split between training and validation.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasflow.genes import Vocabulary
from atlasflow.model.tokenizer import Tokenizer

__all__ = ["BatchData", "DatasetFile", "split_datasets"]


@dataclass(frozen=True)
class DatasetFile:
    path: Path
    dataset_id: str
    n_cells: int
    columns: np.ndarray  # file column -> vocabulary position (-1: not in the vocabulary)
    labels: np.ndarray  # per cell: index into the model's cell types, -100 when unlabelled


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
    return DatasetFile(path, path.stem, n_cells, columns, labels)


def split_datasets(dataset_ids: list[str], *, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) dataset ids: a deterministic hash order, at least one dataset trains."""
    if len(dataset_ids) < 2 or val_fraction <= 0:
        return sorted(dataset_ids), []
    ranked = sorted(dataset_ids, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    n_val = min(max(1, round(val_fraction * len(ranked))), len(ranked) - 1)
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


class BatchData:
    """The training and validation cells of one batch folder."""

    def __init__(self, batch_dir: Path, vocab: Vocabulary, tokenizer: Tokenizer, *, seed: int, block_cells: int,
                 val_fraction: float, cell_types: list[str] | None = None) -> None:
        self.batch_dir = batch_dir
        self.n_genes = len(vocab)
        self.tokenizer = tokenizer
        self.seed = seed
        self.block_cells = block_cells
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

    def _blocks(self, files: list[DatasetFile], epoch: int, shuffle: bool) -> list[tuple[int, int, int]]:
        blocks = [(i, start, min(start + self.block_cells, f.n_cells))
                  for i, f in enumerate(files) for start in range(0, f.n_cells, self.block_cells)]
        if shuffle:
            rng = np.random.default_rng([self.seed, self.batch_key, epoch])
            order = rng.permutation(len(blocks))
            blocks = [blocks[k] for k in order]
        return blocks

    def stream(self, *, epoch: int, start_cell: int = 0, split: str = "train",
               shuffle: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(tokens, bins, labels)`` blocks from cell ``start_cell`` of the epoch's order."""
        import h5py
        from anndata.io import sparse_dataset

        files = self.train if split == "train" else self.val
        handles: dict[int, tuple[h5py.File, object]] = {}
        try:
            skipped = 0
            for i, start, stop in self._blocks(files, epoch, shuffle):
                size = stop - start
                if skipped + size <= start_cell:  # wholly before the resume point: not even read
                    skipped += size
                    continue
                if i not in handles:
                    h = h5py.File(files[i].path, "r")
                    handles[i] = (h, sparse_dataset(h["X"]))
                block = handles[i][1][start:stop].tocsr()
                labels = files[i].labels[start:stop]
                if shuffle:
                    perm = np.random.default_rng([self.seed, self.batch_key, epoch, i, start]).permutation(size)
                    block, labels = block[perm], labels[perm]
                tokens, bins = self.tokenizer.encode(block, files[i].columns)
                offset = max(0, start_cell - skipped)
                skipped += size
                yield tokens[offset:], bins[offset:], labels[offset:]
        finally:
            for h, _ in handles.values():
                h.close()

    def val_labels_and_counts(self, key: str) -> tuple[np.ndarray | None, object]:
        """A validation obs column and the counts, in the unshuffled validation order.

        Counts are laid out in vocabulary order: QC drops different genes from different datasets,
        so the files' own gene axes do not line up.
        """
        import h5py
        import scipy.sparse as sp
        from anndata.io import read_elem, sparse_dataset

        n_genes = self.n_genes
        labels, blocks = [], []
        for f in self.val:
            with h5py.File(f.path, "r") as h:
                if key not in h["obs"]:
                    return None, None
                labels.append(np.asarray(read_elem(h["obs"][key])).astype(str))
                x = sparse_dataset(h["X"])[:].tocsr()
            known = np.flatnonzero(f.columns >= 0)
            x = x[:, known].tocsr()
            blocks.append(sp.csr_matrix((x.data, f.columns[known][x.indices], x.indptr), shape=(x.shape[0], n_genes)))
        return np.concatenate(labels), sp.vstack(blocks).tocsr()

    def batches(self, *, epoch: int, batch_cells: int, start_step: int = 0,
                split: str = "train", shuffle: bool = True
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(step_in_epoch, tokens, bins, labels)`` of ``batch_cells`` cells (the last may be smaller)."""
        step = start_step
        buf: list[list[np.ndarray]] = [[], [], []]
        have = 0
        for parts in self.stream(epoch=epoch, start_cell=start_step * batch_cells, split=split, shuffle=shuffle):
            for k in range(3):
                buf[k].append(parts[k])
            have += parts[0].shape[0]
            while have >= batch_cells:
                joined = [np.concatenate(b) for b in buf]
                yield (step, *(j[:batch_cells] for j in joined))
                step += 1
                buf, have = [[j[batch_cells:]] for j in joined], have - batch_cells
        if have:
            yield (step, *(np.concatenate(b) for b in buf))
