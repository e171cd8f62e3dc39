"""Model sizes from the config: presets, checkpoint reservations, the intra-batch checkpoint clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atlasflow.core.config import GB, load_config
from atlasflow.intake.manifest import Dataset
from atlasflow.model.checkpoint_clock import CheckpointClock
from atlasflow.model.sizing import checkpoint_size, model_artifacts, n_parameters, training_flops_per_cell
from atlasflow.model.tokenizer import Tokenizer
from atlasflow.model.train import _build_network
from atlasflow.prep.genes import Vocabulary
from atlasflow.storage import Ledger, batch_footprint

HUMAN = Vocabulary.builtin("human_grch38_ens100")


@pytest.mark.parametrize(("preset", "low", "high"), [("cpu", 1e6, 5e6), ("gpu-small", 25e6, 50e6),
                                                     ("gpu-large", 100e6, 300e6)])
def test_presets_have_the_documented_sizes_with_the_human_vocabulary(preset, low, high):
    config = load_config(overrides={"model.preset": preset})
    n = n_parameters(config, len(HUMAN))
    sizes = config.model.sizes()
    tok = Tokenizer(len(HUMAN), sizes["max_genes"], config.model.n_bins)
    with torch.device("meta"):  # the real network's parameters, without allocating them
        real = sum(p.numel() for p in _build_network(config, tok, len(HUMAN)).parameters())
    assert n == real and low <= n <= high
    assert load_config(overrides={"model.preset": "gpu"}).model.sizes() == load_config(
        overrides={"model.preset": "gpu-small"}).model.sizes()


def test_the_reservation_follows_the_model_not_a_fixed_figure():
    small, large = (load_config(overrides={"model.preset": p}) for p in ("cpu", "gpu-large"))
    a, b = model_artifacts(small, len(HUMAN)), model_artifacts(large, len(HUMAN))
    # weights + AdamW's two moments, twice (the save's second copy), dominate the large model's
    assert b.bytes() - a.bytes() == 2 * (b.checkpoint.total() - a.checkpoint.total())
    assert b.checkpoint.weights == 4 * n_parameters(large, len(HUMAN)) and b.checkpoint.optimizer == 2 * b.checkpoint.weights
    assert b.bytes() > 2 * 12 * n_parameters(large, len(HUMAN))
    # each later batch keeps one more held-out set; the latent grows with the cells
    later = model_artifacts(small, len(HUMAN), batches=5)
    assert later.bytes() - a.bytes() == 2 * 4 * a.checkpoint.val_sets_per_batch + later.scoring_pool(0)
    assert a.bytes(cells=1000) - a.bytes() == 1000 * (a.latent_per_cell + a.pool_per_cell) > 0
    # the scoring pool stops at 4,000 cells; after the first batch it holds earlier batches' cells too
    assert a.bytes(cells=10**6) - a.bytes(cells=10**6 - 1) == a.latent_per_cell
    assert later.scoring_pool(0) == 4000 * a.pool_per_cell
    # each batch adds at most 1,000 of its cells to the pool (integrate.SCORE_CELLS_PER_BATCH)
    from atlasflow.model import integrate, sizing

    assert (sizing._SCORE_CELLS_PER_BATCH, sizing._SCORE_POOL_CELLS) == (integrate.SCORE_CELLS_PER_BATCH,
                                                                          integrate.SCORE_POOL_CELLS)
    assert a.bytes(cells=3000) - a.bytes() == 3000 * a.latent_per_cell + 1000 * a.pool_per_cell
    second = model_artifacts(small, len(HUMAN), batches=2)
    assert second.scoring_pool(0) == 1000 * a.pool_per_cell and second.scoring_pool(500) == 1500 * a.pool_per_cell
    # scVI and its pool use the batch's most variable genes, never more than the vocabulary holds
    tiny = model_artifacts(small, 765)
    assert tiny.pool_per_cell == int(0.3 * 765) * 8 and tiny.scvi_model < a.scvi_model
    no_scvi = model_artifacts(load_config(overrides={"integration.enabled": False}), len(HUMAN))
    assert no_scvi.bytes() == 2 * a.checkpoint.total() and a.scvi_model > 0
    # storage.checkpoint_gb stays as an explicit override
    pinned = model_artifacts(load_config(overrides={"storage.checkpoint_gb": 0.5}), len(HUMAN))
    assert pinned.bytes(cells=10**6) == int(0.5 * GB) and pinned.to_dict()["source"] == "storage.checkpoint_gb"


def test_admission_reserves_the_computed_artifacts(tmp_path):
    config = load_config(overrides={"storage.base_dir": str(tmp_path), "model.preset": "gpu-small"})
    ledger = Ledger(config.storage)
    datasets = [Dataset("a", "https://h/a.h5ad", "direct", 2, format="h5ad", expected_bytes=10**8)]
    art = model_artifacts(config, len(HUMAN))
    got = batch_footprint(datasets, ledger, model=art)
    processed = got["datasets"][0]["processed"]
    assert got["model_artifacts"]["source"] == "computed" and got["model_artifacts"]["cells"] == processed // 1000
    assert got["bytes"] == 10**8 + processed + art.bytes(processed // 1000)
    assert got["model_artifacts"]["bytes"] > 1 * GB  # more than the old fixed 1 GB: ~46 M parameters + replay


def test_a_saved_checkpoint_is_within_the_estimate(tmp_path):
    from atlasflow.model.train import Trainer

    config = load_config(overrides={"genes.vocab_path": "builtin:pbmc68k", "model.preset": "custom",
                                    "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 64})
    vocab = Vocabulary.builtin("pbmc68k")
    trainer = Trainer(config, vocab)
    for p in trainer.model.parameters():  # one step creates AdamW's moments, as training does
        p.grad = torch.ones_like(p)
    trainer.optimizer.step()
    path = trainer.save(tmp_path / "ckpt")
    written = sum(f.stat().st_size for f in Path(path).iterdir())
    est = checkpoint_size(config, len(vocab))
    assert written <= est.weights + est.optimizer + est.stats + 200_000  # + rng/progress JSON, torch headers
    assert written >= est.weights + est.optimizer  # no part of the real state is left out of the estimate


def test_flops_per_cell_follow_the_documented_formula():
    config = load_config(overrides={"model.preset": "gpu-small"})
    d, f, layers, s = 512, 2048, 8, 1201
    expected = (6 * layers * (4 * d * d + 2 * d * f) + 6 * d * 51) * s + 12 * layers * s * s * d + 6 * (d * d + d * len(HUMAN))
    assert training_flops_per_cell(config, len(HUMAN)) == expected


def test_checkpoint_clock_steps_minutes_and_agreement():
    now = [0.0]
    steps_only = CheckpointClock(3, None, now=lambda: now[0])
    assert [steps_only.due(s) for s in range(1, 7)] == [False, False, True, False, False, True]
    timed = CheckpointClock(100, 1.0, now=lambda: now[0])
    now[0] = 59.0
    assert not timed.due(1)
    now[0] = 60.0
    assert timed.due(2)  # a minute since the clock started
    now[0] = 100.0
    assert not timed.due(3)  # the save restarted the minute
    assert timed.due(100)  # steps still count
    now[0] = 170.0
    asked = []
    assert not timed.due(101, agree=lambda mine: asked.append(mine) or False)  # the other ranks said no
    assert asked == [True]


@pytest.mark.slow
def test_scvi_parameter_count_matches_scvi_tools():
    """The integration model's share of the reservation counts scVI's real parameters (as integrate builds it)."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp
    import scvi

    from atlasflow.model.sizing import _scvi_parameters

    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(1, (40, 300)).astype(np.float32)))
    adata.obs["dataset_id"] = [f"d{i % 4}" for i in range(40)]
    scvi.model.SCVI.setup_anndata(adata, batch_key="dataset_id")
    model = scvi.model.SCVI(adata, n_latent=10, n_layers=2, encode_covariates=True, use_layer_norm="both",
                            use_batch_norm="none", deeply_inject_covariates=False)
    assert sum(p.numel() for p in model.module.parameters()) == _scvi_parameters(300, 10, 2, 4)


@pytest.mark.parametrize(("minutes", "saves"), [(None, 0), (1.0, "every step")])
def test_training_saves_the_intra_batch_checkpoint_by_the_minutes(tmp_path, monkeypatch, minutes, saves):
    """The minutes reach the training loop: with a clock that moves a minute per step, every step saves."""
    import atlasflow.model.train as train_module
    from atlasflow.intake.manifest import Dataset
    from atlasflow.model.train import Trainer
    from atlasflow.prep.process import process_dataset
    from atlasflow_testing.realdata import pbmc_counts, write_format

    config = load_config(overrides={
        "model.preset": "custom", "model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 32,
        "model.max_genes": 32, "training.batch_cells": 32, "training.block_cells": 64, "training.val_fraction": 0,
        "training.checkpoint_every_steps": 10**6, "training.checkpoint_every_minutes": minutes, "qc.min_genes": 10,
        "genes.vocab_path": "builtin:pbmc68k", "training.replay_cells": 0})
    vocab = Vocabulary.builtin("pbmc68k")
    write_format(pbmc_counts()[:128].copy(), "h5ad", tmp_path / "raw")
    process_dataset(tmp_path / "raw", Dataset("d0", "https://h/x.h5ad", "direct", 2), config=config,
                    out_path=tmp_path / "batch_0000" / "d0.h5ad", vocab=vocab, cache_dir=tmp_path / "cache")
    ticks = iter(range(0, 10**6, 61))  # each look at the clock: 61 s later

    class FastClock(CheckpointClock):
        def __init__(self, every_steps: int, every_minutes: float | None) -> None:
            super().__init__(every_steps, every_minutes, now=lambda: float(next(ticks)))

    monkeypatch.setattr(train_module, "CheckpointClock", FastClock)
    saved: list[int] = []
    trainer = Trainer(config, vocab)
    real_save = trainer.save
    monkeypatch.setattr(trainer, "save", lambda path: saved.append(trainer.progress.global_step) or real_save(path))
    metrics = trainer.run_batch(tmp_path / "batch_0000", checkpoint=tmp_path / "ckpt")
    steps = metrics["steps"]
    assert steps >= 3
    assert saved == ([] if saves == 0 else list(range(1, steps + 1)))
