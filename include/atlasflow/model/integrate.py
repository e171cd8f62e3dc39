"""Integration of each batch with scVI, extended batch by batch with scArches surgery.

The first batch trains a reference scVI model on its counts with ``batch_key="dataset_id"``. Each
later batch is mapped onto the previous model with ``SCVI.load_query_data`` (scArches): the
latent space is extended to the new datasets, not retrained. The latent embedding and model go
to ``models/integration/<batch_id>/``; the latent is used as the evaluation reference for the
foundation model, not as its training target.

The latent is scored with the scIB metrics (:mod:`atlasflow.model.integration_metrics`) beside the
unintegrated baseline, PCA(50) of log-normalised counts of the same cells on the same genes, with
unlabelled cells left out. The cells scored are the *scoring pool*: a seeded sample of the
batch's cells (at most ``SCORE_CELLS_PER_BATCH``) together with the pool the previous batch kept,
so a query batch is scored with its reference cells, embedded by the query model. The pool's
counts are kept in ``scoring.h5ad`` for the next batch, because the reference batches' processed
files are deleted once they are trained; it is capped at ``SCORE_POOL_CELLS`` cells, every batch
keeping an equal share, so it stays small however many batches stream by.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from atlasflow.core.config import IntegrationConfig
from atlasflow.core.fsutil import write_json_atomic

__all__ = ["SCORE_CELLS_PER_BATCH", "SCORE_POOL_CELLS", "integrate_batch", "load_batch", "scoring_pool"]

log = logging.getLogger(__name__)

# silhouettes cost cells^2: a few thousand cells give stable scores within seconds
SCORE_CELLS_PER_BATCH = 1000
SCORE_POOL_CELLS = 4000
_POOL_OBS = ("dataset_id", "cell_type", "integration_batch")


def load_batch(batch_dir: Path) -> Any:
    """The batch's processed datasets concatenated (outer join on genes, missing genes are 0)."""
    import anndata as ad

    files = sorted(batch_dir.glob("*.h5ad"))
    if not files:
        raise FileNotFoundError(f"{batch_dir}: no processed .h5ad files")
    parts = [ad.read_h5ad(f) for f in files]
    adata = ad.concat(parts, join="outer", fill_value=0, merge="first") if len(parts) > 1 else parts[0]
    hv = np.zeros(adata.n_vars)
    for p in parts:
        hv += adata.var_names.isin(p.var_names[p.var["highly_variable"].to_numpy(bool)])
    adata.var["hv_datasets"] = hv
    adata.obs["dataset_id"] = adata.obs["dataset_id"].astype(str)
    return adata


def _quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _labels(obs: Any) -> np.ndarray:
    """The cells' ``cell_type`` as objects (missing values kept), or all ``""`` without the column."""
    if "cell_type" not in obs:
        return np.full(len(obs), "", dtype=object)
    return np.asarray(obs["cell_type"], dtype=object)


def _sample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` of ``range(n)`` (all when fewer), sorted so the pool keeps the cells' order."""
    return np.sort(rng.choice(n, size=min(n, size), replace=False))


def scoring_pool(adata: Any, batch_id: str, previous_pool: Any | None, *, seed: int,
                 per_batch: int = SCORE_CELLS_PER_BATCH, cap: int = SCORE_POOL_CELLS) -> Any:
    """The cells a batch's latent is scored on: a sample of ``adata`` plus the previous pool.

    Parameters
    ----------
    adata
        The batch's counts on the model's genes (after subsetting or query alignment).
    batch_id
        Written to ``obs["integration_batch"]``, to tell reference from query cells.
    previous_pool
        The previous batch's ``scoring.h5ad`` (None for the reference batch); its genes must be
        ``adata``'s.
    seed
        Sampling seed: the same inputs give the same pool.
    per_batch, cap
        Cells sampled from this batch (from its labelled cells when it has any); cells kept in
        all (each batch keeps ``cap // batches``).

    Returns
    -------
    anndata.AnnData
        Raw counts (CSR float32) with obs ``dataset_id``, ``cell_type`` (``""`` when unlabelled),
        ``integration_batch``.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from atlasflow.model.integration_metrics import labelled_mask

    rng = np.random.default_rng(seed)
    labels = _labels(adata.obs)
    known = labelled_mask(labels)
    # unlabelled cells are left out of every metric but iLISI: keep them only when nothing else is there
    candidates = np.flatnonzero(known) if known.any() else np.arange(adata.n_obs)
    chosen = candidates[_sample(len(candidates), per_batch, rng)]
    own = adata[chosen]
    obs = pd.DataFrame({"dataset_id": own.obs["dataset_id"].astype(str).to_numpy(),
                        # "" is the one spelling of "no label" in the pool, whatever the source said
                        "cell_type": np.where(known[chosen], labels[chosen], ""),
                        "integration_batch": np.full(own.n_obs, batch_id)},
                       index=own.obs_names.astype(str))
    fresh = ad.AnnData(X=sp.csr_matrix(own.X, dtype=np.float32), obs=obs.astype("category"))
    fresh.var_names = adata.var_names
    if previous_pool is None:
        return fresh
    if not previous_pool.var_names.equals(adata.var_names):
        raise ValueError(f"{batch_id}: the previous scoring pool's genes are not the model's")
    pool = ad.concat([previous_pool, fresh], join="inner")
    pool.obs = pool.obs[list(_POOL_OBS)].astype(str).astype("category")
    groups = pool.obs["integration_batch"].to_numpy()
    # an equal share per batch, so the first batches are not crowded out as the stream grows
    share = cap // len(np.unique(groups))
    keep = []
    for group in np.unique(groups):
        idx = np.flatnonzero(groups == group)
        keep.append(idx[_sample(len(idx), share, rng)])
    return pool[np.sort(np.concatenate(keep))].copy()


def _score_pool(model: Any, pool: Any, batch_id: str, seed: int) -> dict[str, Any]:
    """scIB metrics of the model's latent and of PCA(50) of log-normalised counts, on the pool's cells."""
    from atlasflow.model.integration_metrics import score_embeddings
    from atlasflow.model.train import log_normalised_pca

    latent = model.get_latent_representation(pool.copy())  # a copy: scvi-tools registers fields on it
    scores = score_embeddings({"scvi": latent, "pca": log_normalised_pca(pool.X)}, pool.obs["cell_type"].to_numpy(),
                              pool.obs["dataset_id"].to_numpy(), seed=seed)
    own = pool.obs["integration_batch"].to_numpy() == batch_id
    return {**scores.to_dict(), "cells_this_batch": int(own.sum()), "cells_earlier_batches": int((~own).sum())}


def integrate_batch(batch_dir: Path, out_dir: Path, *, config: IntegrationConfig, previous: Path | None = None,
                    accelerator: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """Integrate ``batch_dir``; write ``out_dir/{model/, latent.h5ad, scoring.h5ad, result.json}`` atomically.

    Parameters
    ----------
    previous
        The previous batch's integration folder: when given, scArches surgery onto its model, and
        its ``scoring.h5ad`` pool is scored with this batch's cells.
    threads
        torch's CPU threads while integrating (restored afterwards); ``None``: as they are.

    Returns
    -------
    dict
        ``result.json``: mode, cells, genes, datasets, training figures and ``scib``, the scIB
        metrics of the latent (``scvi``) and of PCA(50) of log-normalised counts (``pca``) on the
        pool's labelled cells (:meth:`atlasflow.model.integration_metrics.IntegrationScores.to_dict`,
        plus ``cells_this_batch`` and ``cells_earlier_batches`` of the pool and ``batch_unlabelled``,
        the batch's cells without a label).
    """
    if (out_dir / "result.json").exists():
        return json.loads((out_dir / "result.json").read_text())
    from atlasflow.model.threads import torch_threads

    with torch_threads(threads):
        return _integrate(batch_dir, out_dir, config=config, previous=previous, accelerator=accelerator)


def _integrate(batch_dir: Path, out_dir: Path, *, config: IntegrationConfig, previous: Path | None,
               accelerator: str) -> dict[str, Any]:
    import anndata as ad
    import scvi
    import torch

    from atlasflow.model.integration_metrics import labelled_mask

    _quiet()
    t0 = time.monotonic()
    scvi.settings.seed = config.seed
    adata = load_batch(batch_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kwargs = {"max_epochs": config.max_epochs, "accelerator": accelerator, "enable_progress_bar": False,
                  "enable_model_summary": False, "enable_checkpointing": False}
        if previous is None:
            order = np.argsort(-adata.var["hv_datasets"].to_numpy(), kind="stable")[: config.n_genes]
            adata = adata[:, np.sort(order)].copy()
            scvi.model.SCVI.setup_anndata(adata, batch_key="dataset_id")
            model = scvi.model.SCVI(adata, n_latent=config.n_latent, n_layers=config.n_layers, encode_covariates=True,
                                    use_layer_norm="both", use_batch_norm="none", deeply_inject_covariates=False)
            model.train(**kwargs)
            mode = "reference"
        else:
            ref = previous / "model"
            scvi.model.SCVI.prepare_query_anndata(adata, str(ref))
            model = scvi.model.SCVI.load_query_data(adata, str(ref), accelerator=accelerator)
            model.train(plan_kwargs={"weight_decay": 0.0}, **kwargs)
            mode = "scarches_query"
        latent = model.get_latent_representation()
        model.save(str(tmp / "model"), save_anndata=False)
        previous_pool = None
        if previous is not None and (previous / "scoring.h5ad").exists():
            previous_pool = ad.read_h5ad(previous / "scoring.h5ad")
        elif previous is not None:  # a folder from before scoring pools: the query is scored alone
            log.warning("%s: %s keeps no scoring pool; scoring the query cells alone", batch_dir.name, previous)
        pool = scoring_pool(adata, batch_dir.name, previous_pool, seed=config.seed)
        # compressed: raw counts compress several-fold and the pool lives as long as the model
        pool.write_h5ad(tmp / "scoring.h5ad", compression="gzip")
        scib = _score_pool(model, pool, batch_dir.name, config.seed)
        scib["batch_unlabelled"] = int((~labelled_mask(_labels(adata.obs))).sum())
        out = ad.AnnData(obs=adata.obs[[c for c in ("dataset_id", "batch", "cell_type") if c in adata.obs]].copy())
        out.obsm["X_scVI"] = latent.astype(np.float32)
        out.write_h5ad(tmp / "latent.h5ad")
        result = {"batch_id": batch_dir.name, "mode": mode, "previous": str(previous) if previous else None,
                  "cells": int(adata.n_obs), "genes": int(adata.n_vars), "datasets": sorted(adata.obs["dataset_id"].unique()),
                  "latent_dim": int(latent.shape[1]), "epochs": config.max_epochs,
                  "train_loss": float(model.history["train_loss"].iloc[-1, 0]),
                  "scib": scib, "cpu_threads": torch.get_num_threads(), "seconds": round(time.monotonic() - t0, 2)}
        write_json_atomic(tmp / "result.json", result)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s integrated (%s): %d cells (%d unlabelled); scIB total scVI %s vs PCA %s on %d labelled cells",
             batch_dir.name, mode, result["cells"], scib["batch_unlabelled"], scib["scvi"]["total"],
             scib["pca"]["total"], scib["cells"])
    result_path = out_dir / "result.json"
    return json.loads(result_path.read_text())
