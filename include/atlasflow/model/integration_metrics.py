"""scIB metrics of a cell embedding, scored on labelled cells only, beside a baseline on the same cells.

The definitions are those of the scIB benchmark (Luecken et al., Nature Methods 2022) as implemented
by ``scib-metrics``; they are re-implemented here on scikit-learn and SciPy, which are pinned already,
rather than taken from ``scib-metrics``, which would add JAX, jaxlib (85 MB), igraph, chex and four
more packages to every worker for ~200 lines of arithmetic (see ``docs/integration-metrics.md``).
Every score is in [0, 1], higher is better.

Cells are scored only where their label is known. A label that is missing (``None``/NaN/``pd.NA``)
or whose text is one of :data:`UNLABELLED` (``""``, ``"nan"``, ``"unknown"``, ...) marks an
unlabelled cell: it is left out of every metric, never turned into a class of its own (a class
``"nan"`` would reward an embedding for clustering the cells nobody annotated).

Bio conservation (labels ``l``):

- ``asw_label``: mean silhouette width of the labels over all cells, Euclidean, rescaled
  ``(s + 1) / 2``.
- ``nmi``, ``ari``: normalised mutual information (arithmetic mean normalisation) and adjusted Rand
  index between the labels and a k-means clustering with k = the number of labels (scikit-learn
  ``KMeans``, 10 initialisations, seeded). scIB optimises a Louvain/Leiden resolution instead;
  k-means at the true k is ``scib-metrics``' ``nmi_ari_cluster_labels_kmeans`` and needs no igraph.
- ``isolated_label_asw``: the labels present in the fewest batches are "isolated"; the score is the
  mean, over those labels, of the mean rescaled label silhouette of their cells (``scib-metrics``'
  ASW variant of scIB's isolated-label score).
- ``clisi``: cell-type LISI (below) of the labels, median over cells, scaled
  ``(L - median) / (L - 1)`` for ``L`` labels (1: every neighbourhood holds one label).

Batch correction (batches ``b``, the datasets scVI corrected for):

- ``asw_batch``: for each label with cells from at least two batches (and not one cell per batch),
  the silhouette of the batches among that label's cells; each cell scores ``1 - |s|``; the mean
  per label, then the mean over labels (1: batches perfectly mixed within every label).
- ``graph_connectivity``: the k = 15 nearest-neighbour graph of all scored cells, symmetrised (an
  edge where either cell is among the other's neighbours, as scanpy's graph scIB uses); for each
  label, the share of its cells in the largest connected component of the label's subgraph; the
  mean over labels.
- ``ilisi``: integration LISI of the batches, median over cells, scaled ``(median - 1) / (B - 1)``
  for ``B`` batches (1: every neighbourhood holds all batches in equal shares).

LISI (Korsunsky et al., Nature Methods 2019) of a cell: on its k = 90 nearest neighbours (itself
excluded), Gaussian weights ``exp(-beta * d)`` of the Euclidean distances with ``beta`` found by
bisection so the weights' perplexity is k / 3 = 30; the inverse Simpson index of the weighted
categories, ``1 / sum_c p_c ** 2``. Distances are shifted by each cell's nearest one before the
exponential (the normalised weights are unchanged), so distant neighbourhoods do not underflow.

Aggregates, unscaled as ``scib-metrics``' ``Benchmarker.get_results()`` by default:
``bio_conservation`` = mean of the bio metrics, ``batch_correction`` = mean of the batch metrics
(each over those that are defined), ``total = 0.6 * bio + 0.4 * batch``. Not computed: kBET,
principal-component regression, and the BRAS variant of the batch silhouette.

A metric that is undefined on the cells given (one label only, one batch only) is ``None``. With no
labelled cell at all only ``ilisi`` is computed, on all cells.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = [
    "BATCH_METRICS",
    "BIO_METRICS",
    "UNLABELLED",
    "EmbeddingScores",
    "IntegrationScores",
    "clisi",
    "graph_connectivity",
    "ilisi",
    "isolated_label_asw",
    "labelled_mask",
    "lisi",
    "nmi_ari_kmeans",
    "score_embedding",
    "score_embeddings",
    "silhouette_batch",
    "silhouette_label",
]

log = logging.getLogger(__name__)

#: Label texts (stripped, case-folded) that mean "no label"; missing values count too.
UNLABELLED = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>", "unknown", "unassigned"})
BIO_METRICS = ("asw_label", "nmi", "ari", "isolated_label_asw", "clisi")
BATCH_METRICS = ("asw_batch", "graph_connectivity", "ilisi")
GRAPH_NEIGHBOURS = 15
LISI_NEIGHBOURS = 90


def labelled_mask(labels: Any) -> np.ndarray:
    """True where a cell has a label: not missing and not one of :data:`UNLABELLED`.

    Parameters
    ----------
    labels
        One label per cell: any 1-d array-like (strings, a pandas Categorical, objects with NaN).

    Returns
    -------
    numpy.ndarray
        Boolean mask, one entry per cell.
    """
    import pandas as pd

    values = pd.Series(np.asarray(labels, dtype=object))
    missing = values.isna().to_numpy()
    text = values.astype(str).str.strip().str.casefold()
    return ~missing & ~text.isin(UNLABELLED).to_numpy()


def _codes(values: Any) -> tuple[np.ndarray, int]:
    """Integer codes 0..n-1 of ``values`` and n."""
    uniques, codes = np.unique(np.asarray(values).astype(str), return_inverse=True)
    return codes.ravel(), len(uniques)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _silhouettes(x: np.ndarray, codes: np.ndarray) -> np.ndarray | None:
    """Per-cell silhouettes, or None where silhouettes are undefined (1 group, or 1 cell per group)."""
    from sklearn.metrics import silhouette_samples

    n_groups = len(np.unique(codes))
    if n_groups < 2 or n_groups >= len(codes):
        return None
    return silhouette_samples(x, codes, metric="euclidean")


def silhouette_label(x: np.ndarray, labels: Any) -> float | None:
    """Label ASW rescaled to [0, 1]: ``(mean silhouette + 1) / 2``; None with fewer than 2 labels.

    Parameters
    ----------
    x
        Embedding, cells x dimensions.
    labels
        One label per cell (all cells labelled).
    """
    s = _silhouettes(np.asarray(x, dtype=np.float64), _codes(labels)[0])
    return None if s is None else float((s.mean() + 1) / 2)


def silhouette_batch(x: np.ndarray, labels: Any, batches: Any) -> float | None:
    """Batch ASW within labels: mean over labels of mean ``1 - |s_batch|``; None if no label qualifies.

    A label counts when its cells come from at least two batches and not every cell is its own
    batch (silhouettes are undefined otherwise).

    Parameters
    ----------
    x
        Embedding, cells x dimensions.
    labels, batches
        One label and one batch per cell.
    """
    x = np.asarray(x, dtype=np.float64)
    labels, batches = _codes(labels)[0], _codes(batches)[0]
    per_label = []
    for label in np.unique(labels):
        mask = labels == label
        s = _silhouettes(x[mask], batches[mask])
        if s is not None:
            per_label.append(float(np.mean(1 - np.abs(s))))
    return _mean(per_label)


def _isolated(sil: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float | None:
    """Isolated-label ASW from per-cell label silhouettes ``sil`` (unscaled)."""
    per_label = {lab: len(np.unique(batches[labels == lab])) for lab in np.unique(labels)}
    fewest = min(per_label.values())
    scaled = (sil + 1) / 2
    return float(np.mean([scaled[labels == lab].mean() for lab, n in per_label.items() if n <= fewest]))


def isolated_label_asw(x: np.ndarray, labels: Any, batches: Any) -> float | None:
    """Mean rescaled label silhouette of the labels found in the fewest batches; None with < 2 labels.

    Parameters
    ----------
    x
        Embedding, cells x dimensions.
    labels, batches
        One label and one batch per cell.
    """
    codes = _codes(labels)[0]
    sil = _silhouettes(np.asarray(x, dtype=np.float64), codes)
    return None if sil is None else _isolated(sil, codes, _codes(batches)[0])


def nmi_ari_kmeans(x: np.ndarray, labels: Any, *, seed: int = 0) -> tuple[float | None, float | None]:
    """NMI and ARI of k-means (k = number of labels) against the labels; (None, None) with < 2 labels.

    Parameters
    ----------
    x
        Embedding, cells x dimensions.
    labels
        One label per cell.
    seed
        k-means' random state: the same seed gives the same clustering.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    codes, k = _codes(labels)
    if k < 2 or k >= len(codes):
        return None, None
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.asarray(x, dtype=np.float64))
    return (float(normalized_mutual_info_score(codes, clusters, average_method="arithmetic")),
            float(adjusted_rand_score(codes, clusters)))


def _neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices of each cell's ``k`` nearest other cells, nearest first."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors()  # no argument: each cell's own row is left out
    return dist, idx


def _connectivity(idx: np.ndarray, labels: np.ndarray) -> float:
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n, k = idx.shape
    graph = sp.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    graph = (graph + graph.T).tocsr()  # undirected: scIB's scanpy graph is symmetric
    shares = []
    for label in np.unique(labels):
        mask = labels == label
        _, components = connected_components(graph[mask][:, mask], directed=False)
        shares.append(np.bincount(components).max() / mask.sum())
    return float(np.mean(shares))


def graph_connectivity(x: np.ndarray, labels: Any, *, k: int = GRAPH_NEIGHBOURS) -> float | None:
    """Mean over labels of the share of the label's cells in its largest kNN-graph component.

    Parameters
    ----------
    x
        Embedding, cells x dimensions.
    labels
        One label per cell.
    k
        Neighbours per cell in the graph (of all cells; each label's subgraph is cut from it).
    """
    if len(x) < 2:
        return None
    _, idx = _neighbours(np.asarray(x, dtype=np.float64), k)
    return _connectivity(idx, _codes(labels)[0])


def _simpson(dist: np.ndarray, idx: np.ndarray, codes: np.ndarray, n_codes: int, perplexity: float,
             *, tol: float = 1e-5, max_tries: int = 50) -> np.ndarray:
    """Simpson index per cell of the categories among its Gaussian-weighted neighbours.

    ``beta`` is bisected for all cells at once (vectorised); 50 steps as Harmony's LISI.
    """
    d = dist - dist[:, :1]  # shift by the nearest distance: the same normalised weights, no underflow
    n = len(d)
    beta, lo, hi = np.ones(n), np.full(n, -np.inf), np.full(n, np.inf)
    target = np.log(perplexity)

    def entropy(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = np.exp(-d * b[:, None])
        total = w.sum(axis=1)
        p = w / total[:, None]
        return np.log(total) + b * (d * p).sum(axis=1), p

    h, p = entropy(beta)
    for _ in range(max_tries):
        diff = h - target
        active = np.abs(diff) >= tol
        if not active.any():
            break
        up = active & (diff > 0)  # too flat (entropy too high): sharpen
        down = active & (diff <= 0)
        lo = np.where(up, beta, lo)
        hi = np.where(down, beta, hi)
        beta = np.where(up, np.where(np.isinf(hi), beta * 2, (beta + hi) / 2), beta)
        beta = np.where(down, np.where(np.isinf(lo), beta / 2, (beta + lo) / 2), beta)
        h, p = entropy(beta)
    shares = np.zeros((n, n_codes))
    np.add.at(shares, (np.repeat(np.arange(n), idx.shape[1]), codes[idx].ravel()), p.ravel())
    return (shares ** 2).sum(axis=1)


def lisi(x: np.ndarray, categories: Any, *, k: int = LISI_NEIGHBOURS) -> np.ndarray:
    """Per-cell local inverse Simpson index of ``categories`` (1 .. number of categories).

    Parameters
    ----------
    x
        Embedding, cells x dimensions.
    categories
        One category (batch or label) per cell.
    k
        Neighbours per cell (fewer when there are fewer cells); the perplexity is ``k // 3``.
    """
    codes, n_codes = _codes(categories)
    dist, idx = _neighbours(np.asarray(x, dtype=np.float64), k)
    return 1 / _simpson(dist, idx, codes, n_codes, max(dist.shape[1] // 3, 1))


def _ilisi_from(values: np.ndarray, n_batches: int) -> float | None:
    return None if n_batches < 2 else float((np.median(values) - 1) / (n_batches - 1))


def _clisi_from(values: np.ndarray, n_labels: int) -> float | None:
    return None if n_labels < 2 else float((n_labels - np.median(values)) / (n_labels - 1))


def ilisi(x: np.ndarray, batches: Any, *, k: int = LISI_NEIGHBOURS) -> float | None:
    """Scaled iLISI, ``(median LISI - 1) / (B - 1)``; None with one batch."""
    return _ilisi_from(lisi(x, batches, k=k), _codes(batches)[1])


def clisi(x: np.ndarray, labels: Any, *, k: int = LISI_NEIGHBOURS) -> float | None:
    """Scaled cLISI, ``(L - median LISI) / (L - 1)``; None with one label."""
    return _clisi_from(lisi(x, labels, k=k), _codes(labels)[1])


@dataclass(frozen=True)
class EmbeddingScores:
    """The scIB metrics of one embedding (module docstring for the definitions); None: undefined."""

    asw_label: float | None = None
    nmi: float | None = None
    ari: float | None = None
    isolated_label_asw: float | None = None
    clisi: float | None = None
    asw_batch: float | None = None
    graph_connectivity: float | None = None
    ilisi: float | None = None

    @property
    def bio_conservation(self) -> float | None:
        return _mean([getattr(self, m) for m in BIO_METRICS])

    @property
    def batch_correction(self) -> float | None:
        return _mean([getattr(self, m) for m in BATCH_METRICS])

    @property
    def total(self) -> float | None:
        bio, batch = self.bio_conservation, self.batch_correction
        if bio is None or batch is None:
            return bio if batch is None else batch
        return 0.6 * bio + 0.4 * batch

    def to_dict(self, digits: int = 4) -> dict[str, float | None]:
        """Every metric and the three aggregates, rounded (JSON- and XCom-ready)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(bio_conservation=self.bio_conservation, batch_correction=self.batch_correction, total=self.total)
        return {k: None if v is None else round(float(v), digits) for k, v in out.items()}


@dataclass(frozen=True)
class IntegrationScores:
    """Several embeddings of the same cells scored on the same labelled cells."""

    cells: int  # cells scored: the labelled ones (all cells, for iLISI alone, when none is labelled)
    unlabelled: int  # cells without a label: left out of every metric (but iLISI when none is labelled)
    cell_types: int
    batches: int
    embeddings: Mapping[str, EmbeddingScores]

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        return {"cells": self.cells, "unlabelled": self.unlabelled, "cell_types": self.cell_types,
                "batches": self.batches, "clustering": "kmeans",
                **{name: s.to_dict(digits) for name, s in self.embeddings.items()}}


def score_embedding(x: np.ndarray, labels: Any | None, batches: Any, *, seed: int = 0) -> EmbeddingScores:
    """Every metric of one embedding; ``labels`` None (or all unlabelled): iLISI only.

    Parameters
    ----------
    x
        Embedding, cells x dimensions.
    labels
        One label per cell, all labelled (use :func:`score_embeddings` to drop unlabelled cells).
    batches
        One batch per cell.
    seed
        k-means' random state.
    """
    x = np.asarray(x, dtype=np.float64)
    batch_codes, n_batches = _codes(batches)
    if len(x) < 3:  # no silhouette, neighbourhood or clustering means anything below this
        return EmbeddingScores()
    dist, idx = _neighbours(x, max(LISI_NEIGHBOURS, GRAPH_NEIGHBOURS))
    lisi_k = min(LISI_NEIGHBOURS, dist.shape[1])
    perplexity = max(lisi_k // 3, 1)
    batch_lisi = 1 / _simpson(dist[:, :lisi_k], idx[:, :lisi_k], batch_codes, n_batches, perplexity)
    if labels is None:
        return EmbeddingScores(ilisi=_ilisi_from(batch_lisi, n_batches))
    codes, n_labels = _codes(labels)
    sil = _silhouettes(x, codes)
    nmi, ari = nmi_ari_kmeans(x, codes, seed=seed)
    label_lisi = 1 / _simpson(dist[:, :lisi_k], idx[:, :lisi_k], codes, n_labels, perplexity)
    return EmbeddingScores(
        asw_label=None if sil is None else float((sil.mean() + 1) / 2),
        nmi=nmi, ari=ari,
        isolated_label_asw=None if sil is None else _isolated(sil, codes, batch_codes),
        clisi=_clisi_from(label_lisi, n_labels),
        asw_batch=silhouette_batch(x, codes, batch_codes) if n_batches > 1 else None,
        graph_connectivity=_connectivity(idx[:, :GRAPH_NEIGHBOURS], codes),
        ilisi=_ilisi_from(batch_lisi, n_batches),
    )


def score_embeddings(embeddings: Mapping[str, np.ndarray], labels: Any | None, batches: Any, *,
                     seed: int = 0) -> IntegrationScores:
    """Score each embedding of the same cells on the same labelled cells.

    Parameters
    ----------
    embeddings
        Name -> embedding (cells x dimensions), rows in the same cell order for all.
    labels
        One label per cell, or None; unlabelled cells (:func:`labelled_mask`) are left out.
    batches
        One batch per cell.
    seed
        k-means' random state, the same for every embedding.

    Returns
    -------
    IntegrationScores
        The cells scored and each embedding's :class:`EmbeddingScores`.
    """
    batches = np.asarray(batches).astype(str)
    n = len(batches)
    for name, x in embeddings.items():
        if len(x) != n:
            raise ValueError(f"embedding {name!r} has {len(x)} rows for {n} cells")
    keep = labelled_mask(labels) if labels is not None else np.zeros(n, dtype=bool)
    if keep.any():
        kept_labels = np.asarray(labels, dtype=object)[keep].astype(str)
        scores = {name: score_embedding(np.asarray(x)[keep], kept_labels, batches[keep], seed=seed)
                  for name, x in embeddings.items()}
        result = IntegrationScores(cells=int(keep.sum()), unlabelled=int(n - keep.sum()),
                                   cell_types=len(np.unique(kept_labels)), batches=len(np.unique(batches[keep])),
                                   embeddings=scores)
    else:
        scores = {name: score_embedding(np.asarray(x), None, batches, seed=seed) for name, x in embeddings.items()}
        result = IntegrationScores(cells=n, unlabelled=n, cell_types=0, batches=len(np.unique(batches)),
                                   embeddings=scores)
    log.debug("scored %d embeddings on %d cells (%d unlabelled left out)", len(embeddings), result.cells,
              result.unlabelled)
    return result
