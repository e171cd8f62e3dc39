"""Integration of each batch with scVI, extended batch by batch with scArches surgery.

The first batch trains a reference scVI model on its counts with ``batch_key="dataset_id"``. Each
later batch is mapped onto the previous model with ``SCVI.load_query_data`` (scArches): the
latent space is extended to the new datasets, not retrained. The latent embedding and model go
to ``models/integration/<batch_id>/``; the latent is scored (dataset mixing and cell-type
separation, against the unintegrated PCA of the same cells) and used as the evaluation
reference for the foundation model, not as its training target.
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

from atlasflow.config import IntegrationConfig
from atlasflow.fsutil import write_json_atomic

__all__ = ["integrate_batch", "load_batch"]

log = logging.getLogger(__name__)


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


def _scores(latent: np.ndarray, baseline: np.ndarray, obs: Any) -> dict[str, Any]:
    """Silhouette by dataset (lower: better mixed) and by cell type (higher: better separated)."""
    from sklearn.metrics import silhouette_score

    out: dict[str, Any] = {}
    n = latent.shape[0]
    sample = np.random.default_rng(0).choice(n, size=min(n, 3000), replace=False)
    for key, name in (("dataset_id", "dataset"), ("cell_type", "cell_type")):
        if key not in obs or obs[key].astype(str).nunique() < 2:
            continue
        labels = obs[key].astype(str).to_numpy()[sample]
        out[f"silhouette_{name}_scvi"] = round(float(silhouette_score(latent[sample], labels)), 4)
        out[f"silhouette_{name}_unintegrated"] = round(float(silhouette_score(baseline[sample], labels)), 4)
    return out


def integrate_batch(batch_dir: Path, out_dir: Path, *, config: IntegrationConfig, previous: Path | None = None,
                    accelerator: str = "auto") -> dict[str, Any]:
    """Integrate ``batch_dir``; write ``out_dir/{model/, latent.h5ad, result.json}`` atomically.

    Parameters
    ----------
    previous
        The previous batch's integration folder: when given, scArches surgery onto its model.
    """
    import anndata as ad
    import scanpy as sc
    import scvi

    if (out_dir / "result.json").exists():
        return json.loads((out_dir / "result.json").read_text())
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
        norm = adata.copy()
        sc.pp.normalize_total(norm, target_sum=1e4)
        sc.pp.log1p(norm)
        baseline = sc.pp.pca(norm.X, n_comps=min(50, norm.n_vars - 1, norm.n_obs - 1))
        out = ad.AnnData(obs=adata.obs[[c for c in ("dataset_id", "batch", "cell_type") if c in adata.obs]].copy())
        out.obsm["X_scVI"] = latent.astype(np.float32)
        out.write_h5ad(tmp / "latent.h5ad")
        result = {"batch_id": batch_dir.name, "mode": mode, "previous": str(previous) if previous else None,
                  "cells": int(adata.n_obs), "genes": int(adata.n_vars), "datasets": sorted(adata.obs["dataset_id"].unique()),
                  "latent_dim": int(latent.shape[1]), "epochs": config.max_epochs,
                  "train_loss": float(model.history["train_loss"].iloc[-1, 0]),
                  "seconds": round(time.monotonic() - t0, 2), **_scores(latent, baseline, out.obs)}
        write_json_atomic(tmp / "result.json", result)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s integrated (%s): %d cells, %s", batch_dir.name, mode, result["cells"],
             {k: v for k, v in result.items() if k.startswith("silhouette")})
    result_path = out_dir / "result.json"
    return json.loads(result_path.read_text())
