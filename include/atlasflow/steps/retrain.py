"""Retraining decisions: what is new, which feedback becomes pseudo-labels, and whether a checkpoint is promoted.

Every step of the ``atlas_retrain`` DAG is one function here; none imports Airflow, and only
evaluation imports the model (torch). The files it keeps (all small, all written atomically):

``models/production.json``
    The **production pointer**: the promoted checkpoint (``checkpoint_dir``, ``model_sha256``,
    ``batch_id``), its metrics, the feedback files it had seen, when and by which run. The ingest
    pipeline resumes from it instead of a rejected checkpoint (:func:`resume_checkpoint`), and
    cleanup never prunes the checkpoint it names.
``state/retrain/rejected.json``
    Candidates evaluated and not promoted, with the reason.
``state/retrain/decisions.jsonl`` and ``outputs/retrain/decision.json``
    Every decision (one JSON line each), and the latest one for the run report.
``state/retrain/triggered.json``
    The datasets atlas_ingest was last triggered for, so the same rows never trigger twice.
``outputs/retrain/retrain.csv`` and ``retrain.json``
    The retraining set and its summary (see :func:`build_retrain_set`). With
    ``retrain.train_on_pseudo_labels`` on, the next ``atlasflow train`` trains the cell-type head on
    it (:mod:`atlasflow.model.pseudo`), and the decision shows the head's accuracy on the held-out
    cells' curated labels, candidate beside production.

Feedback tables
---------------
``retrain.feedback_path`` (default ``<base_dir>/feedback``) is a file or a folder of ``.csv``,
``.parquet`` or ``.json`` files (a JSON file holds one object or a list of them, like the design
document's per-image feedback JSONs). One row per prediction the model made for a cell:

============== ======== ==========================================================
column         required meaning
============== ======== ==========================================================
cell_id        yes      the cell's obs name in its dataset
dataset_id     yes      the manifest dataset the cell comes from
predicted_label yes     the predicted cell type (``class_id`` or ``label`` also accepted)
confidence     yes      the prediction's confidence, 0..1
source         no       who produced it (an annotation service, a reviewer, ...)
checkpoint     no       the checkpoint that predicted it
timestamp      no       when
============== ======== ==========================================================

Splits
------
Validation and canary cells are the cells training *held out*: whole datasets (per batch,
``training.val_fraction``) that no checkpoint trained on, sampled into each checkpoint's
``val_sets.npz``. Each held-out dataset goes to ``canary`` or ``validation`` by a salted SHA-256
of its id (:func:`split_of`): stable (adding datasets never moves one), deterministic, and a
dataset is in exactly one split. Both checkpoints are scored on the same cells with the same
masks (``Trainer.masked_metrics``, the model's own validation metric), and, when the model has a
cell-type head, by the head's accuracy on the cells whose curated obs ``cell_type`` is one of
``model.cell_types`` (``cell_type_acc``, ``cell_type_cells``). Promotion is decided on masked-bin
accuracy alone; the head's figures are in the record and the reason, to read, not to gate: a
feedback loop that only rewards agreeing with its own pseudo-labels is what a canary should
expose, not what it should optimise.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from atlasflow.core.config import AtlasConfig
from atlasflow.core.fsutil import write_json_atomic, write_text_atomic
from atlasflow.core.layout import StorageLayout
from atlasflow.core.records import (
    batch_trained,
    quarantine_path,
    rejected_path,
    retrain_decisions_path,
    retrain_triggered_path,
)
from atlasflow.ops.notify import Message, SmtpSender, send

if TYPE_CHECKING:  # numpy and the model (torch) are imported where they are used: the DAGs import this module
    import numpy as np

    from atlasflow.model.train import Trainer

__all__ = [
    "FeedbackRow",
    "Split",
    "assign_splits",
    "build_retrain_set",
    "candidate_checkpoint",
    "cell_type_head",
    "decide",
    "detect_changes",
    "evaluate_candidate",
    "head_accuracy",
    "held_out_datasets",
    "ingest_trigger",
    "production",
    "promote_or_keep",
    "read_feedback",
    "resume_checkpoint",
    "retrain_set_path",
    "select_pseudo_labels",
    "split_of",
]

log = logging.getLogger(__name__)

Split = Literal["validation", "canary"]
SPLITS: tuple[Split, ...] = ("validation", "canary")
FEEDBACK_SUFFIXES = (".csv", ".parquet", ".json")
RETRAIN_COLUMNS = ("cell_id", "dataset_id", "pseudo_label", "confidence", "source", "predicted_by",
                   "feedback_file", "feedback_sha256", "feedback_row", "threshold")
_ALIASES = {"class_id": "predicted_label", "label": "predicted_label", "cell": "cell_id", "dataset": "dataset_id"}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    from atlasflow.storage.cleanup import file_sha256

    return file_sha256(path)


def _outputs(config: AtlasConfig) -> Path:
    return StorageLayout.of(config.storage.base_dir).outputs / "retrain"


def retrain_set_path(config: AtlasConfig) -> Path:
    """``<base_dir>/outputs/retrain/retrain.csv``: what :func:`build_retrain_set` writes and training reads."""
    return _outputs(config) / "retrain.csv"


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


# ---- the production pointer and what ingest resumes from ----------------------------------------------


def production(config: AtlasConfig) -> dict[str, Any] | None:
    """The production pointer (``models/production.json``), or None before the first promotion."""
    return _read_json(StorageLayout.of(config.storage.base_dir).production_pointer, None)


def _rejected(config: AtlasConfig) -> list[dict[str, Any]]:
    return _read_json(rejected_path(config.state_dir), [])


def _is_rejected(config: AtlasConfig, checkpoint: Path) -> dict[str, Any] | None:
    """The rejection record of ``checkpoint``: same folder and (when it still exists) same weights."""
    resolved = checkpoint.resolve()
    for record in _rejected(config):
        if Path(record["checkpoint_dir"]).resolve() != resolved:
            continue
        model = checkpoint / "model.pt"
        # a folder re-trained after its rejection holds other weights: that one was never judged
        if not model.exists() or _sha256(model) == record["model_sha256"]:
            return record
    return None


def resume_checkpoint(config: AtlasConfig, previous: Path | None) -> Path | None:
    """The checkpoint a batch should resume from, given the one the pipeline found (``previous``).

    A checkpoint that atlas_retrain evaluated and did not promote is never built upon: the batch
    resumes from production instead, so the first batch of the next run continues from the
    promoted model. Any other checkpoint (production itself, or a newer one not yet judged)
    is returned unchanged, as is ``None`` (a first batch trains from scratch).
    """
    if previous is None:
        return None
    record = _is_rejected(config, previous)
    pointer = production(config)
    if record is None or pointer is None:
        return previous
    target = Path(pointer["checkpoint_dir"])
    log.warning("%s was not promoted (%s): resuming from the production checkpoint %s instead",
                previous, record.get("reason"), target)
    return target


def candidate_checkpoint(config: AtlasConfig) -> Path | None:
    """The newest finished batch checkpoint (``models/checkpoints/batch_*/result.json``), or None."""
    root = StorageLayout.of(config.storage.base_dir).checkpoints
    done = sorted(p for p in root.glob("batch_*") if (p / "result.json").exists() and (p / "model.pt").exists())
    return done[-1] if done else None


# ---- splits ---------------------------------------------------------------------------------------------


def split_of(key: str, *, canary_fraction: float, seed: int = 0) -> Split:
    """The split of a held-out dataset (or donor) id: a salted hash, so it never changes for that id."""
    digest = hashlib.sha256(f"atlasflow-retrain-split:{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "canary" if u < canary_fraction else "validation"


def assign_splits(keys: Iterable[str], *, canary_fraction: float, seed: int = 0) -> dict[str, Split]:
    """``{key: split}`` for every distinct key (each key is in exactly one split)."""
    return {k: split_of(k, canary_fraction=canary_fraction, seed=seed) for k in sorted(set(keys))}


def _lineage(checkpoint: Path) -> dict[str, set[str]]:
    """Datasets a checkpoint trained on and held out, from its ``progress.json``."""
    progress = json.loads((checkpoint / "progress.json").read_text())
    train: set[str] = set()
    val: set[str] = set()
    for batch in progress.get("batches", []):
        train.update(batch.get("train_datasets") or [])
        val.update(batch.get("val_datasets") or [])
    return {"train": train, "val": val}


def held_out_datasets(config: AtlasConfig, checkpoint: Path | None = None) -> dict[str, Split]:
    """Held-out datasets of ``checkpoint`` (default: the candidate) and the split each belongs to."""
    checkpoint = checkpoint or candidate_checkpoint(config)
    if checkpoint is None:
        return {}
    r = config.retrain
    return assign_splits(_lineage(checkpoint)["val"], canary_fraction=r.canary_fraction, seed=r.split_seed)


# ---- what is new ----------------------------------------------------------------------------------------


def _feedback_files(config: AtlasConfig) -> list[Path]:
    root = Path(config.retrain.feedback_path) if config.retrain.feedback_path else config.base_dir / "feedback"
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FEEDBACK_SUFFIXES
                  and not p.name.startswith("."))


def _pending_datasets(config: AtlasConfig) -> tuple[list[str], list[str]]:
    """(batches, datasets) the manifest has and no run has trained yet; quarantined datasets excluded."""
    from atlasflow.intake.plan import current_plan

    batches, datasets = [], []
    for batch in current_plan(config).batches:
        if batch_trained(config, batch.batch_id) is not None:
            continue
        todo = [d for d in batch.dataset_ids if not quarantine_path(config.state_dir, d).exists()]
        if todo:
            batches.append(batch.batch_id)
            datasets.extend(todo)
    return batches, datasets


def detect_changes(config: AtlasConfig) -> dict[str, Any]:
    """New manifest rows and new feedback since the last promoted checkpoint.

    Returns
    -------
    ``{"new_batches", "new_datasets", "new_feedback_files", "feedback_files", "production", "reason"}``:
    datasets of batches not trained yet (quarantined ones left out: they would never train), and
    feedback files whose content the production pointer has not recorded.
    """
    batches, datasets = _pending_datasets(config)
    pointer = production(config) or {}
    seen = pointer.get("feedback_files", {})
    files = {str(p): _sha256(p) for p in _feedback_files(config)}
    new_files = sorted(p for p, sha in files.items() if seen.get(p) != sha)
    parts = []
    if datasets:
        parts.append(f"{len(datasets)} untrained manifest datasets in {', '.join(batches)}")
    if new_files:
        parts.append(f"{len(new_files)} feedback files new since the last promotion")
    reason = "; ".join(parts) or "no untrained manifest rows and no new feedback since the last promotion"
    log.info("detect: %s", reason)
    return {"new_batches": batches, "new_datasets": datasets, "new_feedback_files": new_files,
            "feedback_files": files, "production": pointer.get("checkpoint_dir"), "reason": reason}


def ingest_trigger(config: AtlasConfig, detected: Mapping[str, Any], *, run_id: str) -> dict[str, Any]:
    """Whether to trigger atlas_ingest for ``detected``'s new rows, and the run conf saying why.

    Only untrained manifest rows trigger ingest (feedback is turned into the retraining set by
    :func:`build_retrain_set`, which ingest does not read). The same set of datasets triggers once
    (per atlas_retrain run: clearing that run triggers again): when the ingest run it started leaves
    them untrained, the Asset update that run still publishes does not trigger it again in a loop
    (atlas_ingest's own schedule, or a manual run, takes it from there).

    Returns ``{"trigger": bool, "reason": str, "conf": dict | None}``.
    """
    datasets = sorted(detected.get("new_datasets") or [])
    if not datasets:
        return {"trigger": False, "reason": "nothing to ingest: " + str(detected.get("reason")), "conf": None}
    key = hashlib.sha256("\n".join(datasets).encode()).hexdigest()
    path = retrain_triggered_path(config.state_dir)
    last = _read_json(path, {})
    # the same run may ask again (a cleared or retried run whose trigger failed); another run may not
    if last.get("datasets_sha256") == key and last.get("run_id") != run_id:
        return {"trigger": False, "conf": None,
                "reason": f"atlas_ingest was already triggered for these {len(datasets)} datasets by {last.get('run_id')} "
                          f"at {last.get('at')}; not triggering again (run atlas_ingest to retry them)"}
    conf = {"triggered_by": "atlas_retrain", "retrain_run_id": run_id,
            "reason": f"new manifest rows: {', '.join(datasets)} ({', '.join(detected.get('new_batches') or [])})",
            "new_batches": list(detected.get("new_batches") or []), "new_datasets": datasets}
    write_json_atomic(path, {"datasets_sha256": key, "datasets": datasets, "run_id": run_id, "at": _now()})
    return {"trigger": True, "reason": conf["reason"], "conf": conf}


# ---- feedback → pseudo-labels ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackRow:
    """One prediction from a feedback table, with where it came from."""

    cell_id: str
    dataset_id: str
    predicted_label: str
    confidence: float
    source: str
    predicted_by: str
    feedback_file: str
    feedback_sha256: str
    feedback_row: int


def _normalise(record: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        k = str(key).strip().lower().replace(" ", "_")
        out[_ALIASES.get(k, k)] = value
    return out


def _records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    if suffix == ".json":
        data = json.loads(path.read_text())
        return list(data) if isinstance(data, list) else [data]
    import pandas as pd

    return pd.read_parquet(path).to_dict(orient="records")


def read_feedback(paths: Iterable[Path]) -> tuple[list[FeedbackRow], Counter[str]]:
    """Every valid row of the feedback files, and why the others were refused.

    A row needs ``cell_id``, ``dataset_id``, ``predicted_label`` and a ``confidence`` within 0..1;
    a file that cannot be parsed at all is refused whole (``unreadable file``), never fatal.
    """
    rows: list[FeedbackRow] = []
    refused: Counter[str] = Counter()
    for path in paths:
        try:
            records = _records(path)
        except (OSError, ValueError, ImportError, csv.Error) as exc:
            log.warning("feedback file %s refused: %s", path, exc)
            refused["unreadable file"] += 1
            continue
        sha = _sha256(path)
        for i, raw in enumerate(records):
            r = _normalise(raw)
            missing = [k for k in ("cell_id", "dataset_id", "predicted_label", "confidence")
                       if r.get(k) is None or str(r.get(k)).strip() == ""]
            if missing:
                refused[f"missing {', '.join(missing)}"] += 1
                continue
            try:
                confidence = float(r["confidence"])
            except (TypeError, ValueError):
                refused["confidence not a number"] += 1
                continue
            if not 0.0 <= confidence <= 1.0:
                refused["confidence outside 0..1"] += 1
                continue
            rows.append(FeedbackRow(str(r["cell_id"]).strip(), str(r["dataset_id"]).strip(),
                                    str(r["predicted_label"]).strip(), confidence, str(r.get("source") or ""),
                                    str(r.get("checkpoint") or ""), str(path), sha, i))
    return rows, refused


def select_pseudo_labels(rows: Iterable[FeedbackRow], *, threshold: float,
                         exclude_datasets: Iterable[str] = ()) -> tuple[list[FeedbackRow], Counter[str]]:
    """Predictions that become pseudo-labels, and how many others were dropped for which reason.

    - confidence must be *above* ``threshold`` (``> 0.9`` by default: only confident predictions become labels);
    - cells of held-out (validation/canary) datasets are dropped: training on them would leak;
    - a cell predicted more than once keeps its most confident prediction, unless the confident
      predictions disagree, in which case the cell is dropped (``conflicting labels``).

    The result is sorted by (dataset_id, cell_id), so the same feedback gives the same file.
    """
    excluded = set(exclude_datasets)
    dropped: Counter[str] = Counter()
    by_cell: dict[tuple[str, str], list[FeedbackRow]] = {}
    for row in rows:
        if not row.confidence > threshold:
            dropped[f"confidence <= {threshold:g}"] += 1
        elif row.dataset_id in excluded:
            dropped["held-out (validation/canary) dataset"] += 1
        else:
            by_cell.setdefault((row.dataset_id, row.cell_id), []).append(row)
    kept = []
    for key in sorted(by_cell):
        preds = by_cell[key]
        if len({p.predicted_label for p in preds}) > 1:
            dropped["conflicting labels"] += len(preds)
            continue
        dropped["duplicate prediction"] += len(preds) - 1
        kept.append(max(enumerate(preds), key=lambda ip: (ip[1].confidence, -ip[0]))[1])  # first wins a tie
    return kept, +dropped


def build_retrain_set(config: AtlasConfig) -> dict[str, Any]:
    """Write ``outputs/retrain/retrain.csv`` (pseudo-labels with provenance) and ``retrain.json``.

    Columns: ``cell_id, dataset_id, pseudo_label, confidence, source, predicted_by, feedback_file,
    feedback_sha256, feedback_row, threshold``. Returns the summary (also in ``retrain.json``).
    """
    threshold = config.retrain.confidence_threshold
    files = _feedback_files(config)
    rows, refused = read_feedback(files)
    held_out = held_out_datasets(config)
    kept, dropped = select_pseudo_labels(rows, threshold=threshold, exclude_datasets=held_out)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RETRAIN_COLUMNS)
    for r in kept:
        writer.writerow([r.cell_id, r.dataset_id, r.predicted_label, f"{r.confidence:.6g}", r.source, r.predicted_by,
                         r.feedback_file, r.feedback_sha256, r.feedback_row, f"{threshold:g}"])
    out = _outputs(config)
    csv_path = write_text_atomic(retrain_set_path(config), buf.getvalue())
    summary = {"path": str(csv_path), "threshold": threshold, "files": len(files), "rows_read": len(rows),
               "refused": dict(refused), "dropped": dict(dropped), "pseudo_labels": len(kept),
               "labels": dict(sorted(Counter(r.predicted_label for r in kept).items())),
               "held_out_datasets": sorted(held_out), "built_at": _now()}
    write_json_atomic(out / "retrain.json", summary)
    log.info("retraining set: %d pseudo-labels (confidence > %g) from %d rows of %d files -> %s; dropped %s; "
             "refused %s", len(kept), threshold, len(rows), len(files), csv_path, dict(dropped), dict(refused))
    return summary


# ---- evaluation and promotion ---------------------------------------------------------------------------


def _eval_cells(config: AtlasConfig, checkpoint: Path) -> dict[str, Any]:
    """The held-out cells in ``checkpoint``'s ``val_sets.npz``, grouped by split.

    Cells of checkpoints written before dataset ids were kept are keyed by their batch instead
    (a batch's held-out datasets then stay together in one split: still no leakage); cells of
    checkpoints written before their curated labels were kept count as unlabelled.
    """
    import numpy as np

    path = checkpoint / "val_sets.npz"
    if not path.exists():
        return {}
    r = config.retrain
    parts: dict[str, dict[str, list[Any]]] = {s: {"tokens": [], "bins": [], "keys": [], "labels": []} for s in SPLITS}
    with np.load(path) as z:
        batches = sorted({k.rsplit("__", 1)[0] for k in z.files})
        for batch in batches:
            tokens, bins = z[f"{batch}__tokens"], z[f"{batch}__bins"]
            keys = z[f"{batch}__datasets"].astype(str) if f"{batch}__datasets" in z.files else \
                np.full(tokens.shape[0], f"batch:{batch}")
            labels = z[f"{batch}__labels"].astype(str) if f"{batch}__labels" in z.files else \
                np.full(tokens.shape[0], "")
            splits = np.array([split_of(k, canary_fraction=r.canary_fraction, seed=r.split_seed) for k in keys])
            for s in SPLITS:
                sel = splits == s
                if sel.any():
                    parts[s]["tokens"].append(tokens[sel])
                    parts[s]["bins"].append(bins[sel])
                    parts[s]["keys"].append(keys[sel])
                    parts[s]["labels"].append(labels[sel])
    return {s: {"tokens": np.concatenate(p["tokens"]), "bins": np.concatenate(p["bins"]),
                "labels": np.concatenate(p["labels"]), "keys": sorted(set(np.concatenate(p["keys"]).tolist()))}
            for s, p in parts.items() if p["tokens"]}


def head_accuracy(trainer: Trainer, tokens: np.ndarray, bins: np.ndarray, labels: np.ndarray,
                  cell_types: list[str]) -> dict[str, Any]:
    """The cell-type head's accuracy on the cells whose curated label is one of ``cell_types``.

    Returns ``{"cell_type_acc": float | None, "cell_type_cells": int}``: None when the model has no
    head or no cell has such a label (unlabelled cells, and labels the head cannot predict, are
    left out rather than counted wrong).
    """
    import numpy as np

    known = np.isin(labels, cell_types) if cell_types else np.zeros(len(labels), dtype=bool)
    n = int(known.sum())
    predicted = trainer.predict_cell_types(tokens[known], bins[known]) if n else None
    if predicted is None:
        return {"cell_type_acc": None, "cell_type_cells": n}
    index = {c: i for i, c in enumerate(cell_types)}
    target = np.array([index[label] for label in labels[known]])
    return {"cell_type_acc": round(float((predicted == target).mean()), 6), "cell_type_cells": n}


def _score(config: AtlasConfig, checkpoint: Path, cells: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    from atlasflow.model.train import Trainer
    from atlasflow.prep.genes import run_vocabulary

    trainer = Trainer.load(checkpoint, config, run_vocabulary(config))
    types = config.model.cell_type_labels()
    return {s: {**{k: round(float(v), 6) for k, v in trainer.masked_metrics(c["tokens"], c["bins"]).items()},
                "cell_type_acc": head_accuracy(trainer, c["tokens"], c["bins"], c["labels"], types)["cell_type_acc"]}
            for s, c in cells.items()}


def evaluate_candidate(config: AtlasConfig, candidate: Path | None = None) -> dict[str, Any]:
    """Score the candidate and the production checkpoint on the same validation and canary cells.

    Returns
    -------
    ``{"status": "evaluated" | "unchanged" | "no_candidate", "reason", "candidate", "production",
    "candidate_pseudo_labels", "splits": {split: {"cells", "cell_type_cells", "datasets", "candidate":
    metrics, "production": metrics | None}}}``; metrics are ``loss``, ``masked_acc``,
    ``baseline_acc``, ``per_gene_acc`` and ``cell_type_acc`` (the cell-type head's accuracy on the
    ``cell_type_cells`` cells whose curated label is one of ``model.cell_types``; None without a
    head or such cells). ``candidate_pseudo_labels`` is what the candidate's batch took from the
    retraining set (its ``result.json``; None when it was trained without one).

    Raises
    ------
    ValueError
        When a validation or canary dataset was trained on by either checkpoint (leakage).
    """
    candidate = candidate or candidate_checkpoint(config)
    pointer = production(config)
    base: dict[str, Any] = {"candidate": str(candidate) if candidate else None,
                            "production": pointer["checkpoint_dir"] if pointer else None, "splits": {}}
    if candidate is None:
        return {**base, "status": "no_candidate", "reason": "no trained checkpoint yet"}
    sha = _sha256(candidate / "model.pt")
    base["candidate_sha256"] = sha
    base["candidate_pseudo_labels"] = _read_json(candidate / "result.json", {}).get("pseudo_labels")
    if pointer is not None and pointer.get("model_sha256") == sha:
        return {**base, "status": "unchanged", "reason": f"{candidate.name} is already production"}
    if (record := _is_rejected(config, candidate)) is not None:
        return {**base, "status": "unchanged",
                "reason": f"{candidate.name} was already evaluated and kept out on {record['decided_at']}: "
                          f"{record['reason']}"}
    prod = Path(pointer["checkpoint_dir"]) if pointer else None
    if prod is not None and not (prod / "model.pt").exists():
        raise FileNotFoundError(f"the production checkpoint {prod} is gone; restore it or remove "
                                f"{StorageLayout.of(config.storage.base_dir).production_pointer}")
    cells = _eval_cells(config, candidate)
    trained_on = _lineage(candidate)["train"] | (_lineage(prod)["train"] if prod else set())
    leaked = sorted({k for c in cells.values() for k in c["keys"]} & trained_on)
    if leaked:
        raise ValueError(f"evaluation datasets were trained on (leakage): {', '.join(leaked)}")
    ours = _score(config, candidate, cells)
    theirs = _score(config, prod, cells) if prod else {}
    import numpy as np

    types = config.model.cell_type_labels()
    for s, c in cells.items():
        base["splits"][s] = {"cells": int(c["tokens"].shape[0]), "datasets": c["keys"], "candidate": ours[s],
                             "production": theirs.get(s),
                             "cell_type_cells": int(np.isin(c["labels"], types).sum()) if types else 0}
    return {**base, "status": "evaluated", "reason": f"{candidate.name} scored on {', '.join(cells) or 'no'} split(s)"}


@dataclass(frozen=True)
class Decision:
    """Promote or keep, and why; per split: production's and the candidate's accuracy and the change.

    ``cell_type_head``: per split, the cell-type head's accuracy on labelled held-out cells for the
    candidate and production, the change and the cells (see :func:`cell_type_head`); shown, not gated on.
    """

    promote: bool
    reason: str
    deltas: dict[str, float | None]
    cell_type_head: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cell_type_head(splits: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per split: ``{"candidate", "production", "change", "cells"}``, the head's accuracy on labelled cells.

    Splits where neither checkpoint has a head figure (no head, or no labelled cell) are left out.
    """
    out = {}
    for s, m in sorted(splits.items()):
        new = (m.get("candidate") or {}).get("cell_type_acc")
        old = (m.get("production") or {}).get("cell_type_acc")
        if new is None and old is None:
            continue
        out[s] = {"candidate": new, "production": old,
                  "change": None if new is None or old is None else round(new - old, 6),
                  "cells": m.get("cell_type_cells")}
    return out


def _head_lines(head: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for s, h in head.items():
        old, new, change = h["production"], h["candidate"], h["change"]
        figures = f"{'n/a' if old is None else f'{old:.4f}'} -> {'n/a' if new is None else f'{new:.4f}'}"
        delta = "" if change is None else f"{change:+.4f}, "
        lines.append(f"{s}: cell-type head accuracy {figures} ({delta}{h['cells']} labelled cells)")
    return "; ".join(lines)


def decide(evaluation: Mapping[str, Any], *, tolerance: float) -> Decision:
    """Promote unless masked-bin accuracy falls by more than ``tolerance`` on any evaluated split.

    With no production checkpoint yet the candidate is promoted (there is nothing to regress
    from); with production but no held-out cells it is kept (a regression could not be ruled out).
    The cell-type head's accuracy per split (candidate and production) is in the reason and in
    ``cell_type_head``, but does not decide.
    """
    splits = evaluation.get("splits") or {}
    head = cell_type_head(splits)
    shown = f" (shown, not decided on: {_head_lines(head)})" if head else ""
    if evaluation.get("production") is None:
        return Decision(True, "no production checkpoint yet: the first evaluated candidate is promoted" + shown,
                        {s: None for s in splits}, head)
    if not splits:
        return Decision(False, "no held-out validation or canary cells to compare on: production is kept", {})
    deltas: dict[str, float | None] = {}
    worse, lines = [], []
    for s, m in sorted(splits.items()):
        new, old = m["candidate"]["masked_acc"], m["production"]["masked_acc"]
        deltas[s] = round(new - old, 6)
        lines.append(f"{s}: masked-bin accuracy {old:.4f} -> {new:.4f} ({new - old:+.4f}, {m['cells']} cells)")
        if new < old - tolerance:
            worse.append(s)
    if worse:
        return Decision(False, f"regressed beyond the tolerance {tolerance:g} on {', '.join(worse)}: "
                        + "; ".join(lines) + shown, deltas, head)
    return Decision(True, f"no regression beyond the tolerance {tolerance:g}: " + "; ".join(lines) + shown, deltas,
                    head)


def promote_or_keep(config: AtlasConfig, evaluation: Mapping[str, Any], *, run_id: str,
                    smtp: SmtpSender | None = None) -> dict[str, Any]:
    """Apply :func:`decide`: write the production pointer, or record the rejection; notify; report.

    The pointer is replaced atomically (temp file + rename), so a reader always sees the old or
    the new production, never neither. Returns the decision record (also appended to
    ``state/retrain/decisions.jsonl`` and written to ``outputs/retrain/decision.json``).
    """
    record: dict[str, Any] = {"run_id": run_id, "decided_at": _now(), "candidate": evaluation.get("candidate"),
                              "production_before": evaluation.get("production"), "splits": evaluation.get("splits"),
                              "tolerance": config.retrain.tolerance,
                              "candidate_pseudo_labels": evaluation.get("candidate_pseudo_labels")}
    if evaluation.get("status") != "evaluated":
        record.update({"action": "none", "reason": evaluation.get("reason")})
        log.info("no decision: %s", record["reason"])
        return record
    decision = decide(evaluation, tolerance=config.retrain.tolerance)
    candidate = Path(str(evaluation["candidate"]))
    record.update({"action": "promoted" if decision.promote else "kept", "reason": decision.reason,
                   "deltas": decision.deltas, "cell_type_head": decision.cell_type_head})
    layout = StorageLayout.of(config.storage.base_dir)
    if decision.promote:
        seen = {str(p): _sha256(p) for p in _feedback_files(config)}
        result = _read_json(candidate / "result.json", {})
        pointer = {"checkpoint_dir": str(candidate), "batch_id": candidate.name,
                   "model_sha256": evaluation["candidate_sha256"], "promoted_at": record["decided_at"], "run_id": run_id,
                   "previous": evaluation.get("production"), "splits": evaluation.get("splits"),
                   "datasets_seen": result.get("datasets_seen"), "global_step": result.get("global_step"),
                   "feedback_files": seen, "reason": decision.reason}
        write_json_atomic(layout.production_pointer, pointer)
        log.warning("PROMOTED %s to production: %s", candidate, decision.reason)
    else:
        rejected = _rejected(config)
        rejected.append({"checkpoint_dir": str(candidate), "model_sha256": evaluation["candidate_sha256"],
                         "batch_id": candidate.name, "decided_at": record["decided_at"], "run_id": run_id,
                         "reason": decision.reason})
        write_json_atomic(rejected_path(config.state_dir), rejected)
        log.warning("KEPT production %s; %s not promoted: %s", evaluation.get("production"), candidate,
                    decision.reason)
    if decision.promote or config.notify.on_keep:
        verb = "promoted to production" if decision.promote else "NOT promoted (production kept)"
        message = Message("promoted" if decision.promote else "kept", f"[atlasflow] {candidate.name} {verb}",
                          f"{candidate} {verb}: {decision.reason}", record)
        record["notification"] = send(config.notify, message, smtp=smtp)
    _append_decision(config, record)
    return record


def _append_decision(config: AtlasConfig, record: Mapping[str, Any]) -> None:
    path = retrain_decisions_path(config.state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    write_json_atomic(_outputs(config) / "decision.json", record)
