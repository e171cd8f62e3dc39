"""Formats, QC, gene harmonisation and the processed file, on real cells (pbmc68k_reduced counts)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from atlasflow.core.config import load_config
from atlasflow.intake.manifest import Dataset
from atlasflow.prep.genes import Vocabulary, map_genes
from atlasflow.prep.process import DatasetQuarantined, process_dataset
from atlasflow.readers.formats import FormatError, detect_format, read_counts, safe_extract
from atlasflow_testing.realdata import WRITABLE_FORMATS, pbmc_counts, write_format

CONFIG = load_config(overrides={"qc.min_genes": 10, "qc.min_cells": 3, "qc.max_pct_mito": 20})
VOCAB = Vocabulary.builtin("pbmc68k")  # these cells' own 765 genes (the default vocabulary is human)


@pytest.fixture(scope="module")
def pbmc():
    return pbmc_counts()


def process(raw: Path, tmp: Path, dataset_id: str = "ds", config=CONFIG, **kw):
    return process_dataset(raw, Dataset(dataset_id, "https://h/x", "direct", 2, **kw), config=config,
                           out_path=tmp / "processed" / f"{dataset_id}.h5ad", vocab=VOCAB,
                           cache_dir=tmp / "cache")


def test_counts_recovered_are_integers(pbmc):
    assert pbmc.shape == (700, 765)
    assert np.all(np.mod(pbmc.X.data, 1) == 0) and pbmc.X.sum() > 1e5


@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_every_format_reads_back_the_same_counts(pbmc, tmp_path, fmt):
    path = write_format(pbmc, fmt, tmp_path / "raw")
    expected = {"10x_mtx_dir": "10x_mtx", "10x_mtx_tar": "10x_mtx", "tsv_gz": "tsv"}.get(fmt, fmt)
    assert detect_format(path) == expected
    got = read_counts(path, cache=tmp_path / "cache", dataset_id="ds", vocabulary=VOCAB.symbol_set())
    assert list(got.var_names) == list(pbmc.var_names) and list(got.obs_names) == list(pbmc.obs_names)
    assert (got.layers["counts"] != pbmc.X).nnz == 0
    assert got.uns["atlasflow_read"]["non_integer"] is False and (got.obs["dataset_id"] == "ds").all()


def test_table_orientation_is_detected_without_a_vocabulary(pbmc, tmp_path):
    path = write_format(pbmc[:100], "csv", tmp_path)  # 765 genes x 100 cells: genes on the longer axis
    got = read_counts(path)
    assert got.shape == (100, 765) and got.uns["atlasflow_read"]["orientation"] == "genes x cells"


@pytest.mark.parametrize("fmt", ["h5ad", "10x_mtx_tar", "loom", "csv"])
def test_processing_is_identical_across_formats(pbmc, tmp_path, fmt):
    write_format(pbmc, fmt, tmp_path / "raw")
    summary = process(tmp_path / "raw", tmp_path)
    out = ad.read_h5ad(summary["path"])
    reference_dir = tmp_path / "ref"
    write_format(pbmc, "h5ad", reference_dir)
    ref = ad.read_h5ad(process(reference_dir, tmp_path / "r")["path"])
    assert out.shape == ref.shape and (out.X != ref.X).nnz == 0
    assert summary["cells_before"] == 700 and summary["cells_after"] == out.n_obs > 600
    assert summary["coverage"]["vocab_fraction"] == pytest.approx(out.n_vars / 765, abs=0.02)


def test_processed_file_follows_the_contract(pbmc, tmp_path):
    write_format(pbmc, "h5ad", tmp_path / "raw")
    summary = process(tmp_path / "raw", tmp_path, dataset_id="pbmc1", disease_status="control", tissue_type="blood",
                      cell_type_key="bulk_labels")
    out = ad.read_h5ad(summary["path"])
    assert sp.issparse(out.X) and out.X.dtype == np.float32 and np.all(np.mod(out.X.data, 1) == 0)
    assert out.obs_names[0].startswith("pbmc1:") and out.obs_names.is_unique
    assert set(out.obs["dataset_id"]) == {"pbmc1"} and set(out.obs["batch"]) == {"pbmc1"}
    assert set(out.obs["disease_status"]) == {"control"} and out.obs["cell_type"].nunique() == 10
    assert set(out.var_names) <= VOCAB.symbol_set() and out.var["highly_variable"].sum() > 0
    assert out.uns["atlasflow"]["vocab_version"] == VOCAB.version
    # counts are the input's counts, cell for cell and gene for gene
    cells = [c.split(":", 1)[1] for c in out.obs_names]
    upper = {g.upper(): g for g in pbmc.var_names}  # the vocabulary holds upper-case symbols
    src = pbmc[cells, [upper[g] for g in out.var_names]].X
    assert (out.X != src).nnz == 0
    qc = out.uns["atlasflow"]["qc"]
    assert qc["cells_before"] - qc["cells_after"] <= sum(qc["removed"].values())
    assert not list((tmp_path / "processed").glob(".*tmp"))


def test_chunked_and_in_memory_agree(pbmc, tmp_path):
    write_format(pbmc, "h5ad", tmp_path / "raw")
    chunked = CONFIG.with_overrides({"qc.strategy": "chunked", "qc.chunk_cells": 128})
    a = process(tmp_path / "raw", tmp_path / "a", config=chunked)
    b = process(tmp_path / "raw", tmp_path / "b", config=CONFIG.with_overrides({"qc.strategy": "in_memory"}))
    assert (a["strategy"], b["strategy"]) == ("chunked", "in_memory")
    xa, xb = ad.read_h5ad(a["path"]), ad.read_h5ad(b["path"])
    assert (xa.X != xb.X).nnz == 0 and list(xa.obs_names) == list(xb.obs_names)
    assert list(xa.var["highly_variable"]) == list(xb.var["highly_variable"])


def test_qc_rules_remove_cells_and_say_which(pbmc, tmp_path):
    write_format(pbmc, "h5ad", tmp_path / "raw")
    strict = CONFIG.with_overrides({"qc.min_genes": 230, "qc.max_counts": 3000})
    summary = process(tmp_path / "raw", tmp_path, config=strict)
    genes_per_cell = np.diff(pbmc.X.indptr)
    assert summary["removed"]["min_genes"] == int((genes_per_cell < 230).sum()) > 0
    assert summary["removed"]["max_counts"] == int((np.asarray(pbmc.X.sum(axis=1)).ravel() > 3000).sum())


def test_ensembl_ids_map_with_version_suffixes():
    vocab = Vocabulary.from_genes(["CD3E", "MS4A1", "LYZ"], ["ENSG00000198851", "ENSG00000156738", None])
    m = map_genes(["ENSG00000198851.9", "ms4a1", "NOTAGENE", "LYZ", "lyz"], vocab)
    assert m.positions == (0, 1, -1, 2, -1) and m.matched_by_id == 1 and m.vocab_fraction == 1.0


def test_low_coverage_is_quarantined_not_fatal(pbmc, tmp_path):
    unknown = pbmc.copy()
    unknown.var_names = [g + "_X" for g in pbmc.var_names]  # nothing maps
    write_format(unknown, "h5ad", tmp_path / "raw")
    with pytest.raises(DatasetQuarantined, match="cover 0.0% of the vocabulary"):
        process(tmp_path / "raw", tmp_path)
    assert not (tmp_path / "processed" / "ds.h5ad").exists()


def test_no_cell_passing_is_quarantined(pbmc, tmp_path):
    write_format(pbmc, "h5ad", tmp_path / "raw")
    with pytest.raises(DatasetQuarantined, match="no cell passed QC"):
        process(tmp_path / "raw", tmp_path, config=CONFIG.with_overrides({"qc.min_genes": 10_000}))


# ---- bad inputs ---------------------------------------------------------------------------------


def test_truncated_h5ad(pbmc, tmp_path):
    path = write_format(pbmc, "h5ad", tmp_path / "raw")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetQuarantined, match="data.h5ad"):
        process(tmp_path / "raw", tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "empty.h5ad").write_bytes(b"")
    with pytest.raises(DatasetQuarantined, match="empty.h5ad: the file is empty"):
        process(tmp_path / "raw", tmp_path)


def test_csv_with_non_numeric_cells(pbmc, tmp_path):
    path = write_format(pbmc[:50], "csv", tmp_path / "raw")
    text = path.read_text().splitlines()
    text[5] = text[5].rsplit(",", 1)[0] + ",seven"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(DatasetQuarantined, match="non-numeric values, e.g. 'seven'"):
        process(tmp_path / "raw", tmp_path)


def test_tar_with_parent_member_is_refused(tmp_path):
    archive = tmp_path / "raw" / "evil.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        data = b"pwned"
        info = tarfile.TarInfo("../../outside.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetQuarantined, match=r"refusing member '\.\./\.\./outside\.txt'"):
        process(tmp_path / "raw", tmp_path)
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize("kind", ["symlink", "absolute", "oversized"])
def test_unsafe_tar_members(tmp_path, kind):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("/etc/x" if kind == "absolute" else "member")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 10
            tar.addfile(info, io.BytesIO(b"0123456789"))
    with pytest.raises(FormatError, match="refusing member|over the"):
        safe_extract(archive, tmp_path / "out", max_member_bytes=5 if kind == "oversized" else 10**9)


def test_rds_and_unknown_files_name_the_file(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "seurat.rds").write_bytes(b"X\n\x00\x00\x00\x03")
    # a cut-off RDS header: named, quarantined (real RDS files are tested in test_rds.py)
    with pytest.raises(DatasetQuarantined, match="seurat.rds: not a readable RDS file"):
        process(tmp_path / "raw", tmp_path)
    shutil.rmtree(tmp_path / "raw")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(DatasetQuarantined, match="blob.bin: unknown format"):
        process(tmp_path / "raw", tmp_path)


def test_normalised_values_are_flagged(pbmc, tmp_path):
    logged = pbmc.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data)
    write_format(logged, "h5ad", tmp_path / "raw")
    assert process(tmp_path / "raw", tmp_path)["non_integer"] is True
