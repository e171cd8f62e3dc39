"""scVI on the first batch, scArches surgery onto it for the second (1 epoch on real cells)."""

from __future__ import annotations

import json

import anndata as ad
import pytest

from atlasflow.core.config import IntegrationConfig
from atlasflow.model import integration_metrics as M
from atlasflow.model.integrate import integrate_batch, scoring_pool

from .test_train import batches  # noqa: F401  (module-scoped fixture of two processed batches)


@pytest.mark.slow


def test_reference_then_surgery(batches, tmp_path):  # noqa: F811
    import torch

    config = IntegrationConfig(max_epochs=1, n_latent=5)
    threads = torch.get_num_threads()
    first = integrate_batch(batches / "batch_0000", tmp_path / "batch_0000", config=config, accelerator="cpu",
                            threads=threads + 1)
    # scVI trained with the threads asked for, and this process got its own count back
    assert first["cpu_threads"] == threads + 1 and torch.get_num_threads() == threads
    second = integrate_batch(batches / "batch_0001", tmp_path / "batch_0001", config=config,
                             previous=tmp_path / "batch_0000", accelerator="cpu")
    assert first["mode"] == "reference" and second["mode"] == "scarches_query"
    assert first["datasets"] == ["d0", "d1"] and second["datasets"] == ["d2", "d3"]
    assert second["genes"] == first["genes"]  # the query was padded/aligned to the reference's genes
    latent = ad.read_h5ad(tmp_path / "batch_0001" / "latent.h5ad")
    assert latent.obsm["X_scVI"].shape == (second["cells"], 5)
    # scIB scores of the latent beside PCA(50) of log-normalised counts, on the same cells: the query's
    # sample together with the reference's pool, embedded by the query model
    for result, earlier in ((first, 0), (second, first["cells"])):
        scib = result["scib"]
        assert scib["cells_earlier_batches"] == earlier and scib["cells_this_batch"] == result["cells"]
        assert scib["cells"] == earlier + result["cells"] and scib["unlabelled"] == scib["batch_unlabelled"] == 0
        assert scib["cell_types"] > 2 and scib["batches"] == (2 if earlier == 0 else 4)
        for emb in ("scvi", "pca"):
            assert set(scib[emb]) == {*M.BIO_METRICS, *M.BATCH_METRICS, "bio_conservation", "batch_correction",
                                      "total"}
            assert all(0 <= v <= 1 for v in scib[emb].values()), scib[emb]
    pool = ad.read_h5ad(tmp_path / "batch_0001" / "scoring.h5ad")
    assert pool.n_obs == second["scib"]["cells"] and list(pool.var_names) == list(ad.read_h5ad(
        tmp_path / "batch_0000" / "scoring.h5ad").var_names)
    assert sorted(pool.obs["integration_batch"].unique()) == ["batch_0000", "batch_0001"]
    assert (tmp_path / "batch_0001" / "model" / "model.pt").exists()
    assert json.loads((tmp_path / "batch_0001" / "result.json").read_text()) == second
    # idempotent: a second call returns the stored result without retraining
    assert integrate_batch(batches / "batch_0001", tmp_path / "batch_0001", config=config,
                           previous=tmp_path / "batch_0000", accelerator="cpu") == second


def test_scoring_pool_keeps_labelled_cells_and_an_equal_share_per_batch():
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    def batch(n: int, ds: str, labels: list) -> ad.AnnData:
        a = ad.AnnData(X=sp.csr_matrix(np.ones((n, 3), dtype=np.float32)))
        a.obs_names = [f"{ds}:{i}" for i in range(n)]
        a.var_names = ["A", "B", "C"]
        a.obs["dataset_id"] = ds
        a.obs["cell_type"] = pd.Categorical((labels * n)[:n])  # None: a category code of -1, read back as NaN
        return a

    first = scoring_pool(batch(10, "d0", ["T", None, "nan", "B", "unknown"]), "batch_0000", None, seed=0, per_batch=4)
    # only labelled cells are sampled (the others would be left out of every metric anyway)
    assert first.n_obs == 4 and set(first.obs["cell_type"]) <= {"T", "B"}
    unlabelled = scoring_pool(batch(6, "d1", [None]), "batch_0001", first, seed=0, per_batch=4, cap=100)
    # a batch with no label at all keeps a sample for iLISI, its labels stored as ""
    assert unlabelled.n_obs == 8 and (unlabelled.obs["cell_type"] == "").sum() == 4
    capped = scoring_pool(batch(50, "d2", ["T", "B"]), "batch_0002", unlabelled, seed=0, per_batch=30, cap=9)
    assert capped.obs["integration_batch"].value_counts().to_dict() == {"batch_0000": 3, "batch_0001": 3,
                                                                        "batch_0002": 3}
    with pytest.raises(ValueError, match="genes"):
        scoring_pool(batch(5, "d3", ["T"])[:, ["A", "B"]], "batch_0003", first, seed=0)
