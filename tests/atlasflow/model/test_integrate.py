"""scVI on the first batch, scArches surgery onto it for the second (1 epoch on real cells)."""

from __future__ import annotations

import json

import anndata as ad

from atlasflow.config import IntegrationConfig
from atlasflow.integrate import integrate_batch

from .test_train import batches  # noqa: F401  (module-scoped fixture of two processed batches)


def test_reference_then_surgery(batches, tmp_path):  # noqa: F811
    config = IntegrationConfig(max_epochs=1, n_latent=5)
    first = integrate_batch(batches / "batch_0000", tmp_path / "batch_0000", config=config, accelerator="cpu")
    second = integrate_batch(batches / "batch_0001", tmp_path / "batch_0001", config=config,
                             previous=tmp_path / "batch_0000", accelerator="cpu")
    assert first["mode"] == "reference" and second["mode"] == "scarches_query"
    assert first["datasets"] == ["d0", "d1"] and second["datasets"] == ["d2", "d3"]
    assert second["genes"] == first["genes"]  # the query was padded/aligned to the reference's genes
    latent = ad.read_h5ad(tmp_path / "batch_0001" / "latent.h5ad")
    assert latent.obsm["X_scVI"].shape == (second["cells"], 5)
    assert "silhouette_dataset_scvi" in second and "silhouette_dataset_unintegrated" in second
    assert (tmp_path / "batch_0001" / "model" / "model.pt").exists()
    assert json.loads((tmp_path / "batch_0001" / "result.json").read_text()) == second
    # idempotent: a second call returns the stored result without retraining
    assert integrate_batch(batches / "batch_0001", tmp_path / "batch_0001", config=config,
                           previous=tmp_path / "batch_0000", accelerator="cpu") == second
