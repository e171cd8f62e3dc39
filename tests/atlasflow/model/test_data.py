"""BatchData over files whose gene axes differ (QC keeps different genes per dataset)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasflow.genes import Vocabulary
from atlasflow.model.data import BatchData
from atlasflow.model.tokenizer import Tokenizer


def test_validation_counts_are_aligned_to_the_vocabulary(tmp_path):
    vocab = Vocabulary.load("builtin:pbmc68k")
    genes = list(vocab.symbols)
    rng = np.random.default_rng(0)
    expected = {}
    for name, cols in (("a", genes[:40]), ("b", genes[10:30][::-1] + ["NOT_A_GENE"])):
        x = sp.random(5, len(cols), density=0.5, format="csr", random_state=rng, dtype=np.float32)
        x.data = np.ceil(x.data * 9)
        obs = pd.DataFrame({"cell_type": ["t"] * 5}, index=[f"{name}{i}" for i in range(5)])
        ad.AnnData(x, obs=obs, var=pd.DataFrame(index=cols)).write_h5ad(tmp_path / f"{name}.h5ad")
        dense = np.zeros((5, len(genes)), dtype=np.float32)
        for j, g in enumerate(cols):
            if g in genes:
                dense[:, genes.index(g)] = x[:, j].toarray().ravel()
        expected[name] = dense
    data = BatchData(tmp_path, vocab, Tokenizer(len(vocab), 16, 11), seed=0, block_cells=16, val_fraction=0.9)
    data.val = data.train + data.val  # both files, whatever the split chose
    labels, counts = data.val_labels_and_counts("cell_type")
    assert counts.shape == (10, len(genes)) and list(labels) == ["t"] * counts.shape[0]
    want = np.vstack([expected[f.dataset_id] for f in data.val])
    np.testing.assert_array_equal(counts.toarray(), want)
