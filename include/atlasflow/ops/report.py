"""The run report: one self-contained HTML file and ``run_metrics.json`` for a storage base dir.

A *run dir* is a ``storage.base_dir``: everything the report shows is read from the files the
steps leave under it (``state/plan.json``, ``state/batches``, ``state/tombstones``,
``state/quarantine``, ``state/stages``, ``state/jobs``, ``state/trained``, the ledger's usage
samples, and the newest checkpoint's ``progress.json``), so it can be rebuilt at any time, also
after cleanup removed the data. The ingest DAG's last task calls :func:`write_run_report`, which
writes ``reports/<run_id>/report.html`` and ``run_metrics.json`` and then points
``reports/latest.json`` at them (the Airflow UI's storage view links there).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atlasflow.core.config import GB, AtlasConfig
from atlasflow.core.fsutil import write_json_atomic, write_text_atomic
from atlasflow.core.runlog import read_jobs, read_stages

__all__ = ["STAGES", "Comparison", "Forgetting", "ModelBatch", "ProbeScores", "collect_run", "integration_scores",
           "model_learning", "render_html", "run_metrics", "write_run_report"]

log = logging.getLogger(__name__)

STAGES = ("admit", "download", "process", "integrate", "train", "cleanup")
DATASET_STAGES = ("download", "process")  # the others are per batch
WORK_STAGES = ("download", "process", "integrate", "train", "cleanup")  # admit is waiting, not work
AREA_KEYS = ("data", "models", "cache", "outputs")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsons(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: d for p in sorted(folder.glob("*.json")) if isinstance(d := _read_json(p), dict)}


def _batches(state: Path) -> list[dict[str, Any]]:
    """The plan's batches with their frozen manifest rows: ``[{"batch_id", "datasets": [row, ...]}]``."""
    plan = _read_json(state / "plan.json") or {}
    ids = [b.get("batch_id") or f"batch_{int(b['index']):04d}" for b in plan.get("batches", [])]
    ids += sorted(p.stem for p in (state / "batches").glob("batch_*.json") if p.stem not in ids)
    out = []
    for index, bid in enumerate(ids):
        spec = _read_json(state / "batches" / f"{bid}.json") or {}
        rows = spec.get("datasets")
        if rows is None:  # no spec written yet: the plan still names the datasets
            planned = plan["batches"][index] if index < len(plan.get("batches", [])) else {}
            rows = [{"dataset_id": d} for d in planned.get("dataset_ids", [])]
        out.append({"batch_id": bid, "datasets": rows})
    return out


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Wall-clock seconds covered by ``intervals`` (parallel downloads count once)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _stage_summary(stages: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for stage in STAGES:
        done = [r for r in stages if r["stage"] == stage and r.get("seconds") is not None]
        intervals = [(r["started"], r["ended"]) for r in done]
        summary[stage] = {
            "records": len([r for r in stages if r["stage"] == stage]),
            "task_seconds": round(sum(r["seconds"] for r in done), 3),
            "wall_seconds": round(_union_seconds(intervals), 3),
            "max_seconds": round(max((r["seconds"] for r in done), default=0.0), 3),
            "failed": sum(r.get("status") == "failed" for r in stages if r["stage"] == stage),
        }
    work = {s: summary[s]["wall_seconds"] for s in WORK_STAGES if summary[s]["wall_seconds"] > 0}
    bottleneck = max(work, key=work.__getitem__) if work else None
    return {"stages": summary, "bottleneck": bottleneck,
            "admission_wait_exceeds_bottleneck": bool(bottleneck and summary["admit"]["wall_seconds"] > work[bottleneck])}


def _lineage(trained: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The newest trained batch's checkpoint: its chain of parents and, when still on disk, its progress."""
    if not trained:
        return None
    final = trained[max(trained)]
    by_dir = {t.get("checkpoint_dir"): t for t in trained.values()}
    chain, current = [], final
    while current is not None and len(chain) <= len(trained):
        chain.append({k: current.get(k) for k in ("batch_id", "checkpoint_dir", "parent_checkpoint", "parent_hash",
                                                   "global_step", "cells_seen")})
        current = by_dir.get(current.get("parent_checkpoint")) if current.get("parent_checkpoint") else None
    progress = _read_json(Path(final["checkpoint_dir"]) / "progress.json") if final.get("checkpoint_dir") else None
    return {"final": final, "chain": chain, "exists": bool(progress), "progress": progress}


def collect_run(config: AtlasConfig) -> dict[str, Any]:
    """Everything the report shows, as plain data, read from ``config.storage.base_dir``."""
    from atlasflow.storage import Ledger

    ledger = Ledger(config.storage)
    state = ledger.layout.state
    tombstones, quarantine = _jsons(state / "tombstones"), _jsons(state / "quarantine")
    trained = _jsons(state / "trained")
    stages = read_stages(state)
    by_key = {(r["stage"], r["batch_id"], r.get("dataset_id")): r for r in stages}
    datasets = []
    for batch in _batches(state):
        bid = batch["batch_id"]
        for row in batch["datasets"]:
            did = row["dataset_id"]
            tomb, quar = tombstones.get(did), quarantine.get(did)
            download = by_key.get(("download", bid, did)) or {}
            failed = [s for s in STAGES if (by_key.get((s, bid, did if s in DATASET_STAGES else None)) or {})
                      .get("status") == "failed"]
            if tomb is not None:
                status = "processed"
            elif quar is not None:
                status = "quarantined"
            elif failed:
                status = "failed"
            else:
                status = "pending"
            down_bytes = sum(f.get("bytes", 0) for f in tomb["downloads"]) if tomb and tomb.get("downloads") \
                else download.get("bytes")
            coverage = (tomb or {}).get("coverage") or {}
            datasets.append({
                "dataset_id": did, "batch_id": bid, "type": row.get("type"), "format": (tomb or {}).get("format")
                or row.get("format"), "status": status,
                # the size the row was reserved with (manifest, asked of its source, or the default) and from where
                "expected_bytes": row.get("expected_bytes") or (download.get("size_check") or {}).get("expected"),
                "size_source": "manifest" if row.get("expected_bytes") else (download.get("size_check") or {}).get("source"),
                "downloaded": tomb is not None or download.get("status") == "ok", "download_bytes": down_bytes,
                "cells_before": (tomb or {}).get("cells_before"), "cells_after": (tomb or {}).get("cells_after"),
                "genes_after": (tomb or {}).get("genes_after"), "vocab_fraction": coverage.get("vocab_fraction"),
                "counts_fraction": coverage.get("counts_fraction"), "removed": (tomb or {}).get("removed"),
                "quarantine_stage": (quar or {}).get("stage") if status == "quarantined" else None,
                "quarantine_reason": (quar or {}).get("reason") if status == "quarantined" else None,
                "failed_stages": failed, "qc_histograms": (tomb or {}).get("qc_histograms"),
                # reads rows: the chemistry kb count used, "10xv2, detected" when the manifest left it empty
                "technology": ", ".join(str(x) for x in ((tomb or {}).get("technology"),
                                                         (tomb or {}).get("technology_source")) if x) or None,
                "skipped_files": download.get("skipped_files") or [],
                "redirects": download.get("redirects") or [],
            })
    samples = ledger.samples()
    budget = next((s["budget"] for s in reversed(samples) if s.get("budget")), None) or config.storage.max_storage_bytes
    used = [sum(s[k] or 0 for k in AREA_KEYS) for s in samples]
    return {
        "base_dir": str(ledger.layout.base_dir), "budget_bytes": int(budget), "samples": samples,
        "peak_used_bytes": max(used, default=0),
        "peak_used_plus_reserved_bytes": max((u + (s["reserved"] or 0) for u, s in zip(used, samples, strict=True)),
                                             default=0),
        "deleted_bytes": sum(d["bytes"] for d in ledger.deletions()),
        "datasets": datasets, "stages": stages, "stage_summary": _stage_summary(stages), "jobs": read_jobs(state),
        "trained": [trained[b] for b in sorted(trained)], "lineage": _lineage(trained),
        "decisions": _decisions(state), "production": _read_json(ledger.layout.production_pointer),
        "integration": integration_scores(stages),
    }


def integration_scores(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each integrated batch's mode and scIB scores (scVI latent vs PCA), from its integrate record.

    Parameters
    ----------
    stages
        Stage records (:func:`atlasflow.core.runlog.read_stages`).

    Returns
    -------
    list of dict
        ``{"batch_id", "mode", "scib"}`` per batch whose integration was scored, by batch id;
        ``scib`` as in ``models/integration/<batch_id>/result.json``.
    """
    rows = []
    for r in stages:
        result = r.get("integration") if r["stage"] == "integrate" else None
        if isinstance(result, dict) and isinstance(result.get("scib"), dict):
            rows.append({"batch_id": r["batch_id"], "mode": result.get("mode"), "scib": result["scib"]})
    return sorted(rows, key=lambda row: row["batch_id"])


def _decisions(state: Path, *, last: int = 20) -> list[dict[str, Any]]:
    """The latest promote/keep decisions of atlas_retrain (``state/retrain/decisions.jsonl``)."""
    path = state / "retrain" / "decisions.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[-last:]:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a crash mid-append: skip it, keep the rest
            continue
    return rows


def _record(run_id: str, ds: dict[str, Any], stage: str, rec: dict[str, Any] | None) -> dict[str, Any]:
    out = {"run_id": run_id, "dataset_id": ds["dataset_id"], "batch_id": ds["batch_id"], "stage": stage,
           "scope": "dataset" if stage in DATASET_STAGES else "batch", "status": (rec or {}).get("status", "not_run")}
    for key in ("started", "ended", "seconds", "attempts", "error", "reason"):
        if (rec or {}).get(key) is not None:
            out[key] = rec[key]
    if stage == "download":
        out["bytes"] = ds["download_bytes"]
        if ds["quarantine_stage"] == "download":
            out["status"], out["reason"] = "quarantined", ds["quarantine_reason"]
    elif stage == "process":
        out.update({k: ds[k] for k in ("cells_before", "cells_after", "genes_after", "vocab_fraction",
                                       "counts_fraction")})
        if ds["quarantine_stage"] == "process":
            out["status"], out["reason"] = "quarantined", ds["quarantine_reason"]
    return out


def run_metrics(data: dict[str, Any], run_id: str) -> dict[str, Any]:
    """``run_metrics.json``: one record per dataset per stage, plus the run's totals.

    Batch stages (admit, integrate, train, cleanup) repeat the batch's record for each of its
    datasets with ``"scope": "batch"``: sum durations over records of one scope only. Train
    records and ``batches`` carry the model's figures beside their baselines
    (:meth:`ModelBatch.to_dict`: ``forgetting`` always as ``{batch: {"at_training", "now",
    "change"}}``, ``beats_baselines`` per baseline and the ``verdict`` line).
    """
    by_key = {(r["stage"], r["batch_id"], r.get("dataset_id")): r for r in data["stages"]}
    records = [_record(run_id, ds, stage, by_key.get((stage, ds["batch_id"],
                                                      ds["dataset_id"] if stage in DATASET_STAGES else None)))
               for ds in data["datasets"] for stage in STAGES]
    learning = {m.batch_id: m.to_dict() for m in model_learning(data["trained"])}
    for rec in records:
        if rec["stage"] == "train" and rec["batch_id"] in learning:
            rec.update(learning[rec["batch_id"]])
    return {
        "run_id": run_id, "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_dir": data["base_dir"], "budget_bytes": data["budget_bytes"], "peak_used_bytes": data["peak_used_bytes"],
        "peak_used_plus_reserved_bytes": data["peak_used_plus_reserved_bytes"],
        "bottleneck": data["stage_summary"]["bottleneck"], "stage_summary": data["stage_summary"]["stages"],
        "datasets": {s: sum(d["status"] == s for d in data["datasets"]) for s in ("processed", "quarantined", "failed",
                                                                                "pending")},
        "jobs": data["jobs"],
        "integration": data.get("integration", []),
        "batches": [{**{k: t.get(k) for k in ("batch_id", "checkpoint_dir", "train_loss", "val_loss", "cells_seen",
                                              "global_step", "seconds", "gene_ranking", "cell_objective")},
                     **learning.get(str(t.get("batch_id")), {})}
                    for t in data["trained"]],
        "records": records,
    }


# ---- the model: does it learn cell state? ---------------------------------------------------------

def _finite(value: Any) -> float | None:
    """A number from a result file, or None (absent, not numeric, or NaN as JSON allows)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        else None


@dataclass(frozen=True)
class Comparison:
    """One figure of the model beside one baseline computed in the same run on the same cells."""

    metric: str  # "masked-bin accuracy" or "cell-type probe"
    key: str  # the baseline's key in run_metrics.json
    baseline: str  # the baseline, in words
    value: float
    baseline_value: float

    @property
    def beats(self) -> bool:
        """Strictly above: a model that only ties a baseline has not shown it learned anything more."""
        return self.value > self.baseline_value

    def phrase(self) -> str:
        if self.beats:
            return f"beats {self.baseline} ({self.baseline_value:.4f})"
        if self.value == self.baseline_value:
            return f"only ties {self.baseline} ({self.baseline_value:.4f})"
        return f"below {self.baseline} ({self.baseline_value:.4f})"


@dataclass(frozen=True)
class ProbeScores:
    """The 5-fold cell-type probe of one batch's labelled held-out cells (``result["probe"]``)."""

    cells: int | None
    classes: int | None
    unlabelled_left_out: int | None
    trained: float | None  # the exported cls embedding
    untrained: float | None  # the same network at its random initialisation
    pca50: float | None  # PCA(50) of log-normalised counts
    majority: float | None  # always the most frequent class

    @classmethod
    def from_result(cls, probe: Any) -> ProbeScores | None:
        if not isinstance(probe, dict):
            return None
        return cls(cells=_count(probe.get("cells")), classes=_count(probe.get("classes")),
                   unlabelled_left_out=_count(probe.get("unlabelled_left_out")),
                   trained=_finite(probe.get("cls_probe_acc")), untrained=_finite(probe.get("untrained_probe_acc")),
                   pca50=_finite(probe.get("pca50_probe_acc")), majority=_finite(probe.get("majority_acc")))


@dataclass(frozen=True)
class Forgetting:
    """A batch's held-out masked-bin accuracy when it was trained and after a later batch."""

    batch_id: str
    at_training: float | None  # None in result files written before it was stored
    now: float | None
    change: float | None

    def phrase(self) -> str:
        if self.change is not None and self.at_training is not None and self.now is not None:
            return f"{self.batch_id} {self.change:+.4f} ({self.at_training:.4f} → {self.now:.4f})"
        return f"{self.batch_id} now {'n/a' if self.now is None else f'{self.now:.4f}'} (at training: not stored)"


@dataclass(frozen=True)
class ModelBatch:
    """What one trained batch's result says about learning, read from ``result.json`` of any version.

    Result files of earlier runs may lack the baselines, the probe's untrained and majority
    figures, or hold ``forgetting`` as ``{batch: accuracy now}``: what is missing is None, never
    an error, and comparisons are made only where both figures exist.
    """

    batch_id: str
    steps: int | None
    train_cells: int | None
    masked_acc: float | None
    most_frequent_acc: float | None
    per_gene_acc: float | None
    expression_mse: float | None
    val_cells: int | None
    val_cells_total: int | None
    probe: ProbeScores | None
    forgetting: tuple[Forgetting, ...]  # every stored held-out sample, this batch's own included
    replay_cells_per_step: int | None
    replay_reservoir_cells: int | None

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> ModelBatch:
        batch_id = str(result.get("batch_id") or "")
        rows = []
        raw = result.get("forgetting")
        for bid, entry in sorted(raw.items()) if isinstance(raw, dict) else []:
            if isinstance(entry, dict):
                rows.append(Forgetting(str(bid), _finite(entry.get("at_training")), _finite(entry.get("now")),
                                       _finite(entry.get("change"))))
            else:  # the older {batch: accuracy now}: what it was at training was not kept
                now = _finite(entry)
                rows.append(Forgetting(str(bid), now if bid == batch_id else None, now,
                                       0.0 if bid == batch_id and now is not None else None))
        return cls(batch_id=batch_id, steps=_count(result.get("steps")), train_cells=_count(result.get("train_cells")),
                   masked_acc=_finite(result.get("val_masked_acc")),
                   most_frequent_acc=_finite(result.get("val_baseline_acc")),
                   per_gene_acc=_finite(result.get("val_per_gene_acc")),
                   expression_mse=_finite(result.get("val_expression_mse")),
                   val_cells=_count(result.get("val_cells")), val_cells_total=_count(result.get("val_cells_total")),
                   probe=ProbeScores.from_result(result.get("probe")), forgetting=tuple(rows),
                   replay_cells_per_step=_count(result.get("replay_cells_per_step")),
                   replay_reservoir_cells=_count(result.get("replay_reservoir_cells")))

    @property
    def earlier(self) -> tuple[Forgetting, ...]:
        """Forgetting on the batches trained before this one (this batch's own change is 0 by definition)."""
        return tuple(f for f in self.forgetting if f.batch_id != self.batch_id)

    def comparisons(self) -> list[Comparison]:
        """Each figure beside each of its baselines, where both were measured."""
        pairs = [("masked-bin accuracy", self.masked_acc, "most_frequent_bin", "the most-frequent bin",
                  self.most_frequent_acc),
                 ("masked-bin accuracy", self.masked_acc, "per_gene", "the per-gene baseline", self.per_gene_acc)]
        if self.probe is not None:
            p = self.probe
            pairs += [("cell-type probe", p.trained, "pca50", "PCA(50)", p.pca50),
                      ("cell-type probe", p.trained, "untrained_network", "the untrained network", p.untrained),
                      ("cell-type probe", p.trained, "majority_class", "the majority class", p.majority)]
        return [Comparison(metric, key, name, value, base) for metric, value, key, name, base in pairs
                if value is not None and base is not None]

    def beats_baselines(self) -> bool | None:
        """True when every measured baseline is beaten, False when one is not, None when nothing was compared."""
        found = self.comparisons()
        return all(c.beats for c in found) if found else None

    def verdict(self) -> str:
        """One plain line: the model's figures, and whether each beats each of its baselines."""
        found = self.comparisons()
        parts = []
        for metric in ("masked-bin accuracy", "cell-type probe"):
            mine = [c for c in found if c.metric == metric]
            if mine:
                parts.append(f"{metric} {mine[0].value:.4f} " + ", ".join(c.phrase() for c in mine))
        if self.masked_acc is None:
            parts.append("no held-out cells: masked-bin accuracy not measured")
        elif not any(c.metric == "masked-bin accuracy" for c in found):
            parts.append(f"masked-bin accuracy {self.masked_acc:.4f} (no baseline stored)")
        if self.probe is None or self.probe.trained is None:
            parts.append("no labelled held-out cells for the cell-type probe")
        elif not any(c.metric == "cell-type probe" for c in found):
            parts.append(f"cell-type probe {self.probe.trained:.4f} (no baseline stored)")
        beats = self.beats_baselines()
        overall = ("beats every baseline" if beats else "does NOT beat every baseline" if beats is False
                   else "nothing to compare")
        return f"{self.batch_id}: {overall}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The figures for ``run_metrics.json`` (names as in ``result.json``, ``forgetting`` in its current form)."""
        probe = self.probe
        return {
            "steps": self.steps, "val_masked_acc": self.masked_acc, "val_baseline_acc": self.most_frequent_acc,
            "val_per_gene_acc": self.per_gene_acc, "val_expression_mse": self.expression_mse,
            "val_cells": self.val_cells, "val_cells_total": self.val_cells_total,
            "probe": None if probe is None else {
                "cells": probe.cells, "unlabelled_left_out": probe.unlabelled_left_out, "classes": probe.classes,
                "cls_probe_acc": probe.trained, "untrained_probe_acc": probe.untrained,
                "pca50_probe_acc": probe.pca50, "majority_acc": probe.majority},
            "forgetting": {f.batch_id: {"at_training": f.at_training, "now": f.now, "change": f.change}
                           for f in self.forgetting},
            "replay_cells_per_step": self.replay_cells_per_step, "replay_reservoir_cells": self.replay_reservoir_cells,
            "beats_baselines": {c.key: c.beats for c in self.comparisons()}, "verdict": self.verdict(),
        }


def model_learning(trained: list[dict[str, Any]]) -> list[ModelBatch]:
    """Each trained batch's learning figures beside their baselines, in batch order.

    Parameters
    ----------
    trained
        Training results (``state/trained/<batch>.json``, ``result.json`` or the train task's XCom),
        of any version.

    Returns
    -------
    list of ModelBatch
        One per result that names its batch, sorted by batch id.
    """
    rows = [ModelBatch.from_result(t) for t in trained if isinstance(t, dict) and t.get("batch_id")]
    return sorted(rows, key=lambda m: m.batch_id)


# ---- plots (matplotlib, Agg, PNG as base64 data URIs) ---------------------------------------------

def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _unit(nbytes: float) -> tuple[float, str]:
    return (GB, "GB") if nbytes >= GB else (1e6, "MB")


def _plot_storage(data: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    samples = data["samples"]
    if not samples:
        return None
    scale, unit = _unit(data["budget_bytes"])
    t0 = samples[0]["time"]
    t = [(s["time"] - t0) / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.stackplot(t, *[[(s[k] or 0) / scale for s in samples] for k in AREA_KEYS], labels=AREA_KEYS, step="post",
                 alpha=0.8)
    ax.step(t, [(sum(s[k] or 0 for k in AREA_KEYS) + (s["reserved"] or 0)) / scale for s in samples], where="post",
            color="black", linestyle="--", linewidth=1, label="on disk + still reserved")
    ax.axhline(data["budget_bytes"] / scale, color="red", linewidth=1.5, label=f"budget {data['budget_bytes'] / scale:g} {unit}")
    ax.set_xlabel("minutes since the first sample")
    ax.set_ylabel(unit)
    ax.set_title("storage under the base dir over time")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    return _png(fig)


def _plot_qc(data: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt
    import numpy as np

    hists = [d["qc_histograms"] for d in data["datasets"] if d.get("qc_histograms")]
    if not hists:
        return None
    labels = {"n_counts": "log10(1 + total counts)", "n_genes": "log10(1 + detected genes)", "pct_mito": "% mitochondrial"}
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, (name, label) in zip(axes, labels.items(), strict=True):
        edges = np.asarray(hists[0][name]["edges"])
        for part, style in (("before", "-"), ("after", "--")):
            counts = np.sum([h[name][part] for h in hists], axis=0)
            ax.stairs(counts, edges, linestyle=style, label=f"{part} QC ({int(counts.sum())} cells)")
        ax.set_xlabel(label)
        ax.set_ylabel("cells")
        ax.legend(fontsize=6)
    fig.suptitle(f"per-cell QC metrics, {len(hists)} processed dataset(s)")
    return _png(fig)


def _plot_loss(data: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trained = data["trained"]
    if not trained:
        return None
    progress = (data["lineage"] or {}).get("progress") or {}
    steps = progress.get("losses") or []
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(10 if steps else 6, 3.2), squeeze=False)
    ax = axes[0][0]
    x = [t["batch_id"] for t in trained]
    for key, marker in (("train_loss", "o"), ("val_loss", "s")):
        ys = [t.get(key) for t in trained]
        ax.plot([xi for xi, y in zip(x, ys, strict=True) if y is not None], [y for y in ys if y is not None],
                marker=marker, label=key.replace("_", " "))
    ax.set_ylabel("masked-bin loss")
    ax.set_title("loss per batch")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=7)
    if steps:
        ax2 = axes[0][1]
        ax2.plot(range(1, len(steps) + 1), steps, linewidth=0.8)
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("training step (all batches)")
        ax2.set_ylabel("train loss")
        ax2.set_title("final checkpoint's loss history")
    return _png(fig)


def _plot_integration(data: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    rows = data.get("integration") or []
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), sharey=True)
    x = [r["batch_id"] for r in rows]
    for ax, key in zip(axes, ("bio_conservation", "batch_correction", "total"), strict=True):
        for emb, label, style in (("scvi", "scVI latent", "-o"), ("pca", "PCA(50), unintegrated", "--s")):
            ys = [(r["scib"].get(emb) or {}).get(key) for r in rows]
            ax.plot([xi for xi, y in zip(x, ys, strict=True) if y is not None], [y for y in ys if y is not None],
                    style, label=label)
        ax.set_title(key.replace("_", " "))
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    axes[0].set_ylabel("scIB score (higher is better)")
    axes[0].legend(fontsize=7)
    return _png(fig)


def _plot_model(models: list[ModelBatch]) -> str | None:
    """Grouped bars per batch: masked-bin accuracy vs both baselines, the probe vs its three; forgetting lines."""
    import matplotlib.pyplot as plt
    import numpy as np

    masked = [("model", "masked_acc"), ("per-gene baseline", "per_gene_acc"),
              ("most-frequent bin", "most_frequent_acc")]
    probe = [("trained cls", "trained"), ("untrained network", "untrained"), ("PCA(50)", "pca50"),
             ("majority class", "majority")]
    panels = []
    if any(m.masked_acc is not None for m in models):
        panels.append(("held-out masked-bin accuracy", [(label, [getattr(m, key) for m in models])
                                                         for label, key in masked]))
    if any(m.probe is not None for m in models):
        panels.append(("cell-type probe (5-fold)", [(label, [getattr(m.probe, key) if m.probe else None
                                                             for m in models]) for label, key in probe]))
    # forgetting: each stored batch's masked-bin accuracy as later batches were trained
    curves: dict[str, list[tuple[int, float]]] = {}
    for i, m in enumerate(models):
        for f in m.forgetting:
            if f.now is not None:
                curves.setdefault(f.batch_id, []).append((i, f.now))
    show_forgetting = any(len(points) > 1 for points in curves.values())
    if not panels:
        return None
    n = len(panels) + show_forgetting
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.3), squeeze=False)
    x = np.arange(len(models))
    names = [m.batch_id for m in models]
    for ax, (title, series) in zip(axes[0], panels, strict=False):
        width = 0.8 / len(series)
        for j, (label, ys) in enumerate(series):
            heights = [np.nan if y is None else y for y in ys]  # a gap, not a zero, where not measured
            ax.bar(x + (j - (len(series) - 1) / 2) * width, heights, width, label=label,
                   hatch=None if j == 0 else "//", alpha=1.0 if j == 0 else 0.6)
        ax.set_xticks(x, names, rotation=30, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("accuracy (higher is better)")
    if show_forgetting:
        ax = axes[0][-1]
        for bid, points in sorted(curves.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=bid)
        ax.set_xticks(x, [f"after {b}" for b in names], rotation=30, fontsize=7)
        ax.set_title("forgetting: held-out masked-bin accuracy", fontsize=9)
        ax.legend(fontsize=6)
    return _png(fig)


def _plot_stages(data: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    rows = [r for r in data["stages"] if r.get("started") is not None]
    if not rows:
        return None
    t0 = min(r["started"] for r in rows)
    now = time.time()
    lanes = sorted({(r["batch_id"], STAGES.index(r["stage"]) if r["stage"] in STAGES else 99, r["stage"])
                    for r in rows})
    lane = {(b, s): i for i, (b, _, s) in enumerate(lanes)}
    colors = dict(zip(STAGES, plt.get_cmap("tab10").colors, strict=False))
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.22 * len(lanes) + 1)))
    for r in rows:
        end = r.get("ended") or now
        hatch = "//" if r.get("status") in ("waiting", "failed") else None
        ax.barh(lane[(r["batch_id"], r["stage"])], (end - r["started"]) / 60, left=(r["started"] - t0) / 60,
                color=colors.get(r["stage"], "grey"), hatch=hatch, edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(lanes)), [f"{b} {s}" for b, _, s in lanes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("minutes since the first stage started")
    ax.set_title("stages over time (one bar per task; hatched: waiting or failed)")
    return _png(fig)


# ---- HTML (templates/report.html.j2) -----------------------------------------------------------

def _opt(value: Any, missing: str = "") -> Any:
    return missing if value is None else value


def _bytes(n: Any) -> str:
    if n is None:
        return ""
    scale, unit = _unit(float(n))
    return f"{n / scale:.3f} {unit}"


def _secs(s: Any) -> str:
    return "" if s is None else f"{s:.1f} s"


def _num(x: Any) -> str:
    return "" if x is None else f"{x:.4f}"  # None: e.g. no held-out dataset in the batch


def _pct(x: Any) -> str:
    return "" if x is None else f"{x:.1%}"


def _when(t: Any) -> str:
    return "" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _deltas(deltas: Any) -> str:
    """A retrain decision's change per split vs production, e.g. ``canary +0.0100, validation -0.1000``."""
    return ", ".join(f"{k} {v:+.4f}" for k, v in (deltas or {}).items() if isinstance(v, int | float))


@functools.cache
def _templates() -> Any:
    from atlasflow.ops.templates import environment

    return environment(opt=_opt, bytes=_bytes, secs=_secs, num=_num, pct=_pct, when=_when, deltas=_deltas)


SCIB_METRICS = ("asw_label", "nmi", "ari", "isolated_label_asw", "clisi", "asw_batch", "graph_connectivity", "ilisi",
                "bio_conservation", "batch_correction", "total")


def render_html(data: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The report page (``templates/report.html.j2``).

    Parameters
    ----------
    data
        What :func:`collect_run` returns.
    metrics
        What :func:`run_metrics` returns (run id, time written, dataset counts).

    Returns
    -------
    str
        One self-contained HTML page: the shared stylesheet inlined, plots as PNG data URIs, no
        script, every value escaped.
    """
    scale, unit = _unit(data["budget_bytes"])
    removed = [d for d in data["datasets"] if d.get("removed")]
    models = model_learning(data["trained"])
    lineage = data["lineage"]
    seen = ((lineage["progress"] or {}).get("datasets_seen") or lineage["final"].get("datasets_seen")
            if lineage else None) or []
    plots = {"storage": _plot_storage(data), "qc": _plot_qc(data), "loss": _plot_loss(data),
             "model": _plot_model(models) if models else None, "integration": _plot_integration(data),
             "stages": _plot_stages(data)}
    return _templates().get_template("report.html.j2").render(
        data=data, metrics=metrics, scale=scale, unit=unit, over=data["peak_used_bytes"] > data["budget_bytes"],
        cells_after_qc=sum(d["cells_after"] or 0 for d in data["datasets"]), removed=removed,
        # one column per QC rule, in the order the first dataset's record lists them
        rules=list(removed[0]["removed"]) if removed else [], models=models, plots=plots, scib_metrics=SCIB_METRICS,
        datasets_seen=seen)


def _folder_name(run_id: str) -> str:
    """Airflow run ids hold ``:`` and ``+``; a folder name (and a URL) should not."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:200] or "run"


def write_run_report(config: AtlasConfig, run_id: str, *, out: Path | None = None) -> dict[str, Any]:
    """Write the report of ``config.storage.base_dir`` and its ``run_metrics.json``; the DAG's ``report`` task.

    Parameters
    ----------
    config
        The run's config; the budget is the ledger's latest sample's, else ``storage.max_storage_gb``.
    run_id
        Names the report (``reports/<run_id>/``, sanitised for a folder name).
    out
        Write the HTML here instead (``run_metrics.json`` next to it); ``reports/latest.json`` is
        then left alone, since it points at the pipeline's own reports only.

    Returns
    -------
    ``{"run_id", "html", "metrics", "written_at"}`` (what ``reports/latest.json`` holds) plus a few totals.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or cluster nodes
    from atlasflow.storage import StorageLayout

    data = collect_run(config)
    metrics = run_metrics(data, run_id)
    reports = StorageLayout.of(config.storage.base_dir).reports
    html_path = out if out is not None else reports / _folder_name(run_id) / "report.html"
    html_path = Path(html_path).resolve()
    write_text_atomic(html_path, render_html(data, metrics))
    metrics_path = write_json_atomic(html_path.with_name("run_metrics.json"), metrics)
    pointer = {"run_id": run_id, "html": str(html_path), "metrics": str(metrics_path),
               "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if out is None:
        write_json_atomic(reports / "latest.json", pointer)  # last: it never points at a half-written report
    log.info("run report %s (%d datasets, bottleneck %s)", html_path, len(data["datasets"]), metrics["bottleneck"])
    return {**pointer, "datasets": metrics["datasets"], "bottleneck": metrics["bottleneck"],
            "peak_used_bytes": metrics["peak_used_bytes"], "budget_bytes": metrics["budget_bytes"]}
