"""Cells → token sequences: a cell's top-ranked genes, each with its per-cell expression bin.

As in scGPT, a cell's non-zero values are binned by the cell's own quantiles, so bins are
comparable across sequencing depths and equal for counts or log-normalised values (both are
monotonic within a cell). Token ids: ``<pad>`` 0, ``<cls>`` 1, ``<mask>`` 2, then the vocabulary's
genes in order.

Which genes fill the ``max_genes`` slots is a separate choice from the bins:

- ``count`` ranks a cell's genes by their value (the highest first);
- ``median`` ranks them by value over the cell's total, divided by the gene's non-zero median in
  the corpus streamed so far (Geneformer's rank value encoding): ubiquitous housekeeping genes
  (ribosomal, mitochondrial) sink and genes that are high *for this cell* rise.

Ties at the cut are broken by a seeded hash of (cell, gene), not by vocabulary position: with
integer counts most cells' cut falls inside a tie, and a fixed order would always favour the same
genes. The hash is a pure function of (seed, row, gene), so encoding stays deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["CLS", "MASK", "PAD", "N_SPECIAL", "Tokenizer", "rank_order", "tie_keys"]

PAD, CLS, MASK = 0, 1, 2
N_SPECIAL = 3
_CHUNK_CELLS = 256

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def tie_keys(rows: np.ndarray, genes: np.ndarray, seed: int) -> np.ndarray:
    """A uniform ``uint64`` per (row, gene, seed): splitmix64 of the three, vectorised."""
    with np.errstate(over="ignore"):
        x = rows.astype(np.uint64) * _GOLDEN + genes.astype(np.uint64) * _MIX2 + np.uint64(seed) * _MIX1
        x ^= x >> np.uint64(30)
        x *= _MIX1
        x ^= x >> np.uint64(27)
        x *= _MIX2
        x ^= x >> np.uint64(31)
    return x


def rank_order(rows: np.ndarray, score: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``np.lexsort((keys, score, rows))``: by row, then score, then key, then position.

    The same permutation from one argsort of a composite integer (row, score's rank, key's rank)
    when it fits in int64, which is every block of realistic size: a three-key lexsort was most of
    a DataLoader worker's time.
    """
    n = rows.size
    levels, score_rank = np.unique(score, return_inverse=True)
    if n == 0 or (int(rows.max()) + 1) * len(levels) * n >= 2**63:
        return np.lexsort((keys, score, rows))
    key_rank = np.empty(n, dtype=np.int64)
    key_rank[np.argsort(keys, kind="stable")] = np.arange(n)  # equal keys keep their positions' order
    composite = (rows.astype(np.int64) * len(levels) + score_rank.reshape(-1)) * n + key_rank
    return np.argsort(composite)  # all distinct, so any sort gives the one order


@dataclass(frozen=True)
class Tokenizer:
    n_genes: int  # vocabulary size
    max_genes: int  # genes per cell (sequence length is max_genes + 1 with <cls>)
    n_bins: int

    @property
    def n_tokens(self) -> int:
        return N_SPECIAL + self.n_genes

    @property
    def seq_len(self) -> int:
        return self.max_genes + 1

    def encode(self, block: sp.csr_matrix, columns: np.ndarray, *, gene_scale: np.ndarray | None = None,
               tie_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise a CSR block whose column j is vocabulary gene ``columns[j]`` (-1: not in it).

        Parameters
        ----------
        block
            Counts (or any per-cell monotonic transform of them), cells × file columns.
        columns
            The vocabulary position of every file column, -1 where the gene is not in it.
        gene_scale
            ``float[n_genes]``: rank genes by ``value / cell total / gene_scale`` (``median``
            ranking, the scale being each gene's corpus median) instead of by value. Bins are
            still the cell's own quantiles of the values.
        tie_seed
            Seed of the hash that breaks ties at the cut.

        Returns
        -------
        ``(tokens, bins)``, both ``int64[n_cells, seq_len]``; position 0 is ``<cls>``, the genes
        follow in rank order (highest first), padding is 0.
        """
        n = block.shape[0]
        tokens = np.zeros((n, self.seq_len), dtype=np.int64)
        bins = np.zeros((n, self.seq_len), dtype=np.int64)
        tokens[:, 0] = CLS
        block = sp.csr_matrix(block)
        # a few hundred cells at a time: their sorts stay in the core's cache (a 2,048-cell block
        # tokenised whole took twice as long); every cell is encoded on its own, so this changes nothing
        for lo in range(0, n, _CHUNK_CELLS):
            hi = min(lo + _CHUNK_CELLS, n)
            self._encode_rows(block[lo:hi], columns, gene_scale, tie_seed, lo, tokens[lo:hi], bins[lo:hi])
        return tokens, bins

    def _encode_rows(self, block: sp.csr_matrix, columns: np.ndarray, gene_scale: np.ndarray | None, tie_seed: int,
                     first_row: int, tokens: np.ndarray, bins: np.ndarray) -> None:
        """Fill ``tokens`` and ``bins`` (views) for ``block``, whose row 0 is the encoded block's ``first_row``."""
        n = block.shape[0]
        rows = np.repeat(np.arange(n), np.diff(block.indptr))
        genes = columns[block.indices]
        values = np.asarray(block.data, dtype=np.float64)
        totals = np.bincount(rows, weights=values, minlength=n)  # library size over every column
        keep = (genes >= 0) & (values > 0)
        rows, genes, values = rows[keep], genes[keep], values[keep]
        if rows.size == 0:
            return
        counts = np.bincount(rows, minlength=n)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))

        # slots: rank by the ranking score, ties by the seeded hash
        score = values if gene_scale is None else values / np.maximum(totals[rows], 1e-12) / gene_scale[genes]
        slot_order = rank_order(rows, score, tie_keys(rows + first_row, genes, tie_seed))  # the cell's hash

        # bins: rank by value within the cell; equal values share the bin of their first rank, so any
        # order of equal values serves (by count, the slots' order is one: no second sort)
        order = slot_order if gene_scale is None else np.lexsort((values, rows))
        r_sorted, v_sorted = rows[order], values[order]
        pos = np.arange(rows.size)
        new_value = np.ones(rows.size, dtype=bool)
        new_value[1:] = (r_sorted[1:] != r_sorted[:-1]) | (v_sorted[1:] != v_sorted[:-1])
        first_of_value = np.maximum.accumulate(np.where(new_value, pos, 0))
        tie_rank = first_of_value - starts[r_sorted]
        cell_bins = np.empty(rows.size, dtype=np.int64)
        cell_bins[order] = np.minimum(1 + (tie_rank * (self.n_bins - 1)) // counts[r_sorted], self.n_bins - 1)

        order = slot_order
        rank = pos - starts[rows[order]]  # ascending within the cell
        slot = counts[rows[order]] - 1 - rank  # 0 = the cell's highest
        chosen = order[slot < self.max_genes]
        slot = slot[slot < self.max_genes]
        tokens[rows[chosen], 1 + slot] = N_SPECIAL + genes[chosen]
        bins[rows[chosen], 1 + slot] = cell_bins[chosen]
