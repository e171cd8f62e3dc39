"""Real cells in every supported file format, for tests, benchmarks and the demo.

The cells are scanpy's bundled ``pbmc68k_reduced`` (700 human PBMCs × 765 genes) with their raw
integer counts recovered from ``.raw`` (log1p of counts per 10k, times each cell's total). Larger
sets are made by Poisson-resampling those real cells (``resample``), which keeps real gene-gene
structure; anything built that way says so.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["pbmc_counts", "resample", "write_format", "WRITABLE_FORMATS"]

WRITABLE_FORMATS = ("h5ad", "10x_h5", "10x_mtx_dir", "10x_mtx_tar", "loom", "csv", "tsv_gz")


def pbmc_counts() -> Any:
    """pbmc68k_reduced as raw integer counts (CSR float32) with obs ``bulk_labels`` and ``louvain``."""
    import anndata as ad
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.X.toarray() if sp.issparse(src.raw.X) else np.asarray(src.raw.X)
    counts = np.round(np.expm1(raw) * src.obs["n_counts"].to_numpy()[:, None] / 1e4)
    out = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)))
    out.obs_names = list(src.obs_names)
    out.var_names = list(src.raw.var_names)
    out.obs["bulk_labels"] = src.obs["bulk_labels"].astype(str).to_numpy()
    out.obs["louvain"] = src.obs["louvain"].astype(str).to_numpy()
    return out


def resample(adata: Any, n_cells: int, *, seed: int = 0) -> Any:
    """``n_cells`` cells drawn from real ones with Poisson noise on each count (keeps labels)."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    pick = rng.integers(0, adata.n_obs, n_cells)
    base = adata.X[pick].tocsr()
    base.data = rng.poisson(base.data).astype(np.float32)
    base.eliminate_zeros()
    out = ad.AnnData(X=base)
    out.obs_names = [f"c{i}" for i in range(n_cells)]
    out.var_names = list(adata.var_names)
    for col in adata.obs.columns:
        out.obs[col] = adata.obs[col].to_numpy()[pick]
    return out


def write_format(adata: Any, fmt: str, folder: Path, stem: str = "data") -> Path:
    """Write ``adata``'s counts as ``fmt`` under ``folder``; returns the file (or folder) written."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    X = sp.csr_matrix(adata.X)
    genes = [str(g) for g in adata.var_names]
    cells = [str(c) for c in adata.obs_names]
    if fmt == "h5ad":
        path = folder / f"{stem}.h5ad"
        adata.write_h5ad(path)
        return path
    if fmt == "10x_h5":
        path = folder / f"{stem}_filtered_feature_bc_matrix.h5"
        csc = X.T.tocsc()  # genes × cells, column-compressed over cells, as Cell Ranger writes it
        with h5py.File(path, "w") as f:
            m = f.create_group("matrix")
            m.create_dataset("barcodes", data=np.array(cells, dtype="S"))
            m.create_dataset("data", data=csc.data.astype(np.int32))
            m.create_dataset("indices", data=csc.indices.astype(np.int64))
            m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
            m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
            feat = m.create_group("features")
            feat.create_dataset("id", data=np.array([f"GENE{i:05d}" for i in range(len(genes))], dtype="S"))
            feat.create_dataset("name", data=np.array(genes, dtype="S"))
            feat.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(genes), dtype="S"))
            feat.create_dataset("genome", data=np.array(["GRCh38"] * len(genes), dtype="S"))
        return path
    if fmt in ("10x_mtx_dir", "10x_mtx_tar"):
        import scipy.io

        sub = folder / f"{stem}_mtx"
        sub.mkdir(exist_ok=True)
        with gzip.open(sub / "matrix.mtx.gz", "wb") as fh:
            scipy.io.mmwrite(fh, X.T.tocoo().astype(np.int64), field="integer")
        with gzip.open(sub / "barcodes.tsv.gz", "wt") as fh:
            fh.write("\n".join(cells) + "\n")
        with gzip.open(sub / "features.tsv.gz", "wt") as fh:
            fh.write("\n".join(f"GENE{i:05d}\t{g}\tGene Expression" for i, g in enumerate(genes)) + "\n")
        if fmt == "10x_mtx_dir":
            return sub
        path = folder / f"{stem}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for p in sorted(sub.iterdir()):
                tar.add(p, arcname=f"filtered_feature_bc_matrix/{p.name}")
        for p in sub.iterdir():
            p.unlink()
        sub.rmdir()
        return path
    if fmt == "loom":
        path = folder / f"{stem}.loom"
        with h5py.File(path, "w") as f:
            f.create_dataset("matrix", data=X.T.toarray(), chunks=(min(64, len(genes)), min(64, len(cells))))
            f.create_group("row_attrs").create_dataset("Gene", data=np.array(genes, dtype="S"))
            f.create_group("col_attrs").create_dataset("CellID", data=np.array(cells, dtype="S"))
            f.create_group("layers")
        return path
    if fmt in ("csv", "tsv_gz"):
        import pandas as pd

        dense = X.toarray().astype(np.int64)
        if fmt == "csv":  # genes × cells, the usual GEO export
            path = folder / f"{stem}_counts.csv"
            pd.DataFrame(dense.T, index=genes, columns=cells).to_csv(path)
        else:  # cells × genes
            path = folder / f"{stem}_counts.tsv.gz"
            pd.DataFrame(dense, index=cells, columns=genes).to_csv(path, sep="\t")
        return path
    raise ValueError(f"unknown format {fmt!r}")


def processed_batches(root: Path, *, config: Any, vocab: Any, cells: int, batches: int = 2,
                      per_batch: int = 2) -> Path:
    """``root/batch_0000`` … : ``per_batch`` processed datasets (the processed-h5ad contract) of
    ``cells`` consecutive real cells each, labelled by ``bulk_labels``; returns ``root``."""
    from atlasflow.intake.manifest import Dataset
    from atlasflow.prep.process import process_dataset

    pbmc = pbmc_counts()
    for b in range(batches):
        for d in range(per_batch):
            k = b * per_batch + d
            raw = root / "raw" / f"d{k}"
            write_format(pbmc[k * cells: (k + 1) * cells].copy(), "h5ad", raw)
            process_dataset(raw, Dataset(f"d{k}", "https://h/x.h5ad", "direct", 2, cell_type_key="bulk_labels"),
                            config=config, out_path=root / f"batch_{b:04d}" / f"d{k}.h5ad", vocab=vocab,
                            cache_dir=root / "cache")
    return root


def processed_resampled_batch(n_cells: int, folder: Path, *, config: Any, vocab: Any) -> Path:
    """``n_cells`` Poisson-resampled pbmc68k_reduced cells (seed ``n_cells``), processed into
    ``folder/batch_0000/bench.h5ad``; returns the batch folder (for the benchmarks)."""
    from atlasflow.intake.manifest import Dataset
    from atlasflow.prep.process import process_dataset

    raw = folder / "raw"
    raw.mkdir(parents=True)
    resample(pbmc_counts(), n_cells, seed=n_cells).write_h5ad(raw / "data.h5ad")
    batch = folder / "batch_0000"
    process_dataset(raw, Dataset("bench", "https://h/x.h5ad", "direct", 2), out_path=batch / "bench.h5ad",
                    config=config, vocab=vocab, cache_dir=folder / "c")
    return batch
