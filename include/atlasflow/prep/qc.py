"""Quality control, gene harmonisation and writing the processed dataset, in two streaming passes.

Pass 1 reads the counts in row chunks and computes per-cell metrics (total counts, detected genes,
mitochondrial share), applies the cell filters, and accumulates per-gene statistics over the
passing cells in vocabulary space (cells detected, sum and sum of squares of log1p-normalised
values). The gene filter, vocabulary coverage and highly variable genes follow from those sums.
Pass 2 reads the chunks again and writes the passing cells × kept genes as counts straight into
the output h5ad. Memory is one chunk plus per-gene vectors, whatever the dataset's size
(``chunked``); ``in_memory`` uses a single chunk, which is faster when it fits.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from atlasflow.core.config import QCConfig
from atlasflow.prep.genes import OrthologTable, Vocabulary, map_genes
from atlasflow.readers.formats import CountSource

__all__ = ["DatasetQuarantined", "QCResult", "choose_strategy", "run_qc"]

log = logging.getLogger(__name__)


class DatasetQuarantined(Exception):
    """The dataset is set aside (not fatal to its batch); ``reason`` says why, naming the file."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class QCResult:
    path: str
    cells_before: int
    cells_after: int
    genes_before: int
    genes_after: int
    removed: dict[str, int]
    coverage: dict[str, Any]
    strategy: str
    non_integer: bool
    hvg: int
    seconds: float
    histograms: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# Fixed bins, so histograms of different datasets (and runs) add up and plot on one axis:
# counts and detected genes on log10(1 + x), 0.1 wide up to 10^6; mitochondrial share 2 % wide.
HIST_EDGES = {"n_counts": [round(0.1 * i, 1) for i in range(61)], "n_genes": [round(0.1 * i, 1) for i in range(61)],
              "pct_mito": [2.0 * i for i in range(51)]}


def qc_histograms(metrics: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  masks: Sequence[np.ndarray]) -> dict[str, Any]:
    """Per-cell QC metrics of every cell (``before``) and of the passing ones (``after``) on :data:`HIST_EDGES`.

    A few hundred integers per dataset: kept in the dataset's tombstone, so the run report can
    plot QC distributions after the processed file is cleaned up. Values beyond the last edge
    fall into the last bin.
    """
    columns = {"n_counts": 0, "n_genes": 1, "pct_mito": 2}
    out: dict[str, Any] = {}
    for name, col in columns.items():
        edges = np.asarray(HIST_EDGES[name])
        values = np.concatenate([m[col] for m in metrics]) if metrics else np.zeros(0)
        keep = np.concatenate(list(masks)) if masks else np.zeros(0, bool)
        x = np.log10(1 + values) if name != "pct_mito" else values
        x = np.clip(x, edges[0], edges[-1])
        out[name] = {"scale": "log10(1+x)" if name != "pct_mito" else "percent", "edges": HIST_EDGES[name],
                     "before": np.histogram(x, edges)[0].tolist(), "after": np.histogram(x[keep], edges)[0].tolist()}
    return out


def choose_strategy(sources: Sequence[CountSource], config: QCConfig) -> str:
    """``in_memory`` when the largest matrix (×4 for copies) fits in ``memory_fraction`` of the free RAM, else ``chunked``."""
    if config.strategy != "auto":
        return config.strategy
    import psutil

    available = psutil.virtual_memory().available
    # ~12 bytes per stored value in CSR (float32 data + int32/64 index); assume 5 % density if unknown
    need = max(s.n_cells * len(s.genes) for s in sources) * 0.05 * 12 * 4
    strategy = "in_memory" if need < available * config.memory_fraction else "chunked"
    log.info("QC strategy %s: ~%.2f GB needed in memory, %.2f GB available", strategy, need / 1e9, available / 1e9)
    return strategy


def _pin_malloc_threshold() -> None:
    """Keep glibc from raising its mmap threshold as chunks are freed.

    By default glibc moves the threshold up after each large free, so later chunk-sized arrays come
    from the heap, which fragments and never shrinks: peak RSS then grows with the number of
    chunks, not their size. Pinning it (M_MMAP_THRESHOLD = 1 MiB) returns every chunk to the OS.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        pass


def _mito_mask(genes: Sequence[str]) -> np.ndarray:
    return np.array([g.upper().startswith("MT-") for g in genes], dtype=bool)


def run_qc(
    sources: Sequence[CountSource],
    out_path: Path,
    *,
    dataset_id: str,
    vocab: Vocabulary,
    config: QCConfig,
    obs_meta: dict[str, str | None] | None = None,
    batch_key: str | None = None,
    cell_type_key: str | None = None,
    orthologs: OrthologTable | None = None,
) -> QCResult:
    """Filter, harmonise and write ``sources`` (one dataset) to ``out_path`` (see docs/contracts.md).

    ``orthologs``: the dataset is of another species; its genes reach the vocabulary only through
    this table.

    Raises
    ------
    DatasetQuarantined
        No cell passes, or the genes cover less than ``config.min_vocab_coverage`` of the vocabulary.
    """
    t0 = time.monotonic()
    strategy = choose_strategy(sources, config)
    chunk = config.chunk_cells if strategy == "chunked" else max(s.n_cells for s in sources) or 1
    if strategy == "chunked":
        _pin_malloc_threshold()
    n_vocab = len(vocab)
    mappings = [map_genes(s.genes, vocab, gene_ids=s.gene_ids, orthologs=orthologs) for s in sources]
    maps = [np.asarray(m.positions, dtype=np.int64) for m in mappings]
    removed = {"min_genes": 0, "max_genes": 0, "min_counts": 0, "max_counts": 0, "max_pct_mito": 0}
    gene_cells = np.zeros(n_vocab, dtype=np.int64)
    gene_sum = np.zeros(n_vocab, dtype=np.float64)
    gene_sumsq = np.zeros(n_vocab, dtype=np.float64)
    total_counts = mapped_counts = 0.0
    masks: list[np.ndarray] = []
    metrics: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    non_integer = False
    cells_before = sum(s.n_cells for s in sources)

    # ---- pass 1: per-cell metrics and filters, per-gene sums over passing cells -------------------
    for s, pos in zip(sources, maps, strict=True):
        mito = _mito_mask(s.genes)
        keep_cols = np.flatnonzero(pos >= 0)
        mask_parts, count_parts, gene_parts, mito_parts = [], [], [], []
        for _, block in s.chunks(chunk):
            if block.nnz and not non_integer and not np.all(np.mod(block.data, 1) == 0):
                non_integer = True
            counts = np.asarray(block.sum(axis=1)).ravel()
            detected = np.diff(block.indptr)
            pct = 100 * np.asarray(block[:, mito].sum(axis=1)).ravel() / np.maximum(counts, 1) if mito.any() else \
                np.zeros(block.shape[0])
            rules = {
                "min_genes": detected < config.min_genes,
                "max_genes": detected > config.max_genes if config.max_genes else np.zeros_like(detected, bool),
                "min_counts": counts < config.min_counts,
                "max_counts": counts > config.max_counts if config.max_counts else np.zeros_like(detected, bool),
                "max_pct_mito": pct > config.max_pct_mito,
            }
            ok = np.ones(block.shape[0], dtype=bool)
            for rule, failed in rules.items():
                removed[rule] += int(failed.sum())
                ok &= ~failed
            mask_parts.append(ok)
            count_parts.append(counts)
            gene_parts.append(detected)
            mito_parts.append(pct)
            total_counts += float(counts[ok].sum())
            if ok.any() and keep_cols.size:
                sub = block[ok][:, keep_cols].tocsr()
                mapped_counts += float(sub.sum())
                norm = sp.diags(config.target_sum / np.maximum(counts[ok], 1)) @ sub
                norm.data = np.log1p(norm.data)
                target = pos[keep_cols]
                gene_cells[target] += np.diff(sub.tocsc().indptr)
                gene_sum[target] += np.asarray(norm.sum(axis=0)).ravel()
                norm.data **= 2
                gene_sumsq[target] += np.asarray(norm.sum(axis=0)).ravel()
        masks.append(np.concatenate(mask_parts) if mask_parts else np.zeros(0, bool))
        metrics.append((np.concatenate(count_parts), np.concatenate(gene_parts), np.concatenate(mito_parts))
                       if count_parts else (np.zeros(0), np.zeros(0), np.zeros(0)))

    cells_after = int(sum(m.sum() for m in masks))
    source_names = ", ".join(s.path.name for s in sources)
    if cells_after == 0:
        raise DatasetQuarantined(f"{source_names}: no cell passed QC ({cells_before} cells; removed per rule: {removed})")
    present = gene_cells > 0
    selected = np.flatnonzero(gene_cells >= max(config.min_cells, 1))
    coverage = {
        "vocab_version": vocab.version,
        "vocab_fraction": round(float(present.sum()) / n_vocab, 4),
        "counts_fraction": round(mapped_counts / total_counts, 4) if total_counts else 0.0,
        "genes_mapped": int(present.sum()),
        "matched_by_id": int(sum(m.matched_by_id for m in mappings)),
        "matched_by_synonym": int(sum(m.matched_by_synonym for m in mappings)),
    }
    if orthologs is not None:
        coverage["orthologs"] = f"{orthologs.species} via {orthologs.path}"
    if coverage["vocab_fraction"] < config.min_vocab_coverage:
        raise DatasetQuarantined(
            f"{source_names}: its genes cover {coverage['vocab_fraction']:.1%} of the vocabulary "
            f"(v{vocab.version}, {n_vocab} genes), below qc.min_vocab_coverage={config.min_vocab_coverage:.0%}; "
            f"{coverage['counts_fraction']:.1%} of counts map. Wrong species, or gene ids the vocabulary lacks?"
        )
    if selected.size == 0:
        raise DatasetQuarantined(f"{source_names}: no gene is detected in qc.min_cells={config.min_cells} cells")

    # ---- highly variable genes (dispersion of log-normalised values, seurat-style bins) ----------
    mean = gene_sum[selected] / cells_after
    var = np.maximum(gene_sumsq[selected] / cells_after - mean**2, 0)
    dispersion = np.log(np.where(mean > 0, var / np.maximum(mean, 1e-12), 1e-12) + 1e-12)
    bins = np.digitize(mean, np.quantile(mean, np.linspace(0, 1, 21)[1:-1])) if mean.size > 20 else np.zeros(mean.size)
    z = np.zeros_like(dispersion)
    for b in np.unique(bins):
        idx = bins == b
        sd = dispersion[idx].std()
        z[idx] = (dispersion[idx] - dispersion[idx].mean()) / sd if sd > 0 else 0.0
    hvg = np.zeros(selected.size, dtype=bool)
    hvg[np.argsort(-z)[: min(config.n_top_genes, selected.size)]] = True

    # ---- pass 2: write passing cells × kept genes as counts ---------------------------------------
    out_col = np.full(n_vocab, -1, dtype=np.int64)
    out_col[selected] = np.arange(selected.size)
    _write(sources, maps, masks, metrics, out_col, selected, hvg, gene_cells, out_path, chunk=chunk,
           dataset_id=dataset_id, vocab=vocab, obs_meta=obs_meta or {}, batch_key=batch_key,
           cell_type_key=cell_type_key,
           uns={"dataset_id": dataset_id, "vocab_version": vocab.version,
                "qc": {"cells_before": cells_before, "cells_after": cells_after, "removed": removed,
                       "strategy": strategy, "non_integer": non_integer, **coverage}})
    result = QCResult(str(out_path), cells_before, cells_after, sum(len(s.genes) for s in sources), int(selected.size),
                      removed, coverage, strategy, non_integer, int(hvg.sum()), time.monotonic() - t0,
                      qc_histograms(metrics, masks))
    log.info("%s: %d -> %d cells, %d genes kept, coverage %.1f%% (%s, %.1f s)", dataset_id, cells_before, cells_after,
             selected.size, 100 * coverage["vocab_fraction"], strategy, result.seconds)
    return result


class _Appender:
    """Resizable 1-d HDF5 datasets that grow chunk by chunk, tagged as anndata expects."""

    def __init__(self, group: Any, name: str, dtype: Any, encoding: str = "array", *, compress: bool = False) -> None:
        import h5py

        kind = h5py.string_dtype() if dtype is str else dtype
        # lzf: a few percent of CPU for a large cut in disk, which is the budget we live under
        self.ds = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=kind,
                                       chunks=(1 << 16,) if compress else (1 << 12,),
                                       compression="lzf" if compress else None)
        self.ds.attrs["encoding-type"] = encoding
        self.ds.attrs["encoding-version"] = "0.2.0"

    def append(self, values: Any) -> None:
        n = self.ds.shape[0]
        self.ds.resize((n + len(values),))
        self.ds[n:] = values


def _categorical(group: Any, name: str, categories: list[str]) -> _Appender:
    import h5py

    g = group.create_group(name)
    g.attrs["encoding-type"] = "categorical"
    g.attrs["encoding-version"] = "0.2.0"
    g.attrs["ordered"] = False
    cats = g.create_dataset("categories", data=np.array(categories, dtype=object), dtype=h5py.string_dtype())
    cats.attrs["encoding-type"] = "string-array"
    cats.attrs["encoding-version"] = "0.2.0"
    return _Appender(g, "codes", np.int16 if len(categories) > 127 else np.int8)


def _write(sources: Sequence[CountSource], maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
           metrics: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], out_col: np.ndarray, selected: np.ndarray,
           hvg: np.ndarray, gene_cells: np.ndarray, out_path: Path, *, chunk: int, dataset_id: str,
           vocab: Vocabulary, obs_meta: dict[str, str | None], batch_key: str | None, cell_type_key: str | None,
           uns: dict[str, Any]) -> None:
    """Write the processed h5ad: X and obs are appended chunk by chunk, so memory stays flat."""
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    def column(src: CountSource, key: str | None) -> Any:
        if not key or src.obs is None:
            return None
        values = src.obs(key)
        return None if values is None else pd.Categorical(np.asarray(values).astype(str))

    batch_cols = [column(s, batch_key) for s in sources]
    type_cols = [column(s, cell_type_key) for s in sources]
    # a source without the batch_key column: its GEO sample (GSM id), else the dataset, is its batch
    default_batch = [s.sample or dataset_id for s in sources]
    batch_cats = sorted({str(c) for col in batch_cols if col is not None for c in col.categories} |
                        {default_batch[k] for k, col in enumerate(batch_cols) if col is None})
    sample_cats = sorted({s.sample or dataset_id for s in sources}) if any(s.sample for s in sources) else []
    type_cats = sorted({str(c) for col in type_cols if col is not None for c in col.categories})
    constants = {"dataset_id": dataset_id, **{k: v for k, v in obs_meta.items() if v is not None}}

    n_out = selected.size
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            X = f.create_group("X")
            X.attrs["encoding-type"] = "csr_matrix"
            X.attrs["encoding-version"] = "0.1.0"
            data = _Appender(X, "data", np.float32, compress=True)
            indices = _Appender(X, "indices", np.int32, compress=True)
            indptr = _Appender(X, "indptr", np.int64)
            indptr.append(np.zeros(1, dtype=np.int64))
            obs = f.create_group("obs")
            order = ["dataset_id", "batch"] + (["sample"] if sample_cats else []) + \
                (["cell_type"] if type_cats else []) + \
                ["n_counts", "n_genes", "pct_mito"] + [k for k in constants if k != "dataset_id"]
            obs.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index",
                              "column-order": np.array(order, dtype=object)})
            index = _Appender(obs, "_index", str, "string-array")
            const_cols = {k: _categorical(obs, k, [v]) for k, v in constants.items()}
            batch_col = _categorical(obs, "batch", batch_cats)
            sample_col = _categorical(obs, "sample", sample_cats) if sample_cats else None
            type_col = _categorical(obs, "cell_type", type_cats) if type_cats else None
            numeric = {"n_counts": _Appender(obs, "n_counts", np.float32), "n_genes": _Appender(obs, "n_genes", np.int32),
                       "pct_mito": _Appender(obs, "pct_mito", np.float32)}
            nnz = 0
            for k, (s, pos, mask, (counts, detected, pct)) in enumerate(zip(sources, maps, masks, metrics, strict=True)):
                src_cols = np.flatnonzero((pos >= 0) & (out_col[np.maximum(pos, 0)] >= 0))
                dst_cols = out_col[pos[src_cols]]
                perm = sp.csr_matrix((np.ones(src_cols.size, np.float32), (np.arange(src_cols.size), dst_cols)),
                                     shape=(src_cols.size, n_out))
                for start, block in s.chunks(chunk):
                    stop = start + block.shape[0]
                    rows = mask[start:stop]
                    if not rows.any():
                        continue
                    out = (block[rows][:, src_cols] @ perm).tocsr()
                    out.sort_indices()
                    data.append(out.data)
                    indices.append(out.indices)
                    indptr.append(out.indptr[1:].astype(np.int64) + nnz)
                    nnz += out.nnz
                    names = np.asarray(s.cells[start:stop], dtype=object)[rows]
                    index.append(np.array([f"{dataset_id}:{c}" for c in names], dtype=object))
                    n = int(rows.sum())
                    for col in const_cols.values():
                        col.append(np.zeros(n, dtype=col.ds.dtype))
                    if batch_cols[k] is not None:
                        codes = np.searchsorted(batch_cats, np.asarray(batch_cols[k][start:stop])[rows].astype(str))
                    else:
                        codes = np.full(n, batch_cats.index(default_batch[k]))
                    batch_col.append(codes.astype(batch_col.ds.dtype))
                    if sample_col is not None:
                        sample_col.append(np.full(n, sample_cats.index(s.sample or dataset_id), sample_col.ds.dtype))
                    if type_col is not None:
                        if type_cols[k] is not None:
                            tcodes = np.searchsorted(type_cats, np.asarray(type_cols[k][start:stop])[rows].astype(str))
                        else:
                            tcodes = np.full(n, -1)
                        type_col.append(tcodes.astype(type_col.ds.dtype))
                    numeric["n_counts"].append(counts[start:stop][rows].astype(np.float32))
                    numeric["n_genes"].append(detected[start:stop][rows].astype(np.int32))
                    numeric["pct_mito"].append(pct[start:stop][rows].astype(np.float32))
            X.attrs["shape"] = (index.ds.shape[0], n_out)
            var = pd.DataFrame(index=pd.Index([vocab.symbols[i] for i in selected], dtype=str))
            var["gene_id"] = [vocab.gene_ids[i] or "" for i in selected]
            var["highly_variable"] = hvg
            var["n_cells"] = gene_cells[selected].astype(np.int64)
            write_elem(f, "var", var)
            write_elem(f, "uns", {"atlasflow": uns})
            for empty in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(f, empty, {})
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
