"""When each step ran and how it ended, and which training jobs ran: the run report's raw material.

Every pipeline step writes one small JSON record per (stage, batch, dataset) under
``state/stages/<batch_id>/<stage>/<dataset_id or _batch>.json`` (temp file + rename), so a
cleared or retried task overwrites its own record and nothing grows without bound. A re-run that
finds the work already done (``skipped`` in its result) keeps the record of the run that did the
work: the report should show how long processing took, not how long it took to notice it was done.
Training jobs (local child processes or SLURM jobs) are appended to ``state/jobs/<batch_id>/jobs.json``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atlasflow.core.fsutil import write_json_atomic

__all__ = ["BATCH_SCOPE", "read_jobs", "read_stages", "record_job", "record_stage", "stage_ended", "stage_path",
           "stage_started"]

log = logging.getLogger(__name__)

BATCH_SCOPE = "_batch"  # file name of a record that belongs to the whole batch, not one dataset
# result keys copied into a stage record (small values only; the record is not a second XCom).
# "integration" is the integrate step's ~1 KB summary with its scIB scores: the report reads them
# here because cleanup prunes the integration folders that hold result.json
_KEEP = ("bytes", "files", "cells_before", "cells_after", "genes_after", "format", "raw_bytes", "processed_bytes",
         "reason", "skipped", "admitted", "checkpoint_dir", "global_step", "train_loss", "val_loss", "trained",
         "released", "integration")


def stage_path(state_dir: Path, stage: str, batch_id: str, dataset_id: str | None = None) -> Path:
    """The record's deterministic path."""
    return state_dir / "stages" / batch_id / stage / f"{dataset_id or BATCH_SCOPE}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or a record from a crashed writer that never renamed
        return None


def stage_started(state_dir: Path, stage: str, batch_id: str, dataset_id: str | None = None) -> dict[str, Any]:
    """Mark a stage as running; returns the record (to pass to :func:`stage_ended`).

    A stage already recorded as ``waiting`` (an admission that has not fit yet) keeps its first
    start time, so the record measures the whole wait, not the last poke.
    """
    path = stage_path(state_dir, stage, batch_id, dataset_id)
    previous = _read(path) or {}
    now = time.time()
    waiting = previous.get("status") == "waiting"
    record = {
        "stage": stage, "batch_id": batch_id, "dataset_id": dataset_id, "status": "running",
        "started": previous["started"] if waiting else now, "ended": None, "seconds": None,
        "host": socket.gethostname(), "pid": os.getpid(), "attempts": int(previous.get("attempts", 0)) + 1,
    }
    if previous.get("status") == "ok":
        # keep the finished record until we know this attempt does real work (it may just skip)
        return {**record, "_previous": previous}
    write_json_atomic(path, record)
    return record


def stage_ended(state_dir: Path, record: dict[str, Any], *, status: str,
                result: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
    """Finish a stage record with ``status`` (ok, quarantined, skipped, waiting, failed) and a few result fields."""
    previous = record.pop("_previous", None)
    result = result or {}
    if previous is not None and (status == "skipped" or result.get("skipped")):
        return previous  # the work was done before: its record stays the true one
    now = time.time()
    record = {**record, "status": status, "ended": None if status == "waiting" else now}
    record["seconds"] = None if record["ended"] is None else round(record["ended"] - record["started"], 3)
    record.update({k: result[k] for k in _KEEP if result.get(k) is not None})
    if error:
        record["error"] = error[-2000:]
    write_json_atomic(stage_path(state_dir, record["stage"], record["batch_id"], record["dataset_id"]), record)
    return record


def _status_of(result: dict[str, Any]) -> str:
    if result.get("skipped") or result.get("already_trained"):
        return "skipped"
    if result.get("admitted") is False:
        return "waiting"
    return str(result.get("status") or "ok")


@contextmanager
def record_stage(state_dir: Path, stage: str, batch_id: str, dataset_id: str | None = None) -> Iterator[dict[str, Any]]:
    """Record a step's start and end around its body.

    Yields a dict: the body puts its result there (``out.update(result)``); its ``status``,
    ``skipped`` and ``admitted`` keys decide the record's status. An exception is recorded as
    ``failed`` with its message and re-raised.
    """
    record = stage_started(state_dir, stage, batch_id, dataset_id)
    out: dict[str, Any] = {}
    try:
        yield out
    except BaseException as exc:
        stage_ended(state_dir, record, status="failed", result=out, error=f"{type(exc).__name__}: {exc}")
        raise
    stage_ended(state_dir, record, status=_status_of(out), result=out)


def read_stages(state_dir: Path) -> list[dict[str, Any]]:
    """Every stage record, sorted by start time."""
    records = [r for p in sorted((state_dir / "stages").glob("*/*/*.json")) if (r := _read(p)) is not None]
    return sorted(records, key=lambda r: (r.get("started") or 0, r["stage"], r.get("dataset_id") or ""))


def record_job(state_dir: Path, batch_id: str, job: dict[str, Any]) -> Path:
    """Append one training job (``job_id``, ``state``, ``backend``, ...) to the batch's job list.

    Only the batch's train task writes this file, one attempt at a time, so read-modify-write is safe.
    """
    path = state_dir / "jobs" / batch_id / "jobs.json"
    jobs = (_read(path) or {}).get("jobs", [])
    entry = {"batch_id": batch_id, "recorded": time.time(), **job}
    # the same job reported twice (a retried callback) is replaced, not listed twice
    jobs = [j for j in jobs if not (j.get("job_id") == entry.get("job_id") and j.get("backend") == entry.get("backend"))]
    return write_json_atomic(path, {"batch_id": batch_id, "jobs": [*jobs, entry]})


def read_jobs(state_dir: Path) -> list[dict[str, Any]]:
    """Every recorded training job, oldest first."""
    jobs = [j for p in sorted((state_dir / "jobs").glob("*/jobs.json")) for j in (_read(p) or {}).get("jobs", [])]
    return sorted(jobs, key=lambda j: j.get("recorded") or 0)
