"""Read a downloaded dataset, whatever common format it came in, as raw counts.

Formats: h5ad, 10x HDF5, 10x Matrix Market (a folder, GEO-style prefixed files, or a ``.tar.gz``),
loom, csv/tsv(.gz) in either orientation, and R's RDS (dgCMatrix, SingleCellExperiment, Seurat v3/v4;
see :mod:`atlasflow.readers.rds`). The result is a :class:`CountSource`: a matrix of
cells × genes that can be read in row chunks (never all at once for h5ad and loom), plus gene
names, cell names and notes on how it was read. ``read_counts`` turns it into an AnnData with
``layers["counts"]`` for small inputs and tests.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from atlasflow.core.config import GB, ReadersConfig
from atlasflow.core.fsutil import DecompressionLimit, open_bounded, partial_path

__all__ = ["CountSource", "DecompressionCap", "FormatError", "detect_format", "open_counts", "read_counts", "safe_extract"]

log = logging.getLogger(__name__)
MAX_MEMBER_BYTES = 50 * 10**9
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SKIP = re.compile(r"(\.part|\.done\.json|fetch\.json)$")


class FormatError(ValueError):
    """The file cannot be read as counts; the message names the file and the reason."""


@dataclass
class CountSource:
    """Counts as cells × genes, readable in row chunks."""

    path: Path
    format: str
    n_cells: int
    genes: list[str]
    cells: Any  # a list of names, or a lazy sequence sliced chunk by chunk
    gene_ids: list[str] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    _matrix: Any = None  # an in-memory CSR, an h5py-backed anndata X, or a loom dataset
    obs: Any = None  # callable: column name -> per-cell values, when the format carries annotations
    _close: Any = None
    obs_table: dict[str, Any] | None = None  # per-cell columns read_counts copies to obs (RDS colData)
    var_table: dict[str, Any] | None = None  # per-gene columns read_counts copies to var (RDS rowData)
    sample: str | None = None  # the GEO sample (GSM id) its cells come from: obs['sample'] and the default batch

    def chunks(self, size: int = 10_000) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield ``(first_row, csr_block)`` over all cells, ``size`` cells at a time."""
        for start in range(0, self.n_cells, size):
            stop = min(start + size, self.n_cells)
            if self.format == "loom":  # genes × cells on disk
                block = sp.csr_matrix(np.asarray(self._matrix[:, start:stop]).T, dtype=np.float32)
            else:
                part = self._matrix[start:stop]
                block = sp.csr_matrix(part, dtype=np.float32) if not sp.issparse(part) else part.tocsr().astype(np.float32)
            yield start, block

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def _human(n: int) -> str:
    return f"{n / 10**9:.2f} GB" if n >= 10**9 else f"{n / 10**6:.1f} MB" if n >= 10**6 else f"{n / 10**3:.0f} KB"


@dataclass(frozen=True)
class DecompressionCap:
    """How far one gzipped table (csv/tsv/mtx/rds, barcodes/features) may inflate while it is parsed.

    Its text goes to memory (a parser), not to disk, so the bound is about memory and plausibility,
    not the disk reservation: at most ``max_bytes``, and at most ``max_ratio`` times the file's
    compressed size, whichever is tighter (``readers.max_decompressed_gb`` / ``max_expansion_ratio``).
    Real count tables inflate 3.5-130x, gzip bombs ~1000x. Any file may inflate to ``floor_bytes``
    (capped by ``max_bytes``): that much is harmless, and a tiny file's ratio says nothing.
    Archives extracted to disk are capped by the reservation instead (``safe_extract``).
    """

    max_bytes: int | None = int(ReadersConfig.max_decompressed_gb * GB)
    max_ratio: float | None = ReadersConfig.max_expansion_ratio
    floor_bytes: int = 2**20

    @classmethod
    def from_config(cls, config: ReadersConfig) -> DecompressionCap:
        return cls(max_bytes=int(config.max_decompressed_gb * GB), max_ratio=config.max_expansion_ratio)

    def limit(self, path: Path) -> tuple[int | None, str]:
        """The most ``path`` may decompress to, and the rule that sets it; (None, "") for a file that is
        not gzip data (reading it inflates nothing)."""
        with path.open("rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return None, ""
        size = path.stat().st_size
        if self.max_ratio is not None:
            by_ratio = max(int(self.max_ratio * size), self.floor_bytes)
            if self.max_bytes is None or by_ratio < self.max_bytes:
                return by_ratio, (f"{self.max_ratio:g}x its size (readers.max_expansion_ratio)"
                                  if by_ratio > self.floor_bytes else f"the {_human(by_ratio)} any file may inflate to")
        if self.max_bytes is not None:
            return self.max_bytes, f"the {_human(self.max_bytes)} ceiling (readers.max_decompressed_gb)"
        return None, ""


def _check_member(archive: Path, m: tarfile.TarInfo, max_member_bytes: int) -> None:
    name = m.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in Path(name).parts:
        raise FormatError(f"{archive.name}: refusing member {name!r} (absolute path or '..')")
    if not (m.isfile() or m.isdir()):
        raise FormatError(f"{archive.name}: refusing member {name!r} (links and devices are not extracted)")
    if m.size > max_member_bytes:
        raise FormatError(f"{archive.name}: member {name!r} is {m.size} bytes, over the {max_member_bytes} limit")


def safe_extract(archive: Path, dest: Path, *, max_member_bytes: int = MAX_MEMBER_BYTES,
                 max_total_bytes: int | None = None) -> list[Path]:
    """Extract a tar archive into ``dest``, refusing absolute paths, ``..``, links, devices and oversized
    members, and stopping (while streaming, before the member that would pass it is written) once the
    contents exceed ``max_total_bytes``.

    The members are written into a temporary sibling (:func:`~atlasflow.core.fsutil.partial_path`)
    that is renamed to ``dest`` only when complete: a kill mid-extraction leaves no ``dest`` that a
    re-run would take for a whole one, and a failure removes what it wrote.
    """
    tmp = partial_path(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    files: list[str] = []
    total = written = 0
    try:
        tmp.mkdir(parents=True)
        # "r|*": one pass over the stream, member by member, never a member list read up front
        with tarfile.open(archive, "r|*") as tar:
            for m in tar:
                _check_member(archive, m, max_member_bytes)
                total += m.size
                if max_total_bytes is not None and total > max_total_bytes:
                    raise FormatError(
                        f"{archive.name}: extracting it needs over {total} bytes ({_human(total)}) from a "
                        f"{archive.stat().st_size}-byte archive, more than the {max_total_bytes} bytes "
                        f"({_human(max_total_bytes)}) the dataset may use; stopped after {written} bytes")
                target = tmp.joinpath(*Path(m.name).parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(m)
                assert source is not None  # a regular file
                with target.open("wb") as out:
                    while block := source.read(1 << 20):
                        out.write(block)
                        written += len(block)
                files.append(str(Path(*Path(m.name).parts)))
    except FormatError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            # our disk, not the archive (full, quota, read-only, file-size limit): the task fails and is
            # retried; a FormatError would quarantine the dataset and delete a good download
            raise
        raise FormatError(f"{archive.name}: not a readable tar archive ({type(exc).__name__}: {exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, dest)
    except OSError:  # another task finished the same extraction first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
    return [dest / f for f in dict.fromkeys(files)]


def detect_format(path: Path) -> str:
    """The format of a file or folder from its name, then its first bytes."""
    name = path.name.lower()
    if path.is_dir():
        if any(p.name.lower().endswith(("matrix.mtx", "matrix.mtx.gz")) for p in path.iterdir()):
            return "10x_mtx"
        raise FormatError(f"{path}: a folder without a matrix.mtx file")
    if name.endswith(".rdata") or name.endswith(".rda"):
        raise FormatError(f"{path.name}: RData workspaces are not read; save the object with saveRDS() as .rds, or "
                          "export counts as .h5ad, 10x or CSV")
    if name.endswith(".rds"):
        return "rds"
    with path.open("rb") as fh:
        head = fh.read(8)
    if not head:
        raise FormatError(f"{path.name}: the file is empty")
    if head.startswith(_HDF5_MAGIC):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if "matrix" in f and isinstance(f["matrix"], h5py.Group):
                    return "10x_h5"
                if "matrix" in f and "row_attrs" in f:
                    return "loom"
                if "X" in f and "obs" in f:
                    return "h5ad"
        except OSError as exc:
            raise FormatError(f"{path.name}: damaged HDF5 file ({exc})") from exc
        raise FormatError(f"{path.name}: an HDF5 file that is neither h5ad, 10x HDF5 nor loom")
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "10x_mtx"
    if name.endswith((".mtx", ".mtx.gz")):
        return "10x_mtx"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return "tsv"
    if head.startswith(b"\x1f\x8b"):
        with gzip.open(path, "rt", errors="replace") as fh:
            first = fh.readline(1 << 16)  # bounded: a bomb may hold one endless line
        return "tsv" if "\t" in first else "csv"
    raise FormatError(f"{path.name}: unknown format (not HDF5, Matrix Market, tar or delimited text)")


def _looks_integer(matrix: Any, sample: int = 2000) -> bool:
    block = matrix[: min(sample, matrix.shape[0])]
    values = block.data if sp.issparse(block) else np.asarray(block).ravel()
    return bool(values.size == 0 or np.all(np.mod(values, 1) == 0))


class _LazyNames:
    """Cell names read from an HDF5 string dataset slice by slice (never all at once)."""

    def __init__(self, dataset: Any) -> None:
        self._ds = dataset

    def __len__(self) -> int:
        return self._ds.shape[0]

    def __getitem__(self, key: slice) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in self._ds[key]]


def _open_h5ad(path: Path) -> CountSource:
    """Open an h5ad lazily with h5py: X (or layers['counts'] / raw.X) in row chunks, cell names
    in slices, only the var table and asked-for obs columns in memory."""
    import h5py
    from anndata.io import read_elem, sparse_dataset

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(f"{path.name}: cannot read h5ad ({exc})") from exc
    try:
        def matrix_at(key: str) -> Any:
            node = f[key]
            if isinstance(node, h5py.Group):
                kind = node.attrs.get("encoding-type", "")
                if kind == "csc_matrix":  # column-compressed on disk: row chunks would re-read it all
                    return read_elem(node).tocsr()
                return sparse_dataset(node)
            return node

        where = "X"
        matrix = matrix_at("X")
        if "layers" in f and "counts" in f["layers"]:
            where, matrix = "layers['counts']", matrix_at("layers/counts")
        elif "raw" in f and "X" in f["raw"] and not _looks_integer(matrix) and _looks_integer(matrix_at("raw/X")):
            where, matrix = "raw.X", matrix_at("raw/X")
        var = read_elem(f["raw/var"] if where == "raw.X" else f["var"])
        genes = list(map(str, var.index))
        gene_ids = next((list(map(str, var[c])) for c in ("gene_ids", "gene_id", "ensembl_id") if c in var.columns), None)
        if gene_ids is None and "feature_name" in var.columns:
            # the CELLxGENE schema: Ensembl ids index var, the symbols are in feature_name
            gene_ids, genes = genes, list(map(str, var["feature_name"]))
        obs = f["obs"]
        cells = _LazyNames(obs[obs.attrs["_index"]])
        n_cells = matrix.shape[0]
        if len(genes) != matrix.shape[1] or len(cells) != n_cells:
            raise FormatError(f"{path.name}: matrix is {matrix.shape} but there are {len(cells)} cells and "
                              f"{len(genes)} genes")
    except FormatError:
        f.close()
        raise
    except Exception as exc:  # h5py/anndata raise many types for truncated or damaged files
        f.close()
        raise FormatError(f"{path.name}: cannot read h5ad ({type(exc).__name__}: {exc})") from exc

    def obs_column(key: str) -> Any:
        return read_elem(obs[key]) if key in obs else None

    return CountSource(path, "h5ad", n_cells, genes, cells, gene_ids, {"matrix": where}, matrix,
                       obs=obs_column, _close=f.close)


def _open_10x_h5(path: Path) -> CountSource:
    import scanpy as sc

    try:
        adata = sc.read_10x_h5(path)
    except Exception as exc:
        raise FormatError(f"{path.name}: cannot read 10x HDF5 ({type(exc).__name__}: {exc})") from exc
    ids = list(map(str, adata.var["gene_ids"])) if "gene_ids" in adata.var else None
    return CountSource(path, "10x_h5", adata.n_obs, list(map(str, adata.var_names)), list(map(str, adata.obs_names)),
                       ids, {}, adata.X.tocsr())


def _find(folder: Path, *suffixes: str) -> Path | None:
    hits = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    return hits[0] if hits else None


def _too_big(path: Path, exc: DecompressionLimit, rule: str) -> FormatError:
    return FormatError(f"{path.name}: decompresses to over {exc.limit} bytes ({_human(exc.limit)}) from a "
                       f"{path.stat().st_size}-byte file, more than {rule}; refused")


def _read_lines(path: Path, cap: DecompressionCap) -> list[list[str]]:
    limit, rule = cap.limit(path)
    try:
        with open_bounded(path, max_bytes=limit, text=True) as fh:
            return [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    except DecompressionLimit as exc:
        raise _too_big(path, exc, rule) from exc


def _open_mtx(path: Path, cache: Path, max_bytes: int | None, cap: DecompressionCap) -> CountSource:
    import scipy.io

    folder = path
    if path.is_file() and path.name.lower().endswith((".tar.gz", ".tgz", ".tar")):
        folder = cache / f"{path.name}.extracted"
        if not folder.exists():  # only ever a complete extraction: safe_extract renames it into place
            safe_extract(path, folder, max_total_bytes=max_bytes)
    elif path.is_file():
        folder = path.parent
    mtx = _find(folder, "matrix.mtx", "matrix.mtx.gz")
    barcodes = _find(folder, "barcodes.tsv", "barcodes.tsv.gz")
    features = _find(folder, "features.tsv", "features.tsv.gz", "genes.tsv", "genes.tsv.gz")
    missing = [n for n, p in (("matrix.mtx", mtx), ("barcodes.tsv", barcodes), ("features/genes.tsv", features)) if p is None]
    if missing:
        raise FormatError(f"{path.name}: 10x Matrix Market input lacks {', '.join(missing)}")
    limit, rule = cap.limit(mtx)
    try:
        with open_bounded(mtx, max_bytes=limit) as fh:  # streamed: a .gz is never inflated whole
            matrix = scipy.io.mmread(fh)
    except DecompressionLimit as exc:
        raise _too_big(mtx, exc, rule) from exc
    except Exception as exc:
        raise FormatError(f"{mtx.name}: cannot read Matrix Market ({exc})") from exc
    feats = _read_lines(features, cap)
    cells = [r[0] for r in _read_lines(barcodes, cap)]
    matrix = sp.csr_matrix(matrix.T, dtype=np.float32)  # 10x stores genes × cells
    if matrix.shape != (len(cells), len(feats)):
        raise FormatError(f"{path.name}: matrix is {matrix.shape[1]} x {matrix.shape[0]} (genes x cells) but there are "
                          f"{len(feats)} features and {len(cells)} barcodes")
    if feats and len(feats[0]) >= 3:  # 10x v3: keep gene expression rows only
        keep = [i for i, r in enumerate(feats) if r[2] == "Gene Expression"]
        if len(keep) < len(feats):
            matrix, feats = matrix[:, keep], [feats[i] for i in keep]
    symbols = [r[1] if len(r) > 1 else r[0] for r in feats]
    ids = [r[0] for r in feats] if feats and len(feats[0]) > 1 else None
    return CountSource(path, "10x_mtx", len(cells), symbols, cells, ids, {"files": [mtx.name, barcodes.name, features.name]},
                       matrix)


def _open_loom(path: Path) -> CountSource:
    import h5py

    f = h5py.File(path, "r")
    try:
        rows, cols = f["row_attrs"], f["col_attrs"]
        gene_key = next((k for k in ("Gene", "gene", "var_names", "Symbol") if k in rows), None)
        cell_key = next((k for k in ("CellID", "cell", "obs_names") if k in cols), None)
        if gene_key is None:
            raise FormatError(f"{path.name}: loom file without a Gene row attribute")
        genes = [g.decode() if isinstance(g, bytes) else str(g) for g in rows[gene_key][:]]
        n_cells = f["matrix"].shape[1]
        cells = ([c.decode() if isinstance(c, bytes) else str(c) for c in cols[cell_key][:]]
                 if cell_key else [f"cell{i}" for i in range(n_cells)])
        ids = None
        if "Accession" in rows:
            ids = [g.decode() if isinstance(g, bytes) else str(g) for g in rows["Accession"][:]]
    except Exception:
        f.close()
        raise
    return CountSource(path, "loom", n_cells, genes, cells, ids, {}, f["matrix"], _close=f.close)


def _open_table(path: Path, fmt: str, vocabulary: set[str] | None, cap: DecompressionCap) -> CountSource:
    import pandas as pd

    sep = "\t" if fmt == "tsv" else ","
    limit, rule = cap.limit(path)
    try:
        with open_bounded(path, max_bytes=limit) as fh:  # pandas streams it; a .gz is capped too
            frame = pd.read_csv(fh, sep=sep, index_col=0)
    except DecompressionLimit as exc:
        raise _too_big(path, exc, rule) from exc
    except Exception as exc:
        raise FormatError(f"{path.name}: cannot parse as {fmt.upper()} ({exc})") from exc
    if frame.empty:
        raise FormatError(f"{path.name}: no data rows")
    bad = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        col = bad[0]
        sample = frame[col][pd.to_numeric(frame[col], errors="coerce").isna()].iloc[0]
        raise FormatError(f"{path.name}: non-numeric values, e.g. {sample!r} in column {col!r} "
                          f"({len(bad)} column(s) affected)")
    rows, cols = [str(x) for x in frame.index], [str(x) for x in frame.columns]
    # Which axis holds genes? Prefer the one whose labels hit the vocabulary; else genes are the
    # longer axis (tens of thousands of genes vs fewer cells is the usual export).
    if vocabulary:
        row_hits = sum(r.upper() in vocabulary for r in rows) / len(rows)
        col_hits = sum(c.upper() in vocabulary for c in cols) / len(cols)
        genes_on_rows = row_hits >= col_hits
        reason = f"vocabulary matches: rows {row_hits:.0%}, columns {col_hits:.0%}"
    else:
        genes_on_rows = len(rows) >= len(cols)
        reason = f"{len(rows)} rows vs {len(cols)} columns; the longer axis is taken as genes"
    orientation = "genes x cells" if genes_on_rows else "cells x genes"
    log.info("%s: read as %s (%s)", path.name, orientation, reason)
    values = frame.to_numpy(dtype=np.float32)
    matrix = sp.csr_matrix(values.T if genes_on_rows else values)
    genes, cells = (rows, cols) if genes_on_rows else (cols, rows)
    return CountSource(path, fmt, len(cells), genes, cells, None, {"orientation": orientation, "why": reason}, matrix)


def _open_rds(path: Path, cap: DecompressionCap) -> CountSource:
    from atlasflow.readers.rds import RdsError, read_rds_counts

    limit, rule = cap.limit(path)
    try:
        counts = read_rds_counts(path, max_bytes=limit, limit_rule=rule)
    except RdsError as exc:  # the processing step quarantines a FormatError
        raise FormatError(str(exc)) from exc
    return CountSource(path, "rds", counts.matrix.shape[0], counts.genes, counts.cells, counts.gene_ids,
                       {"r_class": counts.r_class, "assay": counts.assay}, counts.matrix,
                       obs=counts.obs.get if counts.obs else None, obs_table=counts.obs, var_table=counts.var)


def open_counts(path: Path, *, fmt: str | None = None, cache: Path | None = None,
                vocabulary: set[str] | None = None, max_bytes: int | None = None,
                cap: DecompressionCap | None = None) -> CountSource:
    """Open ``path`` as counts; ``fmt`` overrides detection; ``cache`` receives extracted archives.

    ``max_bytes`` (the dataset's disk reservation) bounds the bytes a tar archive extracts to disk;
    ``cap`` (default: the ``readers.*`` defaults) bounds what a gzipped Matrix Market / CSV / RDS file
    decompresses to in memory. A bomb is refused with its figures as a :class:`FormatError` instead
    of filling a disk or memory.
    """
    cap = cap or DecompressionCap()
    fmt = fmt or detect_format(path)
    if fmt == "h5ad":
        return _open_h5ad(path)
    if fmt == "10x_h5":
        return _open_10x_h5(path)
    if fmt == "10x_mtx":
        return _open_mtx(path, cache or path.parent, max_bytes, cap)
    if fmt == "loom":
        return _open_loom(path)
    if fmt in ("csv", "tsv"):
        return _open_table(path, fmt, vocabulary, cap)
    if fmt == "rds":
        return _open_rds(path, cap)
    raise FormatError(f"{path.name}: unsupported format {fmt!r}")


def primary_files(raw_dir: Path) -> list[Path]:
    """The data files of a download folder (bookkeeping files and 10x companions left out)."""
    files = sorted(p for p in raw_dir.iterdir() if p.is_file() and not _SKIP.search(p.name))
    mtx = [p for p in files if p.name.lower().endswith(("matrix.mtx", "matrix.mtx.gz"))]
    if mtx:  # barcodes/features files belong to the matrix
        companions = re.compile(r"(barcodes|features|genes)\.tsv(\.gz)?$", re.IGNORECASE)
        files = [p for p in files if not companions.search(p.name)]
    # a 10x folder (matrix.mtx + barcodes + features) placed whole in the download folder
    files += sorted(p for p in raw_dir.iterdir() if p.is_dir()
                    and any(c.name.lower().endswith(("matrix.mtx", "matrix.mtx.gz")) for c in p.iterdir()))
    if not files:
        raise FormatError(f"{raw_dir}: no data files were downloaded")
    return files


def read_counts(path: Path, *, fmt: str | None = None, cache: Path | None = None, dataset_id: str | None = None,
                metadata: dict[str, str | None] | None = None, vocabulary: set[str] | None = None,
                max_bytes: int | None = None, cap: DecompressionCap | None = None) -> Any:
    """Read ``path`` into memory as an AnnData with raw counts in ``X`` and ``layers["counts"]``."""
    import anndata as ad

    src = open_counts(path, fmt=fmt, cache=cache, vocabulary=vocabulary, max_bytes=max_bytes, cap=cap)
    try:
        blocks = [b for _, b in src.chunks()]
        X = sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, len(src.genes)), dtype=np.float32)
        cells = list(src.cells[0 : src.n_cells])
    finally:
        src.close()
    adata = ad.AnnData(X=X)
    adata.var_names = src.genes
    adata.obs_names = cells
    adata.var_names_make_unique()
    adata.layers["counts"] = adata.X
    for key, values in (src.obs_table or {}).items():
        adata.obs[key] = list(values)
    for key, values in (src.var_table or {}).items():
        adata.var[key] = list(values)
    if src.gene_ids is not None:
        adata.var["gene_id"] = src.gene_ids
    non_integer = bool(X.nnz and not np.all(np.mod(X.data, 1) == 0))
    if non_integer:
        log.warning("%s: values are not integers; these may be normalised data, not counts", path.name)
    adata.uns["atlasflow_read"] = {"format": src.format, "non_integer": non_integer, **src.notes}
    if dataset_id is not None:
        adata.obs["dataset_id"] = dataset_id
    for key, value in (metadata or {}).items():
        if value is not None:
            adata.obs[key] = value
    return adata
