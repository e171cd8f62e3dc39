"""How big a checkpoint gets, from the config alone (no torch import: ``validate_system`` uses it).

A checkpoint folder holds the weights, AdamW's two moments per weight, the per-gene bin counts
and gene-median histograms, the replay reservoir and the held-out samples of every batch. The
reservoir is the part a user sizes (``training.replay_cells``); its expression rows are sparse, so
the estimate assumes ``expressed_genes`` non-zeros per cell (err high: the budget is a hard limit).
"""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.core.config import AtlasConfig

__all__ = ["CheckpointSize", "checkpoint_size", "n_parameters"]

_HIST_BINS = 96  # atlasflow.model.genestats


def n_parameters(config: AtlasConfig, n_genes: int) -> int:
    """Parameters of the network :func:`atlasflow.model.train` builds for ``config`` and a vocabulary of ``n_genes``."""
    s = config.model.sizes()
    d, f, n_bins = s["d_model"], s["d_ff"], config.model.n_bins
    n_tokens = n_genes + 3
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    total = n_tokens * d + (n_bins + 1) * d + s["n_layers"] * block + 2 * d + (d * n_bins + n_bins)
    n_types = len(config.model.cell_type_labels())
    if n_types:
        total += d * n_types + n_types
    if config.model.cell_objective == "expression":
        total += n_genes * d + d * d + d + n_genes
    return total


@dataclass(frozen=True)
class CheckpointSize:
    parameters: int
    weights: int
    optimizer: int
    stats: int
    replay: int
    val_sets_per_batch: int

    def total(self, batches: int = 1) -> int:
        return self.weights + self.optimizer + self.stats + self.replay + self.val_sets_per_batch * batches


def checkpoint_size(config: AtlasConfig, n_genes: int, *, expressed_genes: int | None = None) -> CheckpointSize:
    """Upper estimate of one checkpoint's bytes (see the module docstring).

    ``expressed_genes`` (non-zeros per reservoir cell) defaults to 30 % of the vocabulary, at least
    twice the sequence length: real human cells express 1-4k of the 19,927 genes.
    """
    params = n_parameters(config, n_genes)
    seq = config.model.sizes()["max_genes"] + 1
    if expressed_genes is None:
        expressed_genes = max(2 * (seq - 1), int(0.3 * n_genes))
    per_cell = seq * (4 + 2) + 4 + 4 + 8 + min(n_genes, expressed_genes) * (4 + 4)
    return CheckpointSize(parameters=params, weights=params * 4, optimizer=params * 8,
                          stats=n_genes * (config.model.n_bins + _HIST_BINS) * 8,
                          replay=config.training.replay_cells * per_cell, val_sets_per_batch=1000 * (seq * 6 + 8))
