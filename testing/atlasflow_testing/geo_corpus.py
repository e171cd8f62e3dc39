"""Real GEO layouts built from real cells, published in GEO's folder structure for the local stand-in.

Every layout is scanpy's bundled pbmc68k_reduced (real PBMC counts, :func:`~atlasflow_testing.realdata.pbmc_counts`)
cut into samples and written the way GEO submitters do: GSM-prefixed 10x trios and per-sample
Cell Ranger HDF5 files inside ``GSE…_RAW.tar`` (with GEO's ``filelist.txt``), the same cells as an
HDF5 and a trio side by side, metadata tables next to a counts table, tables in both orientations,
Ensembl ids with version suffixes, counts only in an h5ad's ``.raw``, a mouse series, a series of
metadata only, and a GSM row. Each :class:`Layout` says what a correct intake ends with: the number
of cells before QC and their samples, or the words a quarantine reason must contain.

The series' family SOFT (``series/…/soft/GSE…_family.soft.gz``) and a sample's ``acc.cgi`` record
give GEO's organism of each sample, as GEO does.
"""

from __future__ import annotations

import gzip
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LAYOUTS", "Layout", "build_corpus", "corpus_vocabulary", "manifest_rows", "publish_soft", "write_raw_tar"]


@dataclass(frozen=True)
class Layout:
    """One manifest row of the corpus and what intake must make of it."""

    accession: str
    what: str
    cells: int | None = None  # cells before QC when processed; None: quarantined
    samples: tuple[str, ...] = ()  # obs['sample'] values expected (GSM ids)
    reason: tuple[str, ...] = ()  # words the quarantine reason contains (the file it names among them)
    stage: str | None = None  # where it is quarantined


LAYOUTS: tuple[Layout, ...] = (
    Layout("GSE910001", "RAW.tar of three GSM 10x trios, a t-SNE image and an annotation table", 700,
           ("GSM9100011", "GSM9100012", "GSM9100013")),
    Layout("GSE910002", "per-sample Cell Ranger HDF5 in RAW.tar (one sample also has the unfiltered one)", 700,
           ("GSM9100021", "GSM9100022")),
    Layout("GSE910003", "the same cells as a 10x HDF5 and a trio side by side, with a README", 400),
    Layout("GSE910004", "a genes x cells counts table next to two cell-metadata tables", 300),
    Layout("GSE910005", "a cells x genes counts table", 200),
    Layout("GSE910006", "genes as Ensembl ids with version suffixes", 250),
    Layout("GSE910007", "an h5ad whose counts are only in .raw (X is log-normalised)", 300),
    Layout("GSE910008", "a mouse series (GEO's records say Mus musculus)", None, (),
           ("GSM9100081", "Mus musculus", "not human"), "download"),
    Layout("GSE910009", "metadata tables only", None, (),
           ("no count-matrix files", "GSE910009_annotations.csv.gz", "metadata"), "download"),
    Layout("GSM9100101", "a GSM row: the sample's own folder", 150, ("GSM9100101",)),
    Layout("GSE910011", "RAW.tar without filelist.txt (members chosen while streaming)", 400,
           ("GSM9100111", "GSM9100112")),
    Layout("GSE910012", "a series of a human and a mouse sample: the mouse sample's file is skipped", 120,
           ("GSM9100121",)),
)


def corpus_vocabulary() -> Any:
    """The PBMCs' 765 genes with their Ensembl ids (from the packaged human vocabulary), so ids map."""
    from atlasflow.prep.genes import Vocabulary
    from atlasflow_testing.realdata import pbmc_counts

    human = Vocabulary.builtin("human_grch38_ens100")
    ids = dict(zip(human.symbols, human.gene_ids, strict=True))
    symbols = [str(g).upper() for g in pbmc_counts().var_names]
    return Vocabulary.from_genes(symbols, [ids.get(s) for s in symbols])


def _series_dir(root: Path, accession: str) -> Path:
    from atlasflow.acquire.fetch import geo_suppl_path

    return root / geo_suppl_path(accession)


def _trio(adata: Any, folder: Path, prefix: str, *, features: str = "features") -> list[Path]:
    import scipy.io
    import scipy.sparse as sp

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}_matrix.mtx.gz", folder / f"{prefix}_barcodes.tsv.gz",
             folder / f"{prefix}_{features}.tsv.gz"]
    with gzip.open(paths[0], "wb") as fh:
        scipy.io.mmwrite(fh, sp.csr_matrix(adata.X).T.tocoo().astype(np.int64), field="integer")
    with gzip.open(paths[1], "wt") as fh:
        fh.write("\n".join(map(str, adata.obs_names)) + "\n")
    with gzip.open(paths[2], "wt") as fh:
        fh.write("\n".join(f"GENE{i:05d}\t{g}\tGene Expression" for i, g in enumerate(adata.var_names)) + "\n")
    return paths


def _h5(adata: Any, folder: Path, name: str) -> Path:
    from atlasflow_testing.realdata import write_format

    path = write_format(adata, "10x_h5", folder, stem="tmp")
    return path.rename(folder / name)


def _table(frame: Any, path: Path, sep: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep=sep, compression="gzip" if path.name.endswith(".gz") else None)
    return path


def write_raw_tar(suppl: Path, accession: str, members: list[Path], *, filelist: bool = True) -> Path:
    """``<accession>_RAW.tar`` of flat ``members`` (moved in, as GEO stores them), and its ``filelist.txt``."""
    tar_path = suppl / f"{accession}_RAW.tar"
    with tarfile.open(tar_path, "w") as tar:  # GEO's RAW.tar is an uncompressed tar of (gzipped) files
        for m in members:
            tar.add(m, arcname=m.name)
    if filelist:
        rows = ["#Archive/File\tName\tTime\tSize\tType",
                f"Archive\t{tar_path.name}\t01/02/2024 10:00:00\t{tar_path.stat().st_size}\tTAR"]
        rows += [f"File\t{m.name}\t01/02/2024 10:00:00\t{m.stat().st_size}\t{m.name.rsplit('.', 2)[-2].upper()}"
                 for m in members]
        (suppl / "filelist.txt").write_text("\n".join(rows) + "\n")
    for m in members:
        m.unlink()
    return tar_path


def publish_soft(root: Path, accession: str, organisms: dict[str, str], *, no_files: tuple[str, ...] = ()) -> None:
    """GEO's sample records: a series' family SOFT (gzipped) or a sample's ``acc.cgi`` text; the
    samples in ``no_files`` have no supplementary file (``NONE``), as reads-only samples do."""
    text = "".join(f"^SAMPLE = {gsm}\n!Sample_title = {gsm}\n!Sample_organism_ch1 = {org}\n"
                   f"!Sample_taxid_ch1 = {'9606' if org == 'Homo sapiens' else '10090'}\n"
                   f"!Sample_supplementary_file_1 = {'NONE' if gsm in no_files else f'ftp://geo/{gsm}_counts.h5'}\n"
                   for gsm, org in organisms.items())
    if accession.startswith("GSE"):
        soft = _series_dir(root, accession).parent / "soft"
        soft.mkdir(parents=True, exist_ok=True)
        (soft / f"{accession}_family.soft.gz").write_bytes(gzip.compress(f"^SERIES = {accession}\n{text}".encode()))
    else:
        query = root / "query" / "acc.cgi"
        query.mkdir(parents=True, exist_ok=True)
        (query / f"{accession}.soft").write_text(text)


def build_corpus(root: Path) -> list[Layout]:
    """Publish every layout under ``root`` (the stand-in's ``geo`` folder); returns :data:`LAYOUTS`."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from atlasflow_testing.realdata import pbmc_counts

    pbmc = pbmc_counts()
    human = "Homo sapiens"

    def dense(part: Any) -> np.ndarray:
        return sp.csr_matrix(part.X).toarray().astype(np.int64)

    # 1: three GSM trios in RAW.tar, plus an image and a sample annotation table
    d = _series_dir(root, "GSE910001")
    members = []
    for gsm, (a, b) in zip(("GSM9100011", "GSM9100012", "GSM9100013"), ((0, 250), (250, 500), (500, 700)),
                           strict=True):
        members += _trio(pbmc[a:b], d, gsm)
    (d / "GSM9100011_tsne.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    members.append(d / "GSM9100011_tsne.png")
    members.append(_table(pd.DataFrame({"cell_type": pbmc.obs["bulk_labels"].to_numpy()[:250]},
                                       index=pbmc.obs_names[:250]), d / "GSM9100014_cell_annotations.tsv.gz", "\t"))
    write_raw_tar(d, "GSE910001", members)
    (d / "GSE910001_README.txt").write_text("Processed data for three PBMC samples; see the RAW.tar.\n")
    publish_soft(root, "GSE910001", {g: human for g in ("GSM9100011", "GSM9100012", "GSM9100013", "GSM9100014")})

    # 2: per-sample HDF5 in RAW.tar; GSM9100022 also ships Cell Ranger's unfiltered matrix
    d = _series_dir(root, "GSE910002")
    members = [_h5(pbmc[:300], d, "GSM9100021_filtered_feature_bc_matrix.h5"),
               _h5(pbmc[300:], d, "GSM9100022_filtered_feature_bc_matrix.h5"),
               _h5(pbmc[300:], d, "GSM9100022_raw_feature_bc_matrix.h5")]
    write_raw_tar(d, "GSE910002", members)
    publish_soft(root, "GSE910002", {"GSM9100021": human, "GSM9100022": human})

    # 3: one set of cells as a 10x HDF5 and as a trio, with a README
    d = _series_dir(root, "GSE910003")
    _h5(pbmc[:400], d, "GSE910003_filtered_feature_bc_matrix.h5")
    _trio(pbmc[:400], d, "GSE910003")
    (d / "README.txt").write_text("Counts from Cell Ranger 7; the .h5 and the mtx hold the same cells.\n")
    publish_soft(root, "GSE910003", {"GSM9100031": human})

    # 4: genes x cells counts beside cell metadata (text columns) and numeric per-cell QC
    d = _series_dir(root, "GSE910004")
    part = pbmc[:300]
    _table(pd.DataFrame(dense(part).T, index=part.var_names, columns=part.obs_names), d / "GSE910004_counts.csv.gz")
    _table(pd.DataFrame({"sample": "P1", "cell_type": part.obs["bulk_labels"].to_numpy()}, index=part.obs_names),
           d / "GSE910004_metadata.tsv.gz", "\t")
    qc = dense(part)
    _table(pd.DataFrame({"nGene": (qc > 0).sum(1), "nUMI": qc.sum(1), "percent.mito": 0.0}, index=part.obs_names),
           d / "GSE910004_qc.txt", "\t")
    publish_soft(root, "GSE910004", {"GSM9100041": human})

    # 5: cells x genes
    d = _series_dir(root, "GSE910005")
    part = pbmc[300:500]
    _table(pd.DataFrame(dense(part), index=part.obs_names, columns=part.var_names), d / "GSE910005_counts.tsv.gz",
           "\t")
    publish_soft(root, "GSE910005", {"GSM9100051": human})

    # 6: Ensembl ids with version suffixes (the genes that have one), no symbols
    d = _series_dir(root, "GSE910006")
    vocab = corpus_vocabulary()
    ids = dict(zip(vocab.symbols, vocab.gene_ids, strict=True))
    keep = [i for i, g in enumerate(pbmc.var_names) if ids.get(str(g).upper())]
    part = pbmc[:250, keep]
    labels = [f"{ids[str(g).upper()]}.{5 + i % 7}" for i, g in enumerate(part.var_names)]
    _table(pd.DataFrame(dense(part).T, index=labels, columns=part.obs_names), d / "GSE910006_counts.txt.gz", "\t")
    publish_soft(root, "GSE910006", {"GSM9100061": human})

    # 7: an h5ad with log-normalised X and the counts only in .raw
    d = _series_dir(root, "GSE910007")
    d.mkdir(parents=True)
    part = pbmc[400:].copy()
    counts = sp.csr_matrix(part.X)
    norm = sp.diags(1e4 / np.maximum(np.asarray(counts.sum(1)).ravel(), 1)) @ counts
    norm.data = np.log1p(norm.data)
    out = ad.AnnData(X=norm.astype(np.float32), obs=part.obs.copy())
    out.var_names = list(part.var_names)
    out.raw = ad.AnnData(X=counts, obs=part.obs.copy(), var=pd.DataFrame(index=list(part.var_names)))
    out.write_h5ad(d / "GSE910007_processed.h5ad")
    publish_soft(root, "GSE910007", {"GSM9100071": human})

    # 8: a mouse series (the genes are the PBMCs', so only GEO's records tell)
    d = _series_dir(root, "GSE910008")
    d.mkdir(parents=True)
    pbmc[:100].copy().write_h5ad(d / "GSE910008_counts.h5ad")
    publish_soft(root, "GSE910008", {"GSM9100081": "Mus musculus"})

    # 9: metadata only
    d = _series_dir(root, "GSE910009")
    (d / "README.txt").parent.mkdir(parents=True, exist_ok=True)
    (d / "README.txt").write_text("Counts are available on request.\n")
    _table(pd.DataFrame({"cluster": pbmc.obs["louvain"].to_numpy()[:100], "cell_type":
                         pbmc.obs["bulk_labels"].to_numpy()[:100]}, index=pbmc.obs_names[:100]),
           d / "GSE910009_annotations.csv.gz")
    publish_soft(root, "GSE910009", {"GSM9100091": human})

    # 10: a GSM row, its own folder
    _trio(pbmc[550:], _series_dir(root, "GSM9100101"), "GSM9100101")
    publish_soft(root, "GSM9100101", {"GSM9100101": human})

    # 11: RAW.tar without filelist.txt
    d = _series_dir(root, "GSE910011")
    members = _trio(pbmc[:200], d, "GSM9100111") + _trio(pbmc[200:400], d, "GSM9100112")
    (d / "GSM9100111_umap.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    write_raw_tar(d, "GSE910011", [*members, d / "GSM9100111_umap.png"], filelist=False)
    publish_soft(root, "GSE910011", {"GSM9100111": human, "GSM9100112": human})

    # 12: per-sample h5ad files in the series folder, one sample mouse per GEO's records
    d = _series_dir(root, "GSE910012")
    d.mkdir(parents=True)
    pbmc[:120].copy().write_h5ad(d / "GSM9100121_counts.h5ad")
    pbmc[120:220].copy().write_h5ad(d / "GSM9100122_counts.h5ad")
    publish_soft(root, "GSE910012", {"GSM9100121": human, "GSM9100122": "Mus musculus"})
    return list(LAYOUTS)


def manifest_rows(layouts: list[Layout]) -> list[dict[str, str]]:
    """Manifest rows (seed-style: no species, no format, no sizes) for ``layouts``."""
    return [{"dataset_id": lay.accession, "download_url": lay.accession, "type": "geo", "disease_status": "control",
             "tissue_type": "blood"} for lay in layouts]



def write_corpus_config(root: Path, url: str, layouts: list[Layout], *, budget_mb: float = 200.0,
                        batch_size: int = 20) -> Path:
    """``root/manifest.csv`` (seed-style GEO rows), ``root/vocab.tsv`` and ``root/atlasflow.yaml`` for
    the corpus served at ``url`` (its ``geo`` folder); returns the config file."""
    import csv

    root.mkdir(parents=True, exist_ok=True)
    rows = manifest_rows(layouts)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "vocab.tsv").write_text(corpus_vocabulary().to_tsv(comment="pbmc68k genes with their Ensembl ids"))
    gb = budget_mb / 1000
    config = root / "atlasflow.yaml"
    config.write_text(f"""# the GEO corpus (atlasflow_testing.geo_corpus): real cells in GEO's real layouts
storage:
  base_dir: {root / 'base'}
  max_storage_gb: {gb}
  data_gb: {gb * 0.6}
  models_gb: {gb * 0.3}
  cache_gb: {gb * 0.05}
  outputs_gb: {gb * 0.05}
  min_free_gb: 1
  checkpoint_gb: 0.01
  unknown_size_gb: {gb * 0.02}
  admission_poke_s: 2
manifest:
  path: {root / 'manifest.csv'}
plan:
  batch_size: {batch_size}
  schedule: null
download:
  geo_base_url: {url}/geo
  geo_query_url: {url}/geo/query/acc.cgi
  retries: 1
  backoff_s: 0.2
qc:
  min_genes: 10
genes:
  vocab_path: {root / 'vocab.tsv'}
integration:
  enabled: false
training:
  epochs: 1
  val_fraction: 0.34
  replay_cells: 200
retrain:
  schedule: null
""")
    return config
