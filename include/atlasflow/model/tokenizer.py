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
        """
        n = block.shape[0]
        tokens = np.zeros((n, self.seq_len), dtype=np.int64)
        bins = np.zeros((n, self.seq_len), dtype=np.int64)
        tokens[:, 0] = CLS
        indptr, indices, data = block.indptr, block.indices, block.data
        for i in range(n):
            lo, hi = indptr[i], indptr[i + 1]
            genes = columns[indices[lo:hi]]
            values = data[lo:hi]
            keep = (genes >= 0) & (values > 0)
            genes, values = genes[keep], values[keep]
            if genes.size == 0:
                continue
            edges = np.quantile(values, np.linspace(0, 1, self.n_bins - 1))
            cell_bins = np.clip(np.digitize(values, edges[1:-1], right=True) + 1, 1, self.n_bins - 1)
            order = np.lexsort((genes, -values))[: self.max_genes]
            k = order.size
            tokens[i, 1 : k + 1] = N_SPECIAL + genes[order]
            bins[i, 1 : k + 1] = cell_bins[order]
        return tokens, bins
