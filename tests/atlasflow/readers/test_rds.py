"""RDS inputs written by real R (Debian's R, Matrix, SingleCellExperiment, SeuratObject), read with
rds2py's parser and checked against the same counts R wrote as CSV. Without R (and not root, so
scripts/local-r cannot install it) the R-written cases skip, saying why."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlasflow.core.config import AtlasConfig, QCConfig
from atlasflow.intake.manifest import Dataset, infer_format
from atlasflow.prep.genes import Vocabulary
from atlasflow.prep.process import DatasetQuarantined, process_dataset
from atlasflow.readers.formats import FormatError, detect_format, read_counts
from atlasflow.readers.rds import RdsError, read_rds_counts

REPO = Path(__file__).resolve().parents[3]
N_GENES = 30


@pytest.fixture(scope="module")
def r_fixtures(tmp_path_factory):
    setup = subprocess.run([str(REPO / "scripts" / "local-r"), "install"], capture_output=True, text=True, timeout=1200)
    if setup.returncode != 0:
        pytest.skip(f"R is not available: {setup.stderr.strip()}")
    out = tmp_path_factory.mktemp("rds")
    genes = sorted(Vocabulary.builtin("pbmc68k").symbol_set())[:N_GENES]
    (out / "genes.txt").write_text("\n".join(genes) + "\n")
    done = subprocess.run([str(REPO / "scripts" / "local-r"), "run", str(Path(__file__).with_name("rds_fixtures.R")),
                           str(out), str(out / "genes.txt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    truth = pd.read_csv(out / "truth.csv", index_col=0)  # genes x cells, as R holds counts
    return out, truth


def check_counts(adata, truth: pd.DataFrame) -> None:
    assert list(adata.var_names) == list(truth.index) and list(adata.obs_names) == list(truth.columns)
    np.testing.assert_array_equal(adata.X.toarray(), truth.to_numpy().T)


@pytest.mark.parametrize("name", ["counts_dgCMatrix.rds", "counts_dense.rds", "sce.rds", "seurat_v4.rds"])
@pytest.mark.slow
def test_r_written_counts_read_exactly(r_fixtures, name):
    out, truth = r_fixtures
    assert detect_format(out / name) == "rds" and infer_format(f"https://x.org/{name}") == "rds"
    adata = read_counts(out / name)
    check_counts(adata, truth)
    assert adata.uns["atlasflow_read"]["format"] == "rds"


def test_single_cell_experiment_brings_col_data_and_row_data(r_fixtures):
    out, truth = r_fixtures
    counts = read_rds_counts(out / "sce.rds")
    assert counts.r_class == "SingleCellExperiment" and counts.assay == "counts"  # not logcounts
    assert counts.obs["cell_type"][:5] == ["T", "B", "NK", "Mono", "T"]  # a factor, as labels
    assert counts.obs["donor"][0] == "d1" and counts.obs["donor"][-1] == "d2"
    assert counts.gene_ids[:2] == ["ENSG00000000001", "ENSG00000000002"]
    adata = read_counts(out / "sce.rds")
    assert list(adata.obs["cell_type"][:4]) == ["T", "B", "NK", "Mono"]
    assert list(adata.var["gene_id"][:1]) == ["ENSG00000000001"]


def test_seurat_v4_object_brings_its_meta_data(r_fixtures):
    out, _ = r_fixtures
    counts = read_rds_counts(out / "seurat_v4.rds")
    assert counts.r_class == "Seurat" and counts.assay == "RNA"
    assert counts.obs["orig.ident"][0] == "fixture" and counts.obs["cell_type"][:2] == ["T", "B"]


def test_rds_dataset_goes_through_processing_with_cell_types(r_fixtures, tmp_path):
    out, truth = r_fixtures
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "sce.rds").write_bytes((out / "sce.rds").read_bytes())
    config = AtlasConfig(qc=QCConfig(min_genes=1, min_cells=1, max_pct_mito=100, min_vocab_coverage=0))
    ds = Dataset("r1", "https://x.org/sce.rds", "direct", 2, format="rds", cell_type_key="cell_type")
    summary = process_dataset(raw, ds, config=config, out_path=tmp_path / "r1.h5ad", vocab=Vocabulary.builtin("pbmc68k"),
                              cache_dir=tmp_path / "cache")
    assert summary["format"] == "rds" and summary["cells_before"] == truth.shape[1]
    import anndata as ad

    processed = ad.read_h5ad(tmp_path / "r1.h5ad")
    assert set(processed.obs["cell_type"]) == {"T", "B", "NK", "Mono"}


@pytest.mark.parametrize(("name", "message"), [
    ("a_data_frame.rds", r"class 'data.frame'.*holds no counts .*saveRDS\(as\(counts, 'dgCMatrix'\)"),
    ("a_model.rds", r"class 'lm'.*holds no counts"),
])
def test_other_r_objects_name_their_class_and_the_conversion(r_fixtures, name, message):
    out, _ = r_fixtures
    with pytest.raises(FormatError, match=message):
        read_counts(out / name)


@pytest.mark.timeout(60)
def test_damaged_rds_is_a_format_error_that_quarantines(tmp_path):
    # rds2py's parser spins forever on a damaged gzip stream: the reader must refuse it first
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "x.rds").write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    with pytest.raises(RdsError, match="x.rds: not a readable RDS file"):
        read_rds_counts(tmp_path / "raw" / "x.rds")
    good = gzip.compress(b"X\n\x00\x00\x00\x03" + bytes(200))
    (tmp_path / "cut.rds").write_bytes(good[: len(good) // 2])
    with pytest.raises(RdsError, match="cut.rds: not a readable RDS file \\(the gzip stream is truncated\\)"):
        read_rds_counts(tmp_path / "cut.rds")
    (tmp_path / "bz.rds").write_bytes(b"BZh91AY&SY")
    with pytest.raises(RdsError, match="compressed with bzip2, which is not read; in R: saveRDS"):
        read_rds_counts(tmp_path / "bz.rds")
    ds = Dataset("x", "https://x.org/x.rds", "direct", 2, format="rds")
    with pytest.raises(DatasetQuarantined, match="x.rds: not a readable RDS file"):
        process_dataset(tmp_path / "raw", ds, config=AtlasConfig(), out_path=tmp_path / "x.h5ad",
                        vocab=Vocabulary.builtin("pbmc68k"), cache_dir=tmp_path / "cache")
