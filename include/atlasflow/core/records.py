"""The records that say what is done, under ``<base_dir>/state/`` (cleanup never deletes them).

One home for the state paths and the "done" rules every step and both DAGs read: a batch is
trained when its ``state/trained/<batch>.json`` exists (or, before that record existed, its
checkpoint's ``result.json``); a dataset is quarantined when ``state/quarantine/<dataset>.json``
exists. The path functions take the state folder (``AtlasConfig.state_dir``) so that
:mod:`atlasflow.core.runlog`, which is handed only that folder, joins no path of its own.
``docs/contracts.md`` lists every file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypedDict

from atlasflow.core.config import AtlasConfig
from atlasflow.core.fsutil import write_json_atomic
from atlasflow.core.layout import StorageLayout
from atlasflow.core.redact import redact_text

__all__ = [
    "BATCH_SCOPE",
    "QuarantineRecord",
    "batch_spec_path",
    "batch_trained",
    "jobs_dir",
    "jobs_path",
    "jobs_root",
    "pinned_vocab_path",
    "quarantine_path",
    "quarantine_record",
    "record_quarantine",
    "record_trained",
    "rejected_path",
    "retrain_decisions_path",
    "retrain_triggered_path",
    "sizes_path",
    "stage_path",
    "stages_dir",
    "tombstone_path",
    "trained_path",
]

BATCH_SCOPE = "_batch"  # file name of a stage record that belongs to the whole batch, not one dataset


class QuarantineRecord(TypedDict):
    """``state/quarantine/<dataset>.json``; also the step result (XCom) of a quarantined dataset."""

    dataset_id: str
    batch_id: str
    status: Literal["quarantined"]
    stage: str
    reason: str


def trained_path(state_dir: Path, batch_id: str) -> Path:
    """``state/trained/<batch>.json``: the training result of a finished batch."""
    return state_dir / "trained" / f"{batch_id}.json"


def quarantine_path(state_dir: Path, dataset_id: str) -> Path:
    """``state/quarantine/<dataset>.json``: why a dataset left its batch."""
    return state_dir / "quarantine" / f"{dataset_id}.json"


def tombstone_path(state_dir: Path, dataset_id: str) -> Path:
    """``state/tombstones/<dataset>.json``: a processed dataset's checksums and counts, kept after its files go."""
    return state_dir / "tombstones" / f"{dataset_id}.json"


def batch_spec_path(state_dir: Path, batch_id: str) -> Path:
    """``state/batches/<batch>.json``: the batch's manifest rows, frozen when the batch first ran."""
    return state_dir / "batches" / f"{batch_id}.json"


def sizes_path(state_dir: Path) -> Path:
    """``state/sizes.json``: download sizes asked of the sources before admission (:mod:`atlasflow.acquire.sizes`)."""
    return state_dir / "sizes.json"


def pinned_vocab_path(state_dir: Path) -> Path:
    """``state/vocab.json``: the gene vocabulary pinned by this base_dir's first run."""
    return state_dir / "vocab.json"


def jobs_root(state_dir: Path) -> Path:
    """``state/jobs/``: one folder per batch of job files."""
    return state_dir / "jobs"


def jobs_dir(state_dir: Path, batch_id: str) -> Path:
    """``state/jobs/<batch>/``: the batch's job scripts, logs, job configs and job list."""
    return jobs_root(state_dir) / batch_id


def jobs_path(state_dir: Path, batch_id: str) -> Path:
    """``state/jobs/<batch>/jobs.json``: the batch's training jobs (:func:`atlasflow.core.runlog.record_job`)."""
    return jobs_dir(state_dir, batch_id) / "jobs.json"


def stages_dir(state_dir: Path) -> Path:
    """``state/stages/``: one folder per batch of stage records."""
    return state_dir / "stages"


def stage_path(state_dir: Path, stage: str, batch_id: str, dataset_id: str | None = None) -> Path:
    """``state/stages/<batch>/<stage>/<dataset_id or _batch>.json``: one stage record."""
    return stages_dir(state_dir) / batch_id / stage / f"{dataset_id or BATCH_SCOPE}.json"


def _retrain_dir(state_dir: Path) -> Path:
    return state_dir / "retrain"


def rejected_path(state_dir: Path) -> Path:
    """``state/retrain/rejected.json``: checkpoints atlas_retrain did not promote (never built upon)."""
    return _retrain_dir(state_dir) / "rejected.json"


def retrain_triggered_path(state_dir: Path) -> Path:
    """``state/retrain/triggered.json``: what atlas_retrain last triggered an ingest run for."""
    return _retrain_dir(state_dir) / "triggered.json"


def retrain_decisions_path(state_dir: Path) -> Path:
    """``state/retrain/decisions.jsonl``: every promote-or-keep decision, appended."""
    return _retrain_dir(state_dir) / "decisions.jsonl"


def _checkpoints(config: AtlasConfig) -> Path:
    return StorageLayout.of(config.storage.base_dir).checkpoints


def batch_trained(config: AtlasConfig, batch_id: str) -> dict[str, Any] | None:
    """The training result of a batch trained by any earlier run, or None.

    The record under ``state/trained/`` outlives the checkpoint folder (cleanup prunes old
    checkpoints), so a cleared or re-triggered run knows the batch is done without its data.
    """
    for path in (trained_path(config.state_dir, batch_id), _checkpoints(config) / batch_id / "result.json"):
        if path.exists():
            return json.loads(path.read_text())
    return None


def record_trained(config: AtlasConfig, batch_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """Remember that ``batch_id`` is trained (lineage included); returns ``result`` for XCom."""
    write_json_atomic(trained_path(config.state_dir, batch_id), result)
    return result


def record_quarantine(config: AtlasConfig, batch_id: str, dataset_id: str, stage: str, reason: str) -> QuarantineRecord:
    """Write (and return) the record that ``dataset_id`` is quarantined, with the stage and the reason."""
    # a reason may quote a URL: its query string (a presigned link's token) never reaches the record
    info: QuarantineRecord = {"dataset_id": dataset_id, "batch_id": batch_id, "status": "quarantined", "stage": stage,
                              "reason": redact_text(reason)}
    write_json_atomic(quarantine_path(config.state_dir, dataset_id), info)
    return info


def quarantine_record(config: AtlasConfig, dataset_id: str) -> dict[str, Any] | None:
    """The quarantine record of ``dataset_id``, or None."""
    path = quarantine_path(config.state_dir, dataset_id)
    return json.loads(path.read_text()) if path.exists() else None
