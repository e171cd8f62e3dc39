"""The records that say what is done, under ``<base_dir>/state/`` (cleanup never deletes them).

One home for the "done" rules every step and both DAGs read: a batch is trained when its
``state/trained/<batch>.json`` exists (or, before that record existed, its checkpoint's
``result.json``); a dataset is quarantined when ``state/quarantine/<dataset>.json`` exists.
``docs/contracts.md`` lists every file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atlasflow.core.config import AtlasConfig
from atlasflow.core.fsutil import write_json_atomic
from atlasflow.core.layout import StorageLayout

__all__ = ["batch_trained", "quarantine_record", "record_quarantine", "record_trained"]


def _checkpoints(config: AtlasConfig) -> Path:
    return StorageLayout.of(config.storage.base_dir).checkpoints


def batch_trained(config: AtlasConfig, batch_id: str) -> dict[str, Any] | None:
    """The training result of a batch trained by any earlier run, or None.

    The record under ``state/trained/`` outlives the checkpoint folder (cleanup prunes old
    checkpoints), so a cleared or re-triggered run knows the batch is done without its data.
    """
    for path in (config.state_dir / "trained" / f"{batch_id}.json",
                 _checkpoints(config) / batch_id / "result.json"):
        if path.exists():
            return json.loads(path.read_text())
    return None


def record_trained(config: AtlasConfig, batch_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """Remember that ``batch_id`` is trained (lineage included); returns ``result`` for XCom."""
    write_json_atomic(config.state_dir / "trained" / f"{batch_id}.json", result)
    return result


def record_quarantine(config: AtlasConfig, batch_id: str, dataset_id: str, stage: str, reason: str) -> dict[str, Any]:
    """Write (and return) the record that ``dataset_id`` is quarantined, with the stage and the reason."""
    info = {"dataset_id": dataset_id, "batch_id": batch_id, "status": "quarantined", "stage": stage, "reason": reason}
    write_json_atomic(config.state_dir / "quarantine" / f"{dataset_id}.json", info)
    return info


def quarantine_record(config: AtlasConfig, dataset_id: str) -> dict[str, Any] | None:
    """The quarantine record of ``dataset_id``, or None."""
    path = config.state_dir / "quarantine" / f"{dataset_id}.json"
    return json.loads(path.read_text()) if path.exists() else None
