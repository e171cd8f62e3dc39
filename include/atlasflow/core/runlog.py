"""When each step ran and how it ended, and which training jobs ran: the run report's raw material.

Every pipeline step writes one small JSON record per (stage, batch, dataset) under
``state/stages/<batch_id>/<stage>/<dataset_id or _batch>.json`` (temp file + rename), so a
cleared or retried task overwrites its own record and nothing grows without bound. A re-run that
finds the work already done (``skipped`` in its result) keeps the record of the run that did the
work: the report should show how long processing took, not how long it took to notice it was done.
Training jobs (local child processes or SLURM jobs) are appended to ``state/jobs/<batch_id>/jobs.json``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from atlasflow.core.fsutil import write_json_atomic
from atlasflow.core.records import BATCH_SCOPE, jobs_path, jobs_root, stages_dir
from atlasflow.core.records import stage_path as _stage_path
from atlasflow.core.redact import redact_text

__all__ = ["BATCH_SCOPE", "RecordAlso", "StageStatus", "read_jobs", "read_stages", "record_job", "record_stage",
           "stage", "stage_ended", "stage_path", "stage_started"]

log = logging.getLogger(__name__)

# result keys copied into a stage record (small values only; the record is not a second XCom).
# "integration" is the integrate step's ~1 KB summary with its scIB scores: the report reads them
# here because cleanup prunes the integration folders that hold result.json
_KEEP = ("bytes", "files", "cells_before", "cells_after", "genes_after", "format", "raw_bytes", "processed_bytes",
         "reason", "skipped", "admitted", "checkpoint_dir", "global_step", "train_loss", "val_loss", "trained",
         "released", "integration", "skipped_files", "size_check", "redirects")


class StageStatus(StrEnum):
    """A stage record's ``status``, as written to disk (the run report reads these strings)."""

    RUNNING = "running"
    OK = "ok"
    SKIPPED = "skipped"  # the work was found done; a finished record of the run that did it is kept
    WAITING = "waiting"  # an admission that does not fit yet: the record spans the whole wait
    QUARANTINED = "quarantined"
    FAILED = "failed"


def stage_path(state_dir: Path, stage: str, batch_id: str, dataset_id: str | None = None) -> Path:
    """The record's deterministic path (:func:`atlasflow.core.records.stage_path`)."""
    return _stage_path(state_dir, stage, batch_id, dataset_id)


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
    waiting = previous.get("status") == StageStatus.WAITING
    record = {
        "stage": stage, "batch_id": batch_id, "dataset_id": dataset_id, "status": StageStatus.RUNNING,
        "started": previous["started"] if waiting else now, "ended": None, "seconds": None,
        "host": socket.gethostname(), "pid": os.getpid(), "attempts": int(previous.get("attempts", 0)) + 1,
    }
    if previous.get("status") == StageStatus.OK:
        # keep the finished record until we know this attempt does real work (it may just skip)
        return {**record, "_previous": previous}
    write_json_atomic(path, record)
    return record


def stage_ended(state_dir: Path, record: dict[str, Any], *, status: StageStatus,
                result: Mapping[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
    """Finish a stage record with ``status`` and a few result fields."""
    status = StageStatus(status)
    previous = record.pop("_previous", None)
    result = result or {}
    if previous is not None and (status is StageStatus.SKIPPED or result.get("skipped")):
        return previous  # the work was done before: its record stays the true one
    now = time.time()
    record = {**record, "status": status, "ended": None if status is StageStatus.WAITING else now}
    record["seconds"] = None if record["ended"] is None else round(record["ended"] - record["started"], 3)
    record.update({k: result[k] for k in _KEEP if result.get(k) is not None})
    if error:
        record["error"] = redact_text(error[-2000:])  # a URL's query string (a token) never reaches the report
    write_json_atomic(stage_path(state_dir, record["stage"], record["batch_id"], record["dataset_id"]), record)
    return record


def _status_of(result: Mapping[str, Any]) -> StageStatus:
    """The record status a step result implies: its ``skipped``, ``already_trained``, ``admitted`` and ``status`` keys."""
    if result.get("skipped") or result.get("already_trained"):
        return StageStatus.SKIPPED
    if result.get("admitted") is False:
        return StageStatus.WAITING
    return StageStatus(result.get("status") or StageStatus.OK)


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
        stage_ended(state_dir, record, status=StageStatus.FAILED, result=out, error=f"{type(exc).__name__}: {exc}")
        raise
    stage_ended(state_dir, record, status=_status_of(out), result=out)


P = ParamSpec("P")
R = TypeVar("R", bound=Mapping[str, Any])


class _HasStateDir(Protocol):
    @property
    def state_dir(self) -> Path: ...


@dataclass(frozen=True)
class RecordAlso(Generic[R]):
    """A step's result plus fields only its stage record sees.

    Return this from a :func:`stage` function when the record must say more than XCom: a batch
    trained before returns its recorded result unchanged, while its record notes ``skipped``.
    """

    result: R
    record: Mapping[str, Any] = field(default_factory=dict)


def _default_dataset_id(args: Mapping[str, Any]) -> str | None:
    return args.get("dataset_id")


def stage(name: str, *, dataset_id: Callable[[Mapping[str, Any]], str | None] = _default_dataset_id,
          ) -> Callable[[Callable[P, R | RecordAlso[R]]], Callable[P, R]]:
    """Record the decorated step as stage ``name``: its start, its end, its status and a few result fields.

    The step's own arguments name the record: ``config`` (its ``state_dir``), ``batch_id`` and,
    for a per-dataset stage, ``dataset_id`` (or what the ``dataset_id`` callable returns, given
    the bound arguments by name). The returned mapping decides the status as
    :func:`record_stage` does (``skipped``, ``already_trained``, ``admitted``, ``status``) and is
    returned unchanged; a :class:`RecordAlso` is unwrapped, its ``record`` fields going to the
    record only. An exception is recorded as ``failed`` with its message and re-raised.

    Parameters
    ----------
    name
        The stage, as the run report knows it (``admit``, ``download``, ``process``, ...).
    dataset_id
        Picks the dataset from the bound arguments; by default the ``dataset_id`` argument, if any.
    """

    def decorate(fn: Callable[P, R | RecordAlso[R]]) -> Callable[P, R]:
        signature = inspect.signature(fn)
        missing = {"config", "batch_id"} - set(signature.parameters)
        if missing:  # caught at import time, not at the first task run
            raise TypeError(f"@stage({name!r}) needs arguments {sorted(missing)} on {fn.__qualname__}")

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            config: _HasStateDir = bound.arguments["config"]
            with record_stage(config.state_dir, name, bound.arguments["batch_id"],
                              dataset_id(bound.arguments)) as out:
                returned = fn(*args, **kwargs)
                if isinstance(returned, RecordAlso):
                    out.update({**returned.result, **returned.record})
                    return returned.result
                out.update(returned)
                return returned

        return wrapper

    return decorate


def read_stages(state_dir: Path) -> list[dict[str, Any]]:
    """Every stage record, sorted by start time."""
    records = [r for p in sorted(stages_dir(state_dir).glob("*/*/*.json")) if (r := _read(p)) is not None]
    return sorted(records, key=lambda r: (r.get("started") or 0, r["stage"], r.get("dataset_id") or ""))


def record_job(state_dir: Path, batch_id: str, job: dict[str, Any]) -> Path:
    """Append one training job (``job_id``, ``state``, ``backend``, ...) to the batch's job list.

    Only the batch's train task writes this file, one attempt at a time, so read-modify-write is safe.
    """
    path = jobs_path(state_dir, batch_id)
    jobs = (_read(path) or {}).get("jobs", [])
    entry = {"batch_id": batch_id, "recorded": time.time(), **job}
    # the same job reported twice (a retried callback) is replaced, not listed twice
    jobs = [j for j in jobs if not (j.get("job_id") == entry.get("job_id") and j.get("backend") == entry.get("backend"))]
    return write_json_atomic(path, {"batch_id": batch_id, "jobs": [*jobs, entry]})


def read_jobs(state_dir: Path) -> list[dict[str, Any]]:
    """Every recorded training job, oldest first."""
    jobs = [j for p in sorted(jobs_root(state_dir).glob("*/jobs.json")) for j in (_read(p) or {}).get("jobs", [])]
    return sorted(jobs, key=lambda j: j.get("recorded") or 0)
