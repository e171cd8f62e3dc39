"""A synthetic reference indexed once per session with the real `kb ref` (a few seconds); a random file
served by the local stand-in."""

from __future__ import annotations

import os

import pytest

from atlasflow_testing.geo_server import GeoServer
from atlasflow_testing.reads import indexed_reference

N_GENES = 12


def vocab_symbols(n: int) -> list[str]:
    """Real gene symbols from the demo's small vocabulary (what build_fastq_demo's config sets), so
    processed data passes gene harmonisation."""
    from atlasflow.prep.genes import Vocabulary

    return sorted(Vocabulary.builtin("pbmc68k").symbol_set())[:n]


@pytest.fixture(scope="session")
def kb_reference(tmp_path_factory):
    return indexed_reference(tmp_path_factory.mktemp("kbref"), n_genes=N_GENES, gene_names=vocab_symbols(N_GENES))


@pytest.fixture
def served(request, tmp_path):
    """A random file of the test module's ``SIZE`` bytes served at ``/files/data.h5ad`` by the stand-in:
    yields ``(server, data, destination folder)``."""
    root = tmp_path / "www"
    (root / "files").mkdir(parents=True)
    data = os.urandom(request.module.SIZE)
    (root / "files" / "data.h5ad").write_bytes(data)
    with GeoServer(root) as server:
        yield server, data, tmp_path / "dest"
