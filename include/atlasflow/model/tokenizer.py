"""Cells → token sequences: the top expressed genes of a cell, each with its per-cell expression bin.

As in scGPT, a cell's non-zero values are binned by the cell's own quantiles, so bins are
comparable across sequencing depths and equal for counts or log-normalised values (both are
monotonic within a cell). Token ids: ``<pad>`` 0, ``<cls>`` 1, ``<mask>`` 2, then the vocabulary's
genes in order. Deterministic: ties are broken by vocabulary position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["CLS", "MASK", "PAD", "N_SPECIAL", "Tokenizer"]

PAD, CLS, MASK = 0, 1, 2
N_SPECIAL = 3


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

    def encode(self, block: sp.csr_matrix, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise a CSR block whose column j is vocabulary gene ``columns[j]`` (-1: not in it).

        Returns ``(tokens, bins)``, both ``int64[n_cells, seq_len]``; position 0 is ``<cls>``.
        Vectorised over the whole block (no per-cell Python loop): a cell's expressed genes are
        ranked by value, the top ``max_genes`` kept (ties: lower vocabulary position first), and
        each value binned by its rank among the cell's values — equal values share a bin.
        """
        n = block.shape[0]
        tokens = np.zeros((n, self.seq_len), dtype=np.int64)
        bins = np.zeros((n, self.seq_len), dtype=np.int64)
        tokens[:, 0] = CLS
        rows = np.repeat(np.arange(n), np.diff(block.indptr))
        genes = columns[block.indices]
        values = block.data
        keep = (genes >= 0) & (values > 0)
        rows, genes, values = rows[keep], genes[keep], values[keep]
        if rows.size == 0:
            return tokens, bins
        order = np.lexsort((-genes, values, rows))  # by cell, then value ascending, ties: higher gene first
        rows, genes, values = rows[order], genes[order], values[order]
        counts = np.bincount(rows, minlength=n)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        pos = np.arange(rows.size)
        rank = pos - starts[rows]  # ascending rank within the cell
        new_value = np.ones(rows.size, dtype=bool)
        new_value[1:] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
        first_of_value = np.maximum.accumulate(np.where(new_value, pos, 0))
        tie_rank = first_of_value - starts[rows]
        cell_bins = 1 + (tie_rank * (self.n_bins - 1)) // counts[rows]
        slot = counts[rows] - 1 - rank  # 0 = the cell's highest value
        chosen = slot < self.max_genes
        tokens[rows[chosen], 1 + slot[chosen]] = N_SPECIAL + genes[chosen]
        bins[rows[chosen], 1 + slot[chosen]] = np.minimum(cell_bins[chosen], self.n_bins - 1)
        return tokens, bins
