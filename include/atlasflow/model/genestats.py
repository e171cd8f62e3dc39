"""Each gene's non-zero median expression over the cells streamed so far (for ``median`` ranking).

A fixed histogram per gene of ``log1p`` counts per 10k (96 bins over [0, 12)) merges exactly
across batches, so the medians can grow with the stream without keeping any cell.
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp

__all__ = ["GeneMedians"]

_BINS = 96
_TOP = 12.0  # log1p of 10k counts per 10k is ~9.2: the top bin is never reached by real data


class GeneMedians:
    """Streaming per-gene histogram → non-zero median (counts per 10k)."""

    def __init__(self, n_genes: int, counts: np.ndarray | None = None) -> None:
        self.counts = np.zeros((n_genes, _BINS), dtype=np.int64) if counts is None else counts.astype(np.int64)

    def update(self, expr: sp.csr_matrix) -> None:
        """Add cells given as ``log1p`` counts per 10k over the vocabulary."""
        expr = sp.csr_matrix(expr)
        b = np.minimum((expr.data * (_BINS / _TOP)).astype(np.int64), _BINS - 1)
        flat = expr.indices.astype(np.int64) * _BINS + b
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def medians(self) -> np.ndarray:
        """``float[n_genes]``: each gene's non-zero median in counts per 10k; unseen genes get the median gene's."""
        total = self.counts.sum(axis=1)
        cum = np.cumsum(self.counts, axis=1)
        k = np.argmax(cum >= (total[:, None] + 1) // 2, axis=1)
        centre = (k + 0.5) * (_TOP / _BINS)
        out = np.expm1(centre)
        seen = total > 0
        out[~seen] = np.median(out[seen]) if seen.any() else 1.0
        return out

    def version(self) -> str:
        return hashlib.sha256(self.counts.tobytes()).hexdigest()[:12]
