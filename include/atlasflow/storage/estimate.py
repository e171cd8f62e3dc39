"""How many bytes a batch will need before it is admitted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from atlasflow.core.config import GB, QuantConfig
from atlasflow.intake.manifest import Dataset
from atlasflow.model.sizing import PROCESSED_BYTES_PER_CELL, ModelArtifacts
from atlasflow.storage.ledger import Ledger

__all__ = ["batch_footprint"]


def batch_footprint(
    datasets: Sequence[Dataset],
    ledger: Ledger,
    *,
    content_lengths: Mapping[str, int] | None = None,
    size_sources: Mapping[str, str] | None = None,
    quant: QuantConfig | None = None,
    model: ModelArtifacts | None = None,
    trains: bool = True,
) -> dict[str, Any]:
    """Estimate a batch's peak footprint.

    Each dataset needs its download (``expected_bytes`` from the manifest, else ``content_lengths``:
    the size asked of its source, :func:`atlasflow.acquire.sizes.known_sizes`, labelled by
    ``size_sources``; else ``storage.unknown_size_gb``, labelled ``default``) plus its processed output (download ×
    the format's expansion factor, measured from earlier datasets when any). The batch adds one
    model's artefacts: ``model`` (:func:`atlasflow.model.sizing.model_artifacts`: the checkpoint
    twice + the integration output, its latent sized for the batch's cells estimated from the
    processed bytes), else ``storage.checkpoint_gb`` (0 when unset); none when ``trains`` is false (a
    trial, ``atlasflow dataset run``, never trains or integrates). Raw files are deleted once
    processed, so this over-estimates a little: the budget is a hard limit, so err high.

    A reads dataset (FASTQ) also needs kb count's working space while it runs (``quant.work_factor``
    × the reads + ``quant.work_fixed_gb``), and a batch with reads counts the index once (its size
    on disk, else ``quant.index_gb``): its samples share it.

    Returns
    -------
    ``{"bytes": total, "datasets": [{"dataset_id", "raw", "processed", "factor", "size_source"}]}``
    """
    config = ledger.config
    lengths = content_lengths or {}
    q = quant or QuantConfig()
    rows = []
    total = 0
    for d in datasets:
        if d.expected_bytes is not None:
            raw, source = d.expected_bytes, "manifest"
        elif lengths.get(d.dataset_id):
            raw, source = int(lengths[d.dataset_id]), (size_sources or {}).get(d.dataset_id, "content-length")
        else:
            raw, source = int(config.unknown_size_gb * GB), "default"
        factor = ledger.expansion_factor("fastq" if d.is_reads else d.format)
        processed = int(raw * factor)
        row = {"dataset_id": d.dataset_id, "raw": raw, "processed": processed, "factor": round(factor, 4),
               "size_source": source}
        if d.is_reads:
            row["quant_work"] = int(raw * q.work_factor + q.work_fixed_gb * GB)
            total += row["quant_work"]
        total += raw + processed
        rows.append(row)
    cells = sum(r["processed"] for r in rows) // PROCESSED_BYTES_PER_CELL
    if not trains:
        artifacts: dict[str, Any] = {"bytes": 0, "source": "none: the batch never trains"}
    elif model is not None:
        artifacts = model.to_dict(cells)
    else:
        artifacts = {"bytes": int((config.checkpoint_gb or 0) * GB), "source": "storage.checkpoint_gb"}
    total += artifacts["bytes"]
    out: dict[str, Any] = {"bytes": total, "datasets": rows, "model_artifacts": artifacts}
    if any("quant_work" in r for r in rows):
        index = Path(q.index) if q.index else None
        out["index"] = index.stat().st_size if index is not None and index.is_file() else int(q.index_gb * GB)
        out["bytes"] += out["index"]
    return out
