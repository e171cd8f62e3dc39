"""How big a checkpoint gets and what a model costs, from the config alone (no torch import:
``validate_system`` and admission use it).

A checkpoint folder holds the weights, AdamW's two moments per weight, the per-gene bin counts
and gene-median histograms, the replay reservoir and the held-out samples of every batch. The
reservoir is the part a user sizes (``training.replay_cells``); its expression rows are sparse, so
the estimate assumes ``expressed_genes`` non-zeros per cell (err high: the budget is a hard limit).

:func:`model_artifacts` is what admission reserves per batch for its model artefacts (unless
``storage.checkpoint_gb`` overrides it): the checkpoint twice (a save writes the new folder beside
the previous one, then swaps them) plus the batch's integration output (the scVI model, its scoring
pool and the latent). :func:`training_flops_per_cell` and :func:`training_memory` give the
figures docs/model.md states for the presets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from atlasflow.core.config import GB, AtlasConfig

__all__ = ["CheckpointSize", "ModelArtifacts", "checkpoint_size", "model_artifacts", "n_parameters",
           "training_flops_per_cell", "training_memory"]

_HIST_BINS = 96  # atlasflow.model.genestats
_VAL_SET_CELLS = 1000  # atlasflow.model.train.VAL_SET_CELLS
_SCVI_HIDDEN = 128  # scvi-tools' default n_hidden (atlasflow.model.integrate keeps it)
_SCORE_POOL_CELLS = 4000  # atlasflow.model.integrate.SCORE_POOL_CELLS
_SCORE_CELLS_PER_BATCH = 1000  # atlasflow.model.integrate.SCORE_CELLS_PER_BATCH
# a processed cell takes at least this many bytes on disk (>= qc.min_genes stored counts, compressed):
# the cells of a batch are estimated from its processed bytes with it, which errs towards more cells
PROCESSED_BYTES_PER_CELL = 1000


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
                          replay=config.training.replay_cells * per_cell,
                          val_sets_per_batch=_VAL_SET_CELLS * (seq * 6 + 8))


@dataclass(frozen=True)
class ModelArtifacts:
    """What one batch's model artefacts take on disk at their peak; see :func:`model_artifacts`."""

    checkpoint: CheckpointSize
    batches: int  # the checkpoint keeps this many batches' held-out sets
    scvi_model: int
    pool_per_cell: int  # one scoring-pool cell (its sparse raw counts)
    latent_per_cell: int
    override: int | None = None  # storage.checkpoint_gb, when set

    def scoring_pool(self, cells: int) -> int:
        """The scoring pool: each batch adds at most 1,000 of its cells to the earlier batches' (at
        most 1,000 each), 4,000 in all."""
        own = min(_SCORE_CELLS_PER_BATCH, cells)
        return min(_SCORE_POOL_CELLS, _SCORE_CELLS_PER_BATCH * (self.batches - 1) + own) * self.pool_per_cell

    def bytes(self, cells: int = 0) -> int:
        """Bytes to reserve for a batch of ``cells`` cells (the override when one is set)."""
        if self.override is not None:
            return self.override
        return (2 * self.checkpoint.total(self.batches) + self.scvi_model + self.scoring_pool(cells)
                + cells * self.latent_per_cell)

    def to_dict(self, cells: int = 0) -> dict[str, Any]:
        return {"bytes": self.bytes(cells), "source": "storage.checkpoint_gb" if self.override is not None else "computed",
                "checkpoint": self.checkpoint.total(self.batches), "checkpoint_copies": 2, "batches": self.batches,
                "scvi_model": self.scvi_model, "scoring_pool": self.scoring_pool(cells),
                "latent": cells * self.latent_per_cell, "cells": cells, **asdict(self.checkpoint)}


def _scvi_parameters(n_genes: int, n_latent: int, n_layers: int, n_batches: int) -> int:
    """scVI's parameters as atlasflow.model.integrate builds it (layer norms without affine weights,
    covariates into the first layer only): encoder, one-layer library encoder, and a decoder with the
    scale, dispersion and dropout heads plus the gene dispersion."""
    h = _SCVI_HIDDEN
    hidden = (n_layers - 1) * (h * h + h)
    encoder = (n_genes + n_batches) * h + h + hidden + 2 * (h * n_latent + n_latent)
    library = (n_genes + n_batches) * h + h + 2 * (h + 1)
    decoder = (n_latent + n_batches) * h + h + hidden + 3 * (h * n_genes + n_genes) + n_genes
    return encoder + library + decoder


def model_artifacts(config: AtlasConfig, n_genes: int, *, batches: int = 1, datasets: int = 50) -> ModelArtifacts:
    """A batch's model artefacts at their peak, from the model's parameter count and optimizer state.

    Parameters
    ----------
    n_genes
        The vocabulary's size.
    batches
        The batch's position in the plan + 1: the checkpoint keeps a held-out set of every batch.
    datasets
        Integration batches (datasets) scVI's covariates are sized for (err high).
    """
    override = None if config.storage.checkpoint_gb is None else int(config.storage.checkpoint_gb * GB)
    integration = config.integration
    scvi = pool = per_cell = 0
    if integration.enabled:
        # scVI takes the batch's most variable genes, and processed files hold vocabulary genes only
        hvg = min(integration.n_genes, n_genes)
        scvi = 4 * _scvi_parameters(hvg, integration.n_latent, integration.n_layers, datasets)
        # raw counts stored sparse (value + index) before gzip, 30 % of the genes expressed (as the reservoir)
        pool = int(0.3 * hvg) * (4 + 4)
        per_cell = integration.n_latent * 4 + 64  # the latent plus its obs row (ids, batch, label)
    return ModelArtifacts(checkpoint_size(config, n_genes), max(batches, 1), scvi, pool, per_cell, override)


def training_flops_per_cell(config: AtlasConfig, n_genes: int) -> int:
    """Model FLOPs of one training step per cell (forward + backward = 3 × forward).

    Per token: ``6 × L × (4 d² + 2 d f)`` (QKV + output projections, the feed-forward) + ``6 × d × n_bins``
    (the bin head); attention: ``12 × L × s² × d`` per cell (QKᵀ and AV); per cell: the expression
    decoder ``6 × (d² + d × n_genes)``. ``s`` is the full sequence (max_genes + 1): padded positions
    are computed too. Embedding look-ups are not FLOPs.
    """
    sz = config.model.sizes()
    d, f, layers, s = sz["d_model"], sz["d_ff"], sz["n_layers"], sz["max_genes"] + 1
    per_token = 6 * layers * (4 * d * d + 2 * d * f) + 6 * d * config.model.n_bins
    flops = per_token * s + 12 * layers * s * s * d
    if config.model.cell_objective == "expression":
        flops += 6 * (d * d + d * n_genes)
    return flops


def training_memory(config: AtlasConfig, n_genes: int, micro_batch_cells: int) -> dict[str, int]:
    """Bytes on one device while training: ``state`` = 16 B per parameter (fp32 weights, gradients and
    AdamW's two moments) and ``activations`` ≈ 34 × s × d bytes per layer per cell (Korthikanti et al.
    2022, without the s² attention term: scaled_dot_product_attention's memory-efficient kernel keeps
    no attention matrix), for ``micro_batch_cells`` cells per forward pass."""
    sz = config.model.sizes()
    state = 16 * n_parameters(config, n_genes)
    activations = 34 * (sz["max_genes"] + 1) * sz["d_model"] * sz["n_layers"] * micro_batch_cells
    return {"state": state, "activations": activations, "total": state + activations}
