"""One manifest row through download → (quant) → process without Airflow: ``atlasflow dataset run``.

The DAG's own step functions (:mod:`atlasflow.steps.ingest`) do the work, under the same budget
rules: the row becomes a one-dataset batch, ``trial_<dataset_id>``, admitted by the same ledger
against the same budget (the reservation bound to this process, so a killed trial frees it at once),
downloaded with the same cap, quantified locally, processed with the same QC. Afterwards the trial
leaves nothing a pipeline run reads: its download and processed file are deleted (``keep`` keeps
the processed h5ad), its reservation released, its batch spec and stage records removed, and the
dataset's tombstone and quarantine record restored to what they were before (the DAG decides
those for itself). The ledger keeps the history (deletions, samples, expansion factors).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from atlasflow.core.config import AtlasConfig
from atlasflow.core.fsutil import write_json_atomic
from atlasflow.core.records import batch_spec_path, quarantine_path, stages_dir, tombstone_path
from atlasflow.intake.manifest import Dataset
from atlasflow.steps import ingest as P
from atlasflow.storage import BudgetExceededError, Cleaner, Ledger, StorageLayout

__all__ = ["TRIAL_PREFIX", "TrialBusy", "run_dataset", "trial_batch_id"]

log = logging.getLogger(__name__)
TRIAL_PREFIX = "trial_"


class TrialBusy(RuntimeError):
    """The dataset's download folder is in use (a pipeline run or another trial is fetching it)."""


def trial_batch_id(dataset_id: str) -> str:
    """The one-dataset batch a trial runs as (never ``batch_NNNN``: no plan, report or cleanup takes it for one)."""
    return f"{TRIAL_PREFIX}{dataset_id}"


def _snapshot(paths: list[Path]) -> dict[Path, bytes | None]:
    return {p: (p.read_bytes() if p.exists() else None) for p in paths}


def _restore(saved: dict[Path, bytes | None]) -> None:
    for path, data in saved.items():
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".restore")
            tmp.write_bytes(data)
            tmp.replace(path)


def run_dataset(config: AtlasConfig, dataset: Dataset, *, keep: bool = False, wait_s: float = 0.0) -> dict[str, Any]:
    """Run one row; returns the one-line summary ``atlasflow dataset run`` prints.

    ``status`` is ``processed`` or ``quarantined`` (with ``stage`` and ``reason``), or
    ``not_admitted`` when the budget has no room for it within ``wait_s`` seconds (or ever).

    Raises
    ------
    TrialBusy
        ``data/raw/<dataset_id>`` already exists: something else is fetching this dataset.
    """
    layout = StorageLayout.of(config.storage.base_dir).ensure()
    batch_id = trial_batch_id(dataset.dataset_id)
    raw = layout.raw_dir(dataset.dataset_id)
    if raw.exists() and any(raw.iterdir()):
        raise TrialBusy(f"{raw} exists: a pipeline run (or another trial) is fetching {dataset.dataset_id}; "
                        "try again when it is done")
    saved = _snapshot([tombstone_path(config.state_dir, dataset.dataset_id),
                       quarantine_path(config.state_dir, dataset.dataset_id)])
    spec = batch_spec_path(config.state_dir, batch_id)
    write_json_atomic(spec, {"batch_id": batch_id, "index": 0, "dataset_ids": [dataset.dataset_id],
                             "expected_bytes": dataset.expected_bytes, "datasets": [dataset.to_dict()], "removed": [],
                             "trial": True})
    t0 = time.monotonic()
    base: dict[str, Any] = {"dataset_id": dataset.dataset_id, "batch_id": batch_id}
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                admission = P.admit_batch(config, batch_id, owner="atlasflow dataset run", bind_pid=True,
                                          trains=False)
            except BudgetExceededError as exc:
                return {**base, "status": "not_admitted", "stage": "admit", "reason": str(exc)}
            if admission["admitted"] or time.monotonic() >= deadline:
                break
            time.sleep(min(config.storage.admission_poke_s, max(0.1, deadline - time.monotonic())))
        footprint = admission.get("footprint") or {}
        reserved = {"reserved_bytes": admission["bytes"],
                    "size_source": next((d.get("size_source") for d in footprint.get("datasets", [])), None)}
        if not admission["admitted"]:
            return {**base, "status": "not_admitted", "stage": "admit", "reason": admission["reason"], **reserved}
        fetched = P.download_dataset(config, batch_id, dataset.dataset_id, final_try=True)
        counts = P.quant_dataset_step(config, batch_id, fetched)
        result = P.process_dataset_step(config, batch_id, counts)
        out = {**base, **reserved, "download_bytes": fetched.get("bytes"), "size_check": fetched.get("size_check"),
               "seconds": round(time.monotonic() - t0, 2)}
        if "quant" in counts:
            out["quant"] = counts["quant"]  # type: ignore[typeddict-item]
        if result["status"] != P.StepStatus.OK:
            return {**out, "status": "quarantined", "stage": result.get("stage"), "reason": result.get("reason"),
                    "cells_before": None, "cells_after": None}
        return {**out, "status": "processed", "stage": "process", "reason": None,
                "cells_before": result.get("cells_before"), "cells_after": result.get("cells_after"),
                "genes_after": result.get("genes_after"), "format": result.get("format"),
                "processed_bytes": result.get("processed_bytes"), "path": result["path"] if keep else None}
    finally:
        ledger = Ledger(config.storage)
        cleaner = Cleaner(ledger)
        cleaner.delete_raw(dataset.dataset_id, batch_id=batch_id)
        shutil.rmtree(layout.cache / "quant" / dataset.dataset_id, ignore_errors=True)
        if not keep:
            cleaner.remove(layout.processed_dir(batch_id), "trial run (atlasflow dataset run) finished",
                           batch_id=batch_id, dataset_id=dataset.dataset_id)
        ledger.release(batch_id)
        spec.unlink(missing_ok=True)
        shutil.rmtree(stages_dir(config.state_dir) / batch_id, ignore_errors=True)
        _restore(saved)
