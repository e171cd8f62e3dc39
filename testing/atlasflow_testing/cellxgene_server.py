"""A local stand-in for CELLxGENE Discover: its Curation API (v1) JSON and real cells as H5AD assets.

The API answers follow the documented shapes (``chanzuckerberg/single-cell-data-portal``,
``backend/curation/api/curation-api.yml``):

- ``GET /curation/v1/collections/{collection_id}``: the collection with its ``datasets``, each a
  ``dataset`` object (``dataset_id``, ``dataset_version_id``, ``assets: [{filetype, url, filesize}]``,
  ``organism``/``assay``/``tissue``/``disease`` as ``[{label, ontology_term_id}]``, ``cell_count``, …),
- ``GET /curation/v1/collections/{collection_id}/datasets/{dataset_id}``: one of them,
- ``GET /curation/v1/datasets/{dataset_id}/versions``: a list of ``dataset_version`` objects, newest first,
- anything else under ``/curation/v1/``: 404 with a ``problem`` JSON body.

The H5AD assets are served from ``root`` by :mod:`atlasflow_testing.geo_server`'s handler (ranges,
ETags, faults). :func:`write_cellxgene_h5ad` writes real cells (the bundled PBMCs) in the CELLxGENE
schema: Ensembl gene ids as ``var_names`` with symbols in ``feature_name``, raw counts in
``raw.X`` and log-normalised values in ``X``, and the curated obs columns with their ontology ids.
Tests break answers on purpose with :meth:`CellxgeneServer.override` (wrong JSON, a missing H5AD
asset, an HTTP status).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import scipy.sparse as sp

from atlasflow_testing.geo_server import _Handler, _Server
from atlasflow_testing.threads import ServedInThread, listen

__all__ = ["API_PREFIX", "CellxgeneServer", "PublishedDataset", "write_cellxgene_h5ad"]

API_PREFIX = "/curation/v1"

# pbmc68k_reduced's bulk labels as Cell Ontology terms (label, id), as CELLxGENE curates them
_CELL_ONTOLOGY = {
    "CD14+ Monocyte": ("CD14-positive monocyte", "CL:0001054"),
    "CD19+ B": ("B cell", "CL:0000236"),
    "CD34+": ("hematopoietic precursor cell", "CL:0008001"),
    "CD4+/CD25 T Reg": ("regulatory T cell", "CL:0000815"),
    "CD4+/CD45RA+/CD25- Naive T": ("naive thymus-derived CD4-positive, alpha-beta T cell", "CL:0000895"),
    "CD4+/CD45RO+ Memory": ("CD4-positive, alpha-beta memory T cell", "CL:0000897"),
    "CD56+ NK": ("natural killer cell", "CL:0000623"),
    "CD8+ Cytotoxic T": ("CD8-positive, alpha-beta cytotoxic T cell", "CL:0000794"),
    "CD8+/CD45RA+ Naive Cytotoxic": ("naive thymus-derived CD8-positive, alpha-beta T cell", "CL:0000900"),
    "Dendritic": ("dendritic cell", "CL:0000451"),
}
HUMAN = ("Homo sapiens", "NCBITaxon:9606")
MOUSE = ("Mus musculus", "NCBITaxon:10090")
ASSAY = ("10x 3' v1", "EFO:0009901")  # pbmc68k (Zheng et al. 2017) is Chromium v1
TISSUE = ("blood", "UBERON:0000178")
DISEASE = ("normal", "PATO:0000461")


def _ensembl_ids(symbols: Sequence[str]) -> list[str | None]:
    """Each symbol's Ensembl id from the built-in human vocabulary (through a previous symbol too)."""
    from atlasflow.prep.genes import Vocabulary

    vocab = Vocabulary.builtin("human_grch38_ens100")
    ids = {s: g for s, g in zip(vocab.symbols, vocab.gene_ids, strict=True) if g}
    return [ids.get(s) or ids.get(vocab.synonyms.get(s, "")) for s in symbols]


def write_cellxgene_h5ad(counts: Any, path: Path, *, donors: Sequence[str] = ("D1", "D2"),
                         organism: tuple[str, str] = HUMAN, label_key: str = "bulk_labels") -> dict[str, Any]:
    """Write ``counts`` (an AnnData of raw counts, e.g. :func:`atlasflow_testing.realdata.pbmc_counts`) in
    the CELLxGENE schema. Genes without an Ensembl id are left out (the schema requires one); cells
    are split into ``donors`` in contiguous blocks. With ``organism`` mouse, the gene ids get mouse
    ``ENSMUSG`` prefixes (real mouse datasets carry them).

    Returns
    -------
    ``{"cells", "genes", "donors": {donor: cells}, "cell_types": {label: cells}}`` of what was written.
    """
    import anndata as ad
    import pandas as pd

    symbols = [str(g) for g in counts.var_names]
    ids = _ensembl_ids(symbols)
    keep = [k for k, g in enumerate(ids) if g]
    seen: set[str] = set()
    keep = [k for k in keep if not (ids[k] in seen or seen.add(ids[k]))]  # type: ignore[func-returns-value]
    gene_ids = [str(ids[k]) for k in keep]
    if organism == MOUSE:
        gene_ids = [g.replace("ENSG", "ENSMUSG", 1) for g in gene_ids]
    raw = sp.csr_matrix(counts.X)[:, keep].astype(np.float32)
    totals = np.asarray(raw.sum(axis=1)).ravel()
    norm = sp.diags(1e4 / np.maximum(totals, 1)) @ raw
    norm.data = np.log1p(norm.data)
    n = raw.shape[0]
    donor = np.array([donors[min(k * len(donors) // n, len(donors) - 1)] for k in range(n)])
    labels = [_CELL_ONTOLOGY.get(str(b), ("unknown", "unknown")) for b in counts.obs[label_key]]
    var = pd.DataFrame({"feature_name": [symbols[k] for k in keep], "feature_reference": organism[1],
                        "feature_biotype": "gene", "feature_is_filtered": False}, index=gene_ids)
    obs = pd.DataFrame({
        "donor_id": pd.Categorical(donor),
        "cell_type": pd.Categorical([lab for lab, _ in labels]),
        "cell_type_ontology_term_id": pd.Categorical([term for _, term in labels]),
        "assay": ASSAY[0], "assay_ontology_term_id": ASSAY[1],
        "organism": organism[0], "organism_ontology_term_id": organism[1],
        "tissue": TISSUE[0], "tissue_ontology_term_id": TISSUE[1],
        "disease": DISEASE[0], "disease_ontology_term_id": DISEASE[1],
        "suspension_type": "cell", "is_primary_data": True,
    }, index=[str(c) for c in counts.obs_names])
    adata = ad.AnnData(X=norm.astype(np.float32).tocsr(), obs=obs, var=var)
    adata.raw = ad.AnnData(X=raw, obs=obs[[]], var=var.drop(columns=["feature_is_filtered"]))
    adata.uns["schema_version"] = "5.2.0"
    adata.uns["title"] = path.stem
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    adata.write_h5ad(tmp)
    tmp.rename(path)
    return {"cells": int(n), "genes": len(keep),
            "donors": {d: int((donor == d).sum()) for d in donors},
            "cell_types": {str(k): int(v) for k, v in pd.Series([lab for lab, _ in labels]).value_counts().items()}}


def _term(pair: tuple[str, str]) -> dict[str, str]:
    return {"label": pair[0], "ontology_term_id": pair[1]}


@dataclass
class PublishedDataset:
    """One dataset of the stand-in: its H5AD under the server's root and the metadata the API shows."""

    path: Path  # the H5AD, below the server's root
    dataset_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    dataset_version_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    title: str = "PBMCs"
    organism: tuple[str, str] = HUMAN
    assay: tuple[str, str] = ASSAY
    cell_count: int | None = None
    donors: Sequence[str] = ()
    rds: bool = True  # also list an RDS asset, as Discover did until 2024


class _CxgHandler(_Handler):
    server: _CxgServer

    def _serve(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if not path.startswith(API_PREFIX + "/"):
            super()._serve(head=head)  # the H5AD assets: ranges, ETags and faults of the GEO stand-in
            return
        with self.server.lock:
            self.server.hits[path] += 1
            answer = self.server.overrides.get(path) or self.server.answer(path)
        status, body = answer
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status < 400 else "application/problem+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)


class _CxgServer(_Server):
    def __init__(self, root: Path, port: int) -> None:
        self.collections: dict[str, tuple[str, list[PublishedDataset]]] = {}
        self.overrides: dict[str, tuple[int, Any]] = {}
        super().__init__(root, port, {})
        self.RequestHandlerClass = _CxgHandler

    def dataset_json(self, collection_id: str, d: PublishedDataset) -> dict[str, Any]:
        rel = d.path.resolve().relative_to(self.root).as_posix()
        base = f"http://127.0.0.1:{self.server_address[1]}"
        assets = [{"filetype": "H5AD", "filesize": d.path.stat().st_size, "url": f"{base}/{rel}"}]
        if d.rds:
            assets.append({"filetype": "RDS", "filesize": 1, "url": f"{base}/{rel[:-5]}.rds"})
        return {
            "dataset_id": d.dataset_id, "dataset_version_id": d.dataset_version_id, "collection_id": collection_id,
            "title": d.title, "assets": assets, "cell_count": d.cell_count,
            "organism": [_term(d.organism)], "assay": [_term(d.assay)], "tissue": [_term(TISSUE)],
            "disease": [_term(DISEASE)], "donor_id": list(d.donors), "is_primary_data": [True],
            "schema_version": "5.2.0", "suspension_type": ["cell"], "x_approximate_distribution": "NORMAL",
        }

    def answer(self, path: str) -> tuple[int, Any]:
        parts = path[len(API_PREFIX) + 1:].strip("/").split("/")
        not_found = (HTTPStatus.NOT_FOUND, {"detail": "Resource not found", "status": 404, "title": "Not Found"})
        if parts[0] == "collections" and len(parts) in (2, 4) and parts[1] in self.collections:
            name, datasets = self.collections[parts[1]]
            entries = [self.dataset_json(parts[1], d) for d in datasets]
            if len(parts) == 2:
                return HTTPStatus.OK, {"collection_id": parts[1], "collection_version_id": str(uuid.uuid5(
                    uuid.NAMESPACE_URL, parts[1])), "name": name, "visibility": "PUBLIC", "datasets": entries}
            if parts[2] == "datasets":
                hit = [e for e in entries if e["dataset_id"] == parts[3]]
                return (HTTPStatus.OK, hit[0]) if hit else not_found
        if parts[0] == "datasets" and len(parts) == 3 and parts[2] == "versions":
            for cid, (_, datasets) in self.collections.items():
                hit = [self.dataset_json(cid, d) for d in datasets if d.dataset_id == parts[1]]
                if hit:
                    return HTTPStatus.OK, hit  # one published version: the list holds the newest only
        return not_found


class CellxgeneServer(ServedInThread):
    """Start/stop the stand-in in a background thread; ``api_url`` is what ``download.cellxgene_api_url`` takes."""

    def __init__(self, root: Path, *, port: int = 0) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._server = listen(lambda: _CxgServer(root, port), port)
        self._serve_in_thread()

    @property
    def api_url(self) -> str:
        return self.url + API_PREFIX

    @property
    def faults(self) -> dict[str, dict[str, Any]]:
        """Per-path faults of the asset downloads (see :mod:`atlasflow_testing.geo_server`)."""
        return self._server.faults

    def publish(self, collection_id: str, datasets: Sequence[PublishedDataset], *, name: str = "PBMC atlas") -> None:
        """Make a collection and its datasets answerable (their H5AD files must be below the root)."""
        for d in datasets:
            d.path.resolve().relative_to(self._server.root)  # raises for a file the server cannot serve
        with self._server.lock:
            self._server.collections[collection_id] = (name, list(datasets))

    def override(self, api_path: str, status: int, body: Any) -> None:
        """Answer ``GET {API_PREFIX}/{api_path}`` with ``status`` and ``body`` (JSON-encoded unless bytes)."""
        with self._server.lock:
            self._server.overrides[f"{API_PREFIX}/{api_path.lstrip('/')}"] = (status, body)

    def dataset_json(self, collection_id: str, dataset: PublishedDataset) -> dict[str, Any]:
        """The ``dataset`` object the API shows for ``dataset`` (tests edit a copy and override with it)."""
        return self._server.dataset_json(collection_id, dataset)

    def hits(self, path: str) -> int:
        return self._server.hits[path]
