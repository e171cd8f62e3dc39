"""A synthetic reference indexed once per session with the real `kb ref` (a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.quant import build_reference
from atlasflow.testing.reads import make_reference

N_GENES = 12


def vocab_symbols(n: int) -> list[str]:
    """Real gene symbols from the default vocabulary, so processed data passes gene harmonisation."""
    from atlasflow.genes import Vocabulary

    return sorted(Vocabulary.load(None).symbol_set())[:n]


@pytest.fixture(scope="session")
def kb_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kbref")
    ref = make_reference(folder, n_genes=N_GENES, gene_names=vocab_symbols(N_GENES))
    paths = build_reference(ref.genome, ref.gtf, folder / "index")
    # a small on-list (500 barcodes; the simulated cells are drawn from it) keeps barcode correction
    # fast: kb's own 10x v3 list is 6.8 M barcodes and takes ~10 s per sample to load
    rng = np.random.default_rng(7)
    barcodes = sorted({"".join("ACGT"[i] for i in rng.integers(0, 4, 16)) for _ in range(500)})
    onlist = folder / "onlist.txt"
    onlist.write_text("\n".join(barcodes) + "\n")
    return {"ref": ref, "index": paths["index"], "t2g": paths["t2g"], "onlist": str(onlist), "barcodes": barcodes}
