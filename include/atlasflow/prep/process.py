"""One dataset, downloaded → processed: read any format, QC, harmonise genes, write the processed h5ad.

This is what the ingest DAG's ``process`` task calls. Bad input never raises anything but
:class:`~atlasflow.prep.qc.DatasetQuarantined`, whose reason names the file, so the batch goes on
with its other datasets.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from atlasflow.acquire.cellxgene import schema_dataset
from atlasflow.core.config import AtlasConfig
from atlasflow.intake.manifest import Dataset
from atlasflow.prep.genes import OrthologTable, Vocabulary, dataset_species, species_mapping_for
from atlasflow.prep.memory import apply_memory_strategy, recorded_memory_strategy
from atlasflow.prep.qc import DatasetQuarantined, run_qc
from atlasflow.readers.formats import CountSource, DecompressionCap, FormatError, open_counts
from atlasflow.readers.select import dataset_files, disk_bytes

__all__ = ["DatasetQuarantined", "process_dataset", "species_gate"]

log = logging.getLogger(__name__)


def process_dataset(
    raw_dir: Path,
    dataset: Dataset,
    *,
    config: AtlasConfig,
    out_path: Path,
    vocab: Vocabulary,
    cache_dir: Path,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Read ``raw_dir`` (one dataset's downloads), QC it and write ``out_path``.

    ``max_bytes`` (the dataset's disk reservation) bounds what an archive may extract to disk, and
    ``config.readers`` what a gzipped table may decompress to in memory: a bomb is quarantined with
    its figures.

    Returns
    -------
    A summary for XCom and the run report: cells and genes before/after, cells removed per rule,
    vocabulary coverage, the memory strategy, and bytes in and out.

    Raises
    ------
    DatasetQuarantined
        Unreadable or empty files, non-numeric tables, unsafe archives, a dataset that is not
        human (without a ``genes.species_mapping`` for its species), too little vocabulary
        coverage, or no cell passing QC.
    """
    if not raw_dir.is_dir():
        raise DatasetQuarantined(f"{dataset.dataset_id}: nothing was downloaded to {raw_dir}")
    dataset = schema_dataset(dataset, raw_dir)  # a CELLxGENE row: donor_id → batch, cell_type → labels, organism
    sources = []
    try:
        found = dataset_files(raw_dir)
        files = [spec.path for spec in found.sources]
        if not (dataset.species or "").strip() and found.organism:
            # no species in the manifest: GEO's records for the samples say it
            dataset = dataclasses.replace(dataset, species=found.organism)
        symbols = vocab.symbol_set() | set(vocab.synonyms)  # for telling genes from cells in tables
        cap = DecompressionCap.from_config(config.readers)
        for spec in found.sources:
            # a reads dataset arrives here as kb count's 10x folder, whatever its manifest format says
            fmt = dataset.format if len(files) == 1 and dataset.format and not dataset.is_reads else None
            src = open_counts(spec.path, fmt=fmt, cache=cache_dir / dataset.dataset_id, vocabulary=symbols,
                              max_bytes=max_bytes, cap=cap)
            src.sample = spec.sample
            sources.append(src)
        raw_bytes = sum(disk_bytes(p) for p in files)
        orthologs = species_gate(dataset, sources, config)
        meta = {"disease_status": dataset.disease_status, "tissue_type": dataset.tissue_type, "species": dataset.species}
        qc = apply_memory_strategy(config.qc, recorded_memory_strategy(config))
        result = run_qc(sources, out_path, dataset_id=dataset.dataset_id, vocab=vocab, config=qc,
                        obs_meta=meta, batch_key=dataset.batch_key, cell_type_key=dataset.cell_type_key,
                        orthologs=orthologs)
    except FormatError as exc:
        raise DatasetQuarantined(str(exc)) from exc
    finally:
        for s in sources:
            s.close()
    formats = sorted({s.format for s in sources})
    summary = {
        "dataset_id": dataset.dataset_id,
        "status": "ok",
        "path": str(out_path),
        "format": formats[0] if len(formats) == 1 else "+".join(formats),
        "raw_bytes": raw_bytes,
        "processed_bytes": out_path.stat().st_size,
        **result.to_dict(),
    }
    if result.non_integer:
        log.warning("%s: the matrix holds non-integer values: counts expected (recorded in the summary)",
                    dataset.dataset_id)
    return summary



def species_gate(dataset: Dataset, sources: list[CountSource], config: AtlasConfig) -> OrthologTable | None:
    """None for a human dataset; the ortholog table for one of a mapped species; else quarantine it.

    Raises
    ------
    DatasetQuarantined
        Naming the dataset, its files and the evidence (the manifest's species, or how many
        symbols look like mouse symbols).
    """
    species, evidence = dataset_species(dataset.species, [g for s in sources for g in s.genes],
                                        [i for s in sources for i in (s.gene_ids or [])])
    if species == "human":
        return None
    table, why_not = species_mapping_for(species, config.genes.species_mapping)
    if table is None:
        files = ", ".join(s.path.name for s in sources)
        raise DatasetQuarantined(f"{dataset.dataset_id} ({files}): not human: {evidence}; {why_not}")
    log.info("%s: %s genes mapped through %s", dataset.dataset_id, species, table.path)
    return table
