"""Counts from R's RDS files, parsed by ``rds2py`` (no R needed at run time).

Read: a ``dgCMatrix`` (genes × cells, as R stores counts), a dense integer/double ``matrix``, a
``SingleCellExperiment`` / ``SummarizedExperiment`` (the ``counts`` assay; ``colData`` → obs,
``rowData`` → var) and a Seurat v3/v4 object (the active assay's ``counts``; ``meta.data`` → obs).
rds2py's own classes for these need BiocPy's DelayedArray stack, so the objects are taken from its
generic parse tree (:func:`rds2py.parse_rds`), whose layout is R's serialisation itself.

Anything else raises :class:`RdsError` naming the R class and how to convert the object in R.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from atlasflow.core.fsutil import DecompressionLimit, GzipDamaged, gunzip_blocks

__all__ = ["RdsCounts", "RdsError", "read_rds_counts"]

log = logging.getLogger(__name__)
_CONVERT = ("in R, save the counts as a SingleCellExperiment or a dgCMatrix: "
            "saveRDS(as(counts, 'dgCMatrix'), 'counts.rds'), or write 10x files with DropletUtils::write10xCounts()")
_GENE_ID_COLUMNS = ("gene_id", "gene_ids", "ID", "ensembl_id", "ensembl_gene_id")


class RdsError(ValueError):
    """The RDS file holds no counts this reader understands; the message names the R class."""


@dataclass
class RdsCounts:
    """Cells × genes counts read from an RDS file."""

    matrix: sp.csr_matrix
    genes: list[str]
    cells: list[str]
    r_class: str
    assay: str | None = None
    gene_ids: list[str] | None = None
    obs: dict[str, Any] = field(default_factory=dict)
    var: dict[str, Any] = field(default_factory=dict)


def _attrs(node: dict[str, Any]) -> dict[str, Any]:
    return node.get("attributes") or {}


def _class(node: Any) -> str:
    if not isinstance(node, dict):
        return type(node).__name__
    cls = _attrs(node).get("class")
    if isinstance(cls, dict) and cls.get("data"):
        return str(cls["data"][0])
    return str(node.get("class_name") or node.get("type"))


def _strings(node: Any) -> list[str] | None:
    if not isinstance(node, dict) or node.get("type") == "null":
        return None
    data = node.get("data")
    if data is None:
        return None
    return [str(x) for x in data]


def _named_list(node: Any) -> dict[str, Any]:
    """An R named list (``vector`` with a ``names`` attribute) as a dict."""
    if not isinstance(node, dict):
        return {}
    names = _strings(_attrs(node).get("names")) or []
    return dict(zip(names, node.get("data") or [], strict=False))


def _vector(node: dict[str, Any]) -> np.ndarray | list[str]:
    """An atomic R vector; a factor becomes its labels."""
    data = node.get("data")
    levels = _strings(_attrs(node).get("levels"))
    if levels is not None and data is not None:
        codes = np.asarray(data)
        return [levels[c - 1] if c > 0 else "NA" for c in codes]  # R factors are 1-based; NA is a large negative
    if isinstance(data, list):
        return [str(x) for x in data]
    return np.asarray(data)


def _frame(node: Any) -> tuple[dict[str, Any], list[str] | None]:
    """A ``data.frame`` or S4 ``DFrame`` as ``({column: values}, rownames)``."""
    if not isinstance(node, dict):
        return {}, None
    if node.get("type") == "S4":  # S4Vectors::DFrame
        a = _attrs(node)
        cols = _named_list(a.get("listData"))
        rownames = _strings(a.get("rownames"))
    else:  # base data.frame: a named list with row.names
        cols = _named_list(node)
        rownames = _strings(_attrs(node).get("row.names"))
    atomic = ("integer", "double", "string", "boolean", "logical")
    out = {k: _vector(v) for k, v in cols.items()
           if isinstance(v, dict) and v.get("type") in atomic and v.get("data") is not None}
    return out, rownames


def _matrix(node: dict[str, Any], what: str) -> tuple[sp.csr_matrix, list[str] | None, list[str] | None]:
    """A genes × cells R matrix → (cells × genes CSR, gene names, cell names)."""
    cls = _class(node)
    a = _attrs(node)
    if cls in ("dgCMatrix", "dgTMatrix", "dgRMatrix"):
        rows, cols = (int(x) for x in a["Dim"]["data"])
        dimnames = (a.get("Dimnames") or {}).get("data") or [None, None]
        genes, cells = _strings(dimnames[0]), _strings(dimnames[1])
        x = np.asarray(a["x"]["data"], dtype=np.float32)
        if cls == "dgCMatrix":
            m = sp.csc_matrix((x, np.asarray(a["i"]["data"]), np.asarray(a["p"]["data"])), shape=(rows, cols))
        elif cls == "dgRMatrix":
            m = sp.csr_matrix((x, np.asarray(a["j"]["data"]), np.asarray(a["p"]["data"])), shape=(rows, cols))
        else:
            m = sp.coo_matrix((x, (np.asarray(a["i"]["data"]), np.asarray(a["j"]["data"]))), shape=(rows, cols))
        return sp.csr_matrix(m.T), genes, cells
    if node.get("type") in ("integer", "double") and "dim" in a:
        rows, cols = (int(v) for v in a["dim"]["data"])
        dense = np.asarray(node["data"], dtype=np.float32).reshape((rows, cols), order="F")  # R is column-major
        dimnames = (a.get("dimnames") or {}).get("data") or [None, None]
        return sp.csr_matrix(dense.T), _strings(dimnames[0]), _strings(dimnames[1])
    raise RdsError(f"{what} is a {cls}, not an in-memory matrix (DelayedArray/HDF5-backed assays are not read); "
                   f"{_CONVERT}")


def _summarized(path: Path, root: dict[str, Any], cls: str) -> RdsCounts:
    a = _attrs(root)
    assays = _named_list(_attrs(_attrs(a.get("assays") or {}).get("data") or {}).get("listData"))
    if not assays:
        raise RdsError(f"{path.name}: the {cls} has no assays")
    name = "counts" if "counts" in assays else next(iter(assays))
    if name != "counts":
        log.warning("%s: no 'counts' assay; reading %r (values may not be raw counts)", path.name, name)
    matrix, genes, cells = _matrix(assays[name], f"{path.name}: assay {name!r} of the {cls}")
    obs, colnames = _frame(a.get("colData"))
    rowranges = a.get("rowRanges")
    row_frame = _attrs(rowranges).get("elementMetadata") if isinstance(rowranges, dict) else a.get("elementMetadata")
    var, _ = _frame(row_frame)
    genes = genes or _strings(a.get("NAMES")) or (
        _strings(_attrs(_attrs(rowranges).get("partitioning") or {}).get("NAMES")) if isinstance(rowranges, dict)
        else None)
    cells = cells or colnames
    gene_ids = next((list(map(str, var[c])) for c in _GENE_ID_COLUMNS if c in var), None)
    return _finish(path, matrix, genes, cells, cls, name, gene_ids, obs, var)


def _seurat(path: Path, root: dict[str, Any]) -> RdsCounts:
    a = _attrs(root)
    assays = _named_list(a.get("assays"))
    active = (_strings(a.get("active.assay")) or [next(iter(assays), "RNA")])[0]
    assay = assays.get(active)
    kind = _class(assay)
    if kind != "Assay":  # Seurat v5's Assay5 keeps layers behind LogMaps; SCT/ChromatinAssay differ again
        raise RdsError(f"{path.name}: a Seurat object whose {active!r} assay is a {kind}, which is not read; in R: "
                       f"sce <- Seurat::as.SingleCellExperiment(obj, assay = '{active}'); saveRDS(sce, 'x.rds') "
                       "(for Seurat v5 first: obj[['RNA']] <- as(obj[['RNA']], 'Assay'))")
    matrix, genes, cells = _matrix(_attrs(assay)["counts"], f"{path.name}: counts of assay {active!r}")
    if matrix.nnz == 0:
        raise RdsError(f"{path.name}: the Seurat object's {active!r} counts are empty (only normalised data was "
                       "kept?); counts are needed")
    obs, rownames = _frame(a.get("meta.data"))
    var, _ = _frame(_attrs(assay).get("meta.features"))
    return _finish(path, matrix, genes, cells or rownames, "Seurat", active, None, obs, var)


def _finish(path: Path, matrix: sp.csr_matrix, genes: list[str] | None, cells: list[str] | None, cls: str,
            assay: str | None, gene_ids: list[str] | None, obs: dict[str, Any], var: dict[str, Any]) -> RdsCounts:
    n_cells, n_genes = matrix.shape
    if genes is None:
        raise RdsError(f"{path.name}: the {cls} has no gene names (rownames); set them in R before saving")
    cells = cells or [f"cell{i}" for i in range(n_cells)]
    if len(genes) != n_genes or len(cells) != n_cells:
        raise RdsError(f"{path.name}: matrix is {n_genes} genes x {n_cells} cells but there are {len(genes)} gene and "
                       f"{len(cells)} cell names")
    obs = {k: v for k, v in obs.items() if len(v) == n_cells}
    var = {k: v for k, v in var.items() if len(v) == n_genes}
    return RdsCounts(matrix.astype(np.float32), genes, cells, cls, assay, gene_ids, obs, var)


def _check_stream(path: Path, max_bytes: int | None = None, limit_rule: str = "") -> None:
    """Refuse what rds2py cannot parse before it sees it: its parser spins forever (uninterruptibly,
    in C++) on a damaged gzip stream, so the whole stream is decompressed and checked here first."""
    with path.open("rb") as fh:
        head = fh.read(5)
        if head.startswith(b"X\n"):
            return  # uncompressed XDR serialisation: reading it inflates nothing
        if head.startswith((b"BZh", b"\xfd7zXZ")):
            raise RdsError(f"{path.name}: an RDS file compressed with {'bzip2' if head.startswith(b'BZh') else 'xz'}, "
                           "which is not read; in R: saveRDS(readRDS(f), f, compress = 'gzip')")
        if head.startswith((b"A\n", b"B\n")):
            raise RdsError(f"{path.name}: an ASCII or native-binary RDS file; only the default XDR format is read "
                           "(in R: saveRDS(readRDS(f), f, ascii = FALSE))")
        if not head.startswith(b"\x1f\x8b"):
            raise RdsError(f"{path.name}: not a readable RDS file (no RDS or gzip header)")
        fh.seek(0)
        first = b""
        try:
            for out in gunzip_blocks(fh, max_total=max_bytes):
                if len(first) < 2:
                    first += out[:2]
        except DecompressionLimit as exc:  # rds2py inflates it whole in memory: refuse a bomb first
            raise RdsError(f"{path.name}: decompresses to over {exc.limit} bytes from a {path.stat().st_size}-byte "
                           f"file, more than {limit_rule or 'the limit'}; refused") from exc
        except GzipDamaged as exc:
            raise RdsError(f"{path.name}: not a readable RDS file ({exc})") from exc
    if not first.startswith(b"X\n"):
        raise RdsError(f"{path.name}: not a readable RDS file (gzip data, but not an R XDR serialisation)")


def read_rds_counts(path: Path, *, max_bytes: int | None = None, limit_rule: str = "") -> RdsCounts:
    """Read counts from an ``.rds`` file (refused when it decompresses to over ``max_bytes``, a limit
    that ``limit_rule`` describes in the message).

    Raises
    ------
    RdsError
        Not an RDS file, or an R object without readable counts; the message names its class and
        how to convert it in R.
    """
    try:
        from rds2py import parse_rds
    except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
        raise RdsError("reading .rds files needs rds2py (pip install rds2py)") from exc
    _check_stream(path, max_bytes, limit_rule)
    try:
        root = parse_rds(str(path))
    except Exception as exc:  # the C++ parser raises RuntimeError/ValueError for damaged input
        raise RdsError(f"{path.name}: not a readable RDS file ({type(exc).__name__}: {exc})") from exc
    cls = _class(root)
    if cls in ("dgCMatrix", "dgTMatrix", "dgRMatrix") or (root.get("type") in ("integer", "double")
                                                           and "dim" in _attrs(root)):
        matrix, genes, cells = _matrix(root, path.name)
        return _finish(path, matrix, genes, cells, cls if cls != "integer_vector" else "matrix", None, None, {}, {})
    if cls in ("SingleCellExperiment", "SummarizedExperiment", "RangedSummarizedExperiment"):
        return _summarized(path, root, cls)
    if cls == "Seurat":
        return _seurat(path, root)
    package = root.get("package_name") if isinstance(root, dict) else None
    raise RdsError(f"{path.name}: an R object of class {cls!r}{f' (package {package})' if package else ''}, which "
                   f"holds no counts this reader understands; {_CONVERT}")
