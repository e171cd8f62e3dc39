"""The ingest pipeline's steps, one function per DAG task, each idempotent and safe to re-run.

Each function takes the run's config and small values (ids, paths, small dicts) and returns a
small dict for XCom; files go to the deterministic paths of docs/contracts.md. A bad dataset is
*quarantined* (``status: "quarantined"`` plus a JSON file saying why) so its batch goes on.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from atlasflow.config import GB, AtlasConfig
from atlasflow.fsutil import write_json_atomic
from atlasflow.genes import Vocabulary
from atlasflow.manifest import Dataset
from atlasflow.plan import batch_id as make_batch_id
from atlasflow.plan import freeze_plan, load_plan
from atlasflow.storage import BudgetExceededError, Cleaner, Ledger, StorageLayout, batch_footprint

__all__ = [
    "admit_batch",
    "cleanup_batch",
    "download_dataset",
    "integrate_batch_step",
    "prepare_run",
    "process_dataset_step",
    "train_batch_step",
]

log = logging.getLogger(__name__)


def _layout(config: AtlasConfig) -> StorageLayout:
    return StorageLayout.of(config.storage.base_dir).ensure()


def _spec(config: AtlasConfig, batch_id: str) -> dict[str, Any]:
    path = config.state_dir / "batches" / f"{batch_id}.json"
    if not path.exists():
        from atlasflow.plan import write_batch_spec

        write_batch_spec(config, batch_id)
    return json.loads(path.read_text())


def _dataset(config: AtlasConfig, batch_id: str, dataset_id: str) -> Dataset:
    for row in _spec(config, batch_id)["datasets"]:
        if row["dataset_id"] == dataset_id:
            return Dataset.from_dict(row)
    raise KeyError(f"{dataset_id} is not in {batch_id}")


def _vocab(config: AtlasConfig) -> Vocabulary:
    pinned = config.state_dir / "vocab.json"
    if pinned.exists():
        return Vocabulary.load(pinned)
    return Vocabulary.load(config.genes.vocab_path)


def _quarantine(config: AtlasConfig, batch_id: str, dataset_id: str, stage: str, reason: str) -> dict[str, Any]:
    info = {"dataset_id": dataset_id, "batch_id": batch_id, "status": "quarantined", "stage": stage, "reason": reason}
    # under state/: cleanup never deletes it, so the run report can always say why
    write_json_atomic(config.state_dir / "quarantine" / f"{dataset_id}.json", info)
    log.warning("quarantined %s at %s: %s", dataset_id, stage, reason)
    return info


def prepare_run(config: AtlasConfig) -> dict[str, Any]:
    """Validate the manifest, seal the plan, pin the vocabulary for every later batch."""
    summary = freeze_plan(config)
    pinned = config.state_dir / "vocab.json"
    if not pinned.exists():
        Vocabulary.load(config.genes.vocab_path).save(pinned)
    summary["vocab_version"] = Vocabulary.load(pinned).version
    return summary


def admit_batch(config: AtlasConfig, batch_id: str, *, owner: str) -> dict[str, Any]:
    """Try to reserve the batch's footprint; batches are admitted in plan order.

    Raises :class:`~atlasflow.storage.BudgetExceededError` when the batch can never fit.
    """
    spec = _spec(config, batch_id)
    ledger = Ledger(config.storage)
    datasets = [Dataset.from_dict(d) for d in spec["datasets"]]
    footprint = batch_footprint(datasets, ledger)
    index = spec["index"]
    paths = [f"data/raw/{d.dataset_id}" for d in datasets] + [f"data/processed/{batch_id}",
                                                              f"models/checkpoints/{batch_id}",
                                                              f"models/integration/{batch_id}"]
    admission = ledger.try_admit(batch_id, footprint["bytes"], paths=paths, owner=owner,
                                 after=make_batch_id(index - 1) if index > 0 else None)
    return {**admission.to_dict(), "footprint": footprint}


def download_dataset(config: AtlasConfig, batch_id: str, dataset_id: str, *, final_try: bool) -> dict[str, Any]:
    """Fetch one dataset into ``data/raw/<id>``; permanent failures (and the last try's) quarantine it."""
    from atlasflow.fetch import FetchError, TransientFetchError, fetch_dataset

    dataset = _dataset(config, batch_id, dataset_id)
    layout = _layout(config)
    if (layout.tombstones / f"{dataset_id}.json").exists() and (layout.processed_dir(batch_id) / f"{dataset_id}.h5ad").exists():
        return {"dataset_id": dataset_id, "status": "ok", "skipped": "already processed"}
    cap = int((dataset.expected_bytes or config.storage.unknown_size_gb * GB) * 1.25) + 1_000_000
    Ledger(config.storage).heartbeat(batch_id)
    try:
        result = fetch_dataset(dataset, layout.raw_dir(dataset_id), config=config.download, max_bytes=cap)
    except TransientFetchError as exc:
        if not final_try:
            raise  # Airflow retries the task with exponential backoff
        return _quarantine(config, batch_id, dataset_id, "download", f"gave up after the last retry: {exc}")
    except FetchError as exc:
        return _quarantine(config, batch_id, dataset_id, "download", str(exc))
    return {"dataset_id": dataset_id, "status": "ok", "bytes": result.bytes, "files": len(result.files),
            "seconds": round(result.seconds, 2)}


def process_dataset_step(config: AtlasConfig, batch_id: str, fetched: dict[str, Any]) -> dict[str, Any]:
    """Read → QC → harmonise one downloaded dataset; raw files are deleted once it is processed."""
    from atlasflow.process import DatasetQuarantined, process_dataset
    from atlasflow.storage.cleanup import file_sha256

    dataset_id = fetched["dataset_id"]
    if fetched.get("status") != "ok":
        return fetched
    layout = _layout(config)
    out = layout.processed_dir(batch_id) / f"{dataset_id}.h5ad"
    cleaner = Cleaner(Ledger(config.storage))
    tomb = cleaner.tombstone(dataset_id)
    if tomb is not None and out.exists() and tomb.get("processed_sha256") == file_sha256(out):
        return {"dataset_id": dataset_id, "status": "ok", "path": str(out), "cells_after": tomb["cells_after"],
                "skipped": "already processed"}
    dataset = _dataset(config, batch_id, dataset_id)
    try:
        summary = process_dataset(layout.raw_dir(dataset_id), dataset, config=config, out_path=out,
                                  vocab=_vocab(config), cache_dir=layout.cache)
    except DatasetQuarantined as exc:
        cleaner.delete_raw(dataset_id, batch_id=batch_id)
        return _quarantine(config, batch_id, dataset_id, "process", exc.reason)
    fetch_info = layout.raw_dir(dataset_id) / "fetch.json"
    checksums = json.loads(fetch_info.read_text())["files"] if fetch_info.exists() else []
    Ledger(config.storage).record_expansion(dataset_id, summary["format"], summary["raw_bytes"], summary["processed_bytes"])
    cleaner.write_tombstone(dataset_id, {
        "batch_id": batch_id, "downloads": [{"name": f["name"], "sha256": f["sha256"], "bytes": f["bytes"]} for f in checksums],
        "processed_sha256": file_sha256(out), "cells_before": summary["cells_before"], "cells_after": summary["cells_after"],
        "genes_after": summary["genes_after"], "coverage": summary["coverage"], "format": summary["format"],
    })
    cleaner.delete_raw(dataset_id, batch_id=batch_id)
    keep = ("dataset_id", "status", "path", "format", "raw_bytes", "processed_bytes", "cells_before", "cells_after",
            "genes_after", "removed", "coverage", "strategy", "non_integer", "seconds")
    return {k: summary[k] for k in keep}


def _previous(root: Path, batch_id: str) -> Path | None:
    """The newest finished folder under ``root`` from a batch before ``batch_id``."""
    done = sorted(p for p in root.glob("batch_*") if p.name < batch_id and (p / "result.json").exists())
    return done[-1] if done else None


def integrate_batch_step(config: AtlasConfig, batch_id: str, processed: list[dict[str, Any]]) -> dict[str, Any]:
    """Integrate the batch's usable datasets (scVI, or scArches onto the previous batch's model)."""
    ok = [p["dataset_id"] for p in processed if p and p.get("status") == "ok"]
    quarantined = {p["dataset_id"]: p.get("reason") for p in processed if p and p.get("status") != "ok"}
    base = {"batch_id": batch_id, "datasets": ok, "quarantined": quarantined}
    if not ok:
        return {**base, "status": "skipped",
                "reason": f"no usable dataset in {batch_id}: " + "; ".join(f"{k}: {v}" for k, v in quarantined.items())}
    if not config.integration.enabled:
        return {**base, "status": "ok", "integration": None}
    from atlasflow.integrate import integrate_batch

    layout = _layout(config)
    result = integrate_batch(layout.processed_dir(batch_id), layout.integration / batch_id, config=config.integration,
                             previous=_previous(layout.integration, batch_id))
    return {**base, "status": "ok", "integration": {k: result[k] for k in result if k != "datasets"}}


def train_batch_step(config: AtlasConfig, batch_id: str, *, previous_checkpoint: str | None) -> dict[str, Any]:
    """Run ``atlasflow train`` for the batch as a subprocess (the local backend).

    The same command line is what a SLURM job runs; the config it receives is this run's
    effective config, written next to the checkpoint.
    """
    layout = _layout(config)
    out = layout.checkpoints / batch_id
    previous = Path(previous_checkpoint) if previous_checkpoint else _previous(layout.checkpoints, batch_id)
    config_file = write_json_atomic(layout.checkpoints / f"{batch_id}.config.json", config.to_dict())
    cmd = [sys.executable, "-m", "atlasflow.cli", "train", "--config", str(config_file),
           "--batch-dir", str(layout.processed_dir(batch_id)), "--out", str(out),
           "--vocab", str(config.state_dir / "vocab.json")]
    if previous is not None:
        cmd += ["--resume-from", str(previous)]
    Ledger(config.storage).heartbeat(batch_id)
    log.info("running %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=config.training.timeout_s)
    if done.stderr:
        log.info("training log (tail):\n%s", done.stderr[-4000:])
    if done.returncode != 0:
        raise RuntimeError(f"atlasflow train exited {done.returncode} for {batch_id}: {done.stderr.strip()[-1500:]}")
    return json.loads((out / "result.json").read_text())


def cleanup_batch(config: AtlasConfig, batch_id: str) -> dict[str, Any]:
    """The cleanup policy for a finished (or failed) batch; releases its reservation."""
    spec = _spec(config, batch_id)
    ids = [d["dataset_id"] for d in spec["datasets"]]
    checkpoint_done = (_layout(config).checkpoints / batch_id / "result.json").exists()
    cleaner = Cleaner(Ledger(config.storage))
    if not checkpoint_done:
        # the batch did not train: keep processed files for a retry, free only raw data and cache
        freed = {"raw": sum(cleaner.delete_raw(d, batch_id=batch_id) for d in ids), "cache": cleaner.clear_cache()}
        released = Ledger(config.storage).release(batch_id)
        return {"batch_id": batch_id, "trained": False, "freed_bytes": freed, "released": released}
    return {**cleaner.finish_batch(batch_id, ids), "trained": True}


def load_batch_ids(config: AtlasConfig) -> list[str]:
    plan = load_plan(config.plan_path)
    return [b.batch_id for b in plan.batches] if plan else []


__all__ += ["BudgetExceededError", "load_batch_ids"]
