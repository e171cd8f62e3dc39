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

from atlasflow.config import QCConfig
from atlasflow.formats import CountSource
from atlasflow.genes import Vocabulary, map_genes

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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def choose_strategy(sources: Sequence[CountSource], config: QCConfig) -> str:
    """``in_memory`` when the largest matrix (×4 for copies) fits in half the free RAM, else ``chunked``."""
    if config.strategy != "auto":
        return config.strategy
    import psutil

    available = psutil.virtual_memory().available
    # ~12 bytes per stored value in CSR (float32 data + int32/64 index); assume 5 % density if unknown
    need = max(s.n_cells * len(s.genes) for s in sources) * 0.05 * 12 * 4
    strategy = "in_memory" if need < available * 0.5 else "chunked"
    log.info("QC strategy %s: ~%.2f GB needed in memory, %.2f GB available", strategy, need / 1e9, available / 1e9)
    return strategy


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
) -> QCResult:
    """Filter, harmonise and write ``sources`` (one dataset) to ``out_path`` (see docs/contracts.md).

    Raises
    ------
    DatasetQuarantined
        No cell passes, or the genes cover less than ``config.min_vocab_coverage`` of the vocabulary.
    """
    t0 = time.monotonic()
    strategy = choose_strategy(sources, config)
    chunk = config.chunk_cells if strategy == "chunked" else max(s.n_cells for s in sources) or 1
    n_vocab = len(vocab)
    maps = []
    for s in sources:
        m = map_genes(s.genes, vocab, gene_ids=s.gene_ids)
        maps.append(np.asarray(m.positions, dtype=np.int64))
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
        "matched_by_id": int(sum(map_genes(s.genes, vocab, gene_ids=s.gene_ids).matched_by_id for s in sources)),
    }
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
                      removed, coverage, strategy, non_integer, int(hvg.sum()), time.monotonic() - t0)
    log.info("%s: %d -> %d cells, %d genes kept, coverage %.1f%% (%s, %.1f s)", dataset_id, cells_before, cells_after,
             selected.size, 100 * coverage["vocab_fraction"], strategy, result.seconds)
    return result


def _write(sources: Sequence[CountSource], maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
           metrics: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], out_col: np.ndarray, selected: np.ndarray,
           hvg: np.ndarray, gene_cells: np.ndarray, out_path: Path, *, chunk: int, dataset_id: str,
           vocab: Vocabulary, obs_meta: dict[str, str | None], batch_key: str | None, cell_type_key: str | None,
           uns: dict[str, Any]) -> None:
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    n_out = selected.size
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    obs_frames = []
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            X = f.create_group("X")
            X.attrs["encoding-type"] = "csr_matrix"
            X.attrs["encoding-version"] = "0.1.0"
            data = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 16,))
            indices = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 16,))
            indptr_parts = [np.zeros(1, dtype=np.int64)]
            nnz = 0
            for s, pos, mask, (counts, detected, pct) in zip(sources, maps, masks, metrics, strict=True):
                src_cols = np.flatnonzero((pos >= 0) & (out_col[np.maximum(pos, 0)] >= 0))
                dst_cols = out_col[pos[src_cols]]
                perm = sp.csr_matrix((np.ones(src_cols.size, np.float32), (np.arange(src_cols.size), dst_cols)),
                                     shape=(src_cols.size, n_out))
                for start, block in s.chunks(chunk):
                    rows = mask[start: start + block.shape[0]]
                    if not rows.any():
                        continue
                    out = (block[rows][:, src_cols] @ perm).tocsr()
                    out.sort_indices()
                    n = out.nnz
                    data.resize((nnz + n,))
                    indices.resize((nnz + n,))
                    data[nnz:] = out.data
                    indices[nnz:] = out.indices
                    indptr_parts.append(out.indptr[1:].astype(np.int64) + nnz)
                    nnz += n
                keep = mask
                cells = np.asarray(s.cells)[keep]
                frame = pd.DataFrame(index=pd.Index([f"{dataset_id}:{c}" for c in cells], dtype=str))
                frame["dataset_id"] = dataset_id
                src_obs = s.obs.iloc[np.flatnonzero(keep)] if s.obs is not None else None
                frame["batch"] = (src_obs[batch_key].astype(str).to_numpy()
                                  if batch_key and src_obs is not None and batch_key in src_obs else dataset_id)
                if cell_type_key and src_obs is not None and cell_type_key in src_obs:
                    frame["cell_type"] = src_obs[cell_type_key].astype(str).to_numpy()
                frame["n_counts"] = counts[keep].astype(np.float32)
                frame["n_genes"] = detected[keep].astype(np.int32)
                frame["pct_mito"] = pct[keep].astype(np.float32)
                for key, value in obs_meta.items():
                    if value is not None:
                        frame[key] = value
                obs_frames.append(frame)
            indptr = np.concatenate(indptr_parts)
            X.create_dataset("indptr", data=indptr)
            obs = pd.concat(obs_frames)
            for col in obs.columns:
                if obs[col].dtype == object:
                    obs[col] = obs[col].astype("category")
            X.attrs["shape"] = (len(obs), n_out)
            var = pd.DataFrame(index=pd.Index([vocab.symbols[i] for i in selected], dtype=str))
            var["gene_id"] = [vocab.gene_ids[i] or "" for i in selected]
            var["highly_variable"] = hvg
            var["n_cells"] = gene_cells[selected].astype(np.int64)
            write_elem(f, "obs", obs)
            write_elem(f, "var", var)
            write_elem(f, "uns", {"atlasflow": uns})
            for empty in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(f, empty, {})
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
