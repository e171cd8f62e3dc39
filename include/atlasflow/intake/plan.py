"""Grouping manifest datasets into stable, numbered batches.

Batch ids (``batch_0000``, ``batch_0001``, …) name Airflow task groups, folders and checkpoints,
and resuming a run depends on them meaning the same thing tomorrow. So a plan, once saved, is
*sealed*: re-planning against an edited manifest keeps every saved batch exactly as it was,
appends batches for new rows, and reports (never silently applies) rows that were removed from
or edited inside a saved batch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from atlasflow.core.config import AtlasConfig
from atlasflow.core.fsutil import write_json_atomic
from atlasflow.intake.manifest import FINGERPRINT_FIELDS, Dataset, Manifest, holds_reads, read_manifest

__all__ = [
    "Batch",
    "BatchPlan",
    "PlanChange",
    "batch_id",
    "current_plan",
    "freeze_plan",
    "load_plan",
    "make_plan",
    "save_plan",
    "write_batch_spec",
]

log = logging.getLogger(__name__)

PLAN_VERSION = 1


def batch_id(index: int) -> str:
    return f"batch_{index:04d}"


@dataclass(frozen=True)
class Batch:
    """One batch: its stable id, its datasets in manifest order, and their expected bytes."""

    index: int
    dataset_ids: tuple[str, ...]
    expected_bytes: int | None = None  # None when any dataset's size is unknown
    sealed: bool = False  # True once the batch comes from a saved plan

    @property
    def batch_id(self) -> str:
        return batch_id(self.index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "index": self.index,
            "dataset_ids": list(self.dataset_ids),
            "expected_bytes": self.expected_bytes,
        }


@dataclass(frozen=True)
class PlanChange:
    """A difference between a saved batch and the current manifest."""

    kind: Literal["removed", "edited"]
    dataset_id: str
    batch_id: str
    detail: str

    def __str__(self) -> str:
        return f"{self.batch_id}: dataset {self.dataset_id!r} {self.kind}: {self.detail}"


@dataclass(frozen=True)
class BatchPlan:
    """Batches in order, with the fingerprints that let a later plan detect edits."""

    batches: tuple[Batch, ...]
    batch_size: int
    max_batch_bytes: int | None
    fingerprints: Mapping[str, Mapping[str, str | None]] = field(default_factory=dict)
    changes: tuple[PlanChange, ...] = ()
    manifest_sha256: str | None = None

    def batch(self, batch_id_: str) -> Batch:
        for b in self.batches:
            if b.batch_id == batch_id_:
                return b
        raise KeyError(f"{batch_id_} is not in the plan (it has {len(self.batches)} batches)")

    def has_reads(self, batch_id_: str) -> bool:
        """Whether a batch holds raw reads (sra rows or FASTQ files) that need quantifying.

        Read from the plan's fingerprints, so a DAG file can decide at parse time whether the
        batch gets a ``quant`` step; a plan saved without fingerprints is assumed to have reads.
        """
        prints = [self.fingerprints.get(d) for d in self.batch(batch_id_).dataset_ids]
        return any(p is None or holds_reads(p.get("type"), p.get("format")) for p in prints)

    @property
    def new_batches(self) -> tuple[Batch, ...]:
        return tuple(b for b in self.batches if not b.sealed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "batch_size": self.batch_size,
            "max_batch_bytes": self.max_batch_bytes,
            "manifest_sha256": self.manifest_sha256,
            "batches": [b.to_dict() for b in self.batches],
            "fingerprints": {k: dict(v) for k, v in self.fingerprints.items()},
            "changes": [
                {"kind": c.kind, "dataset_id": c.dataset_id, "batch_id": c.batch_id, "detail": c.detail}
                for c in self.changes
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchPlan:
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"unsupported plan version {data.get('version')!r} (this atlasflow reads {PLAN_VERSION})")
        batches = []
        for i, b in enumerate(data["batches"]):
            if b["index"] != i or b["batch_id"] != batch_id(i):
                raise ValueError(f"plan batches are not numbered 0..n-1 (entry {i} is {b['batch_id']!r})")
            batches.append(Batch(i, tuple(b["dataset_ids"]), b.get("expected_bytes"), sealed=True))
        return cls(
            batches=tuple(batches),
            batch_size=int(data["batch_size"]),
            max_batch_bytes=data.get("max_batch_bytes"),
            fingerprints={k: dict(v) for k, v in data.get("fingerprints", {}).items()},
            changes=tuple(PlanChange(**c) for c in data.get("changes", [])),
            manifest_sha256=data.get("manifest_sha256"),
        )


def _identity(d: Dataset) -> dict[str, str | None]:
    return {k: (None if getattr(d, k) is None else str(getattr(d, k))) for k in FINGERPRINT_FIELDS}


def _sum_bytes(datasets: Sequence[Dataset]) -> int | None:
    sizes = [d.expected_bytes for d in datasets]
    return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


def make_plan(
    manifest: Manifest,
    *,
    batch_size: int = 3,
    max_batch_bytes: int | None = None,
    previous: BatchPlan | None = None,
) -> BatchPlan:
    """Plan batches for ``manifest``.

    Parameters
    ----------
    manifest
        The validated manifest; datasets are batched in sheet order.
    batch_size
        Most datasets per batch.
    max_batch_bytes
        Also start a new batch before the batch's summed ``expected_bytes`` would pass this.
        A dataset larger than the cap gets a batch of its own. Datasets of unknown size count 0.
    previous
        A saved plan. Its batches are kept verbatim (same ids, same datasets); only datasets it
        does not know are planned, into new batches after it. Removed or edited rows of saved
        batches are listed in :attr:`BatchPlan.changes`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_batch_bytes is not None and max_batch_bytes < 1:
        raise ValueError(f"max_batch_bytes must be positive, got {max_batch_bytes}")
    current = manifest.by_id()
    batches: list[Batch] = []
    fingerprints: dict[str, Mapping[str, str | None]] = {}
    changes: list[PlanChange] = []
    planned: set[str] = set()

    if previous is not None:
        for old in previous.batches:
            for ds_id in old.dataset_ids:
                planned.add(ds_id)
                before = previous.fingerprints.get(ds_id)
                if ds_id not in current:
                    changes.append(PlanChange("removed", ds_id, old.batch_id, "no longer in the manifest"))
                    if before is not None:
                        fingerprints[ds_id] = before
                    continue
                now = _identity(current[ds_id])
                fingerprints[ds_id] = before if before is not None else now
                if before is not None and before != now:
                    diff = ", ".join(
                        f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in FINGERPRINT_FIELDS if before.get(k) != now.get(k)
                    )
                    changes.append(PlanChange("edited", ds_id, old.batch_id, diff))
            batches.append(Batch(old.index, old.dataset_ids, old.expected_bytes, sealed=True))

    pending: list[Dataset] = []
    pending_bytes = 0

    def close() -> None:
        nonlocal pending, pending_bytes
        if pending:
            batches.append(Batch(len(batches), tuple(d.dataset_id for d in pending), _sum_bytes(pending)))
        pending, pending_bytes = [], 0

    for d in manifest.datasets:
        if d.dataset_id in planned:
            continue
        size = d.expected_bytes or 0
        if len(pending) >= batch_size or (
            max_batch_bytes is not None and pending and pending_bytes + size > max_batch_bytes
        ):
            close()
        pending.append(d)
        pending_bytes += size
        fingerprints[d.dataset_id] = _identity(d)
    close()
    return BatchPlan(
        batches=tuple(batches),
        batch_size=batch_size,
        max_batch_bytes=max_batch_bytes,
        fingerprints=fingerprints,
        changes=tuple(changes),
        manifest_sha256=manifest.sha256,
    )


def load_plan(path: str | os.PathLike[str]) -> BatchPlan | None:
    """The saved plan at ``path``, or ``None`` when there is none yet."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return BatchPlan.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable batch plan ({exc}); move it aside to re-plan from scratch") from exc


def save_plan(plan: BatchPlan, path: str | os.PathLike[str]) -> Path:
    """Write ``plan`` atomically (temp file + rename), sealing its batches for later plans."""
    return write_json_atomic(Path(path), plan.to_dict())


def current_plan(config: AtlasConfig) -> BatchPlan:
    """The plan the configured manifest gives today, extending the saved plan; writes nothing.

    This is what a DAG file calls while parsing: a local file read, no network, no side effects.
    """
    if not config.manifest.path:
        raise ValueError("no manifest configured (manifest.path)")
    manifest = read_manifest(
        config.manifest.path, sheet=config.manifest.sheet, allowed_file_root=config.manifest.allowed_file_root
    )
    return make_plan(
        manifest,
        batch_size=config.plan.batch_size,
        max_batch_bytes=config.plan.max_batch_bytes,
        previous=load_plan(config.plan_path),
    )


def freeze_plan(config: AtlasConfig) -> dict[str, Any]:
    """Validate the manifest, extend the saved plan and save it (sealing its batches).

    Returns a small summary for XCom: the plan path, batch ids, and any changes to saved batches.
    """
    plan = current_plan(config)
    path = save_plan(plan, config.plan_path)
    for change in plan.changes:
        log.warning("saved batch changed: %s", change)
    return {
        "plan_path": str(path),
        "batches": [b.batch_id for b in plan.batches],
        "new_batches": [b.batch_id for b in plan.new_batches],
        "datasets": sum(len(b.dataset_ids) for b in plan.batches),
        "changes": [str(c) for c in plan.changes],
    }


def write_batch_spec(config: AtlasConfig, batch_id_: str) -> str:
    """Write ``<state>/batches/<batch_id>.json``: the batch's datasets as validated manifest rows.

    Later tasks read the batch from this file instead of re-reading the manifest, so a manifest
    edited mid-run cannot change a batch under way. Returns the file's path (for XCom).
    """
    plan = load_plan(config.plan_path)
    if plan is None:
        raise FileNotFoundError(f"no saved plan at {config.plan_path}; run the freeze_plan task first")
    batch = plan.batch(batch_id_)
    assert config.manifest.path is not None
    manifest = read_manifest(
        config.manifest.path, sheet=config.manifest.sheet, allowed_file_root=config.manifest.allowed_file_root
    )
    rows = manifest.by_id()
    present = [rows[d].to_dict() for d in batch.dataset_ids if d in rows]
    missing = [d for d in batch.dataset_ids if d not in rows]
    if missing:
        log.warning("%s: datasets no longer in the manifest are left out: %s", batch_id_, ", ".join(missing))
    spec = {**batch.to_dict(), "datasets": present, "removed": missing, "manifest_sha256": manifest.sha256}
    path = config.state_dir / "batches" / f"{batch_id_}.json"
    write_json_atomic(path, spec)
    log.info("%s: %d datasets, expected %s bytes -> %s", batch_id_, len(present), batch.expected_bytes, path)
    return str(path)
