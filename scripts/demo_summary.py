"""Summarise the latest atlas_ingest run for `make demo`: read from Airflow's DB and the run's files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from atlasflow.core.config import load_config
from atlasflow.core.runlog import read_stages
from atlasflow.ops.report import Comparison, integration_scores, model_learning
from atlasflow.storage import Ledger

BENCH_POINTER = ("the measured figures are in `make bench BENCH=science` (benchmarks/results/) and the README's "
                 "model section (\"The model\")")
METRIC_NAMES = {"masked_acc": "masked-bin accuracy", "baseline_acc": "most-frequent bin", "per_gene_acc":
                "per-gene baseline", "loss": "loss"}


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _against(comparisons: list[Comparison]) -> str:
    """``→ beats both`` or ``→ below the per-gene baseline``: the model against the baselines listed before."""
    lost = [c.baseline for c in comparisons if not c.beats]
    if not lost:
        return "→ beats " + ("it" if len(comparisons) == 1 else "both" if len(comparisons) == 2 else "all of them")
    return "→ below " + " and ".join(lost)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _trained(base: Path) -> tuple[list[dict[str, Any]], dict[str, Any], Path | None]:
    """The trained batches' results, the newest checkpoint's progress and that checkpoint's folder.

    The results come from ``state/trained`` (kept by cleanup, so they outlive pruned checkpoints),
    else from the progress; the progress also knows how many cells each batch trained on.
    """
    trained = [d for p in sorted((base / "state" / "trained").glob("*.json")) if isinstance(d := _read(p), dict)]
    latest = sorted(p for p in (base / "models" / "checkpoints").glob("batch_*/progress.json")
                    if "." not in p.parent.name)  # not an intra-batch .partial checkpoint
    progress = _read(latest[-1]) if latest else None
    progress = progress if isinstance(progress, dict) else {}
    if not trained:
        trained = [b for b in progress.get("batches") or [] if isinstance(b, dict)]
    return trained, progress, latest[-1].parent if latest and progress else None


def model_lines(base: Path) -> list[str]:
    """Per trained batch: masked-bin accuracy and the probe beside their baselines, forgetting, replay.

    Result files of earlier runs (fewer baselines, ``forgetting`` as ``{batch: accuracy}``) work too.
    """
    trained, progress, checkpoint = _trained(base)
    train_cells = {b.get("batch_id"): b.get("train_cells") for b in progress.get("batches") or []
                   if isinstance(b, dict)}
    lines = []
    for m in model_learning(trained):
        cells = train_cells.get(m.batch_id)
        replay = (f"; replay {m.replay_cells_per_step} cells per step (reservoir {m.replay_reservoir_cells})"
                  if m.replay_cells_per_step else "")
        lines.append(f"  trained {m.batch_id}: {m.steps if m.steps is not None else '?'} steps"
                     + (f" on {cells} cells" if cells is not None else "") + replay)
        comparisons = m.comparisons()
        if m.masked_acc is None:
            lines.append("    no held-out dataset: masked-bin accuracy not measured")
        else:
            mine = [c for c in comparisons if c.metric == "masked-bin accuracy"]
            lines.append(f"    held-out masked-bin accuracy {m.masked_acc:.3f} vs most-frequent bin "
                         f"{_f(m.most_frequent_acc)} and per-gene baseline {_f(m.per_gene_acc)}"
                         + (f" ({m.val_cells} held-out cells)" if m.val_cells else "")
                         + (f" {_against(mine)}" if mine else ""))
        p = m.probe
        if p is None or p.trained is None:
            lines.append("    cell-type probe: no labelled held-out cells")
        else:
            mine = [c for c in comparisons if c.metric == "cell-type probe"]
            lines.append(f"    cell-type probe on the cls embedding {p.trained:.3f} vs PCA(50) {_f(p.pca50)} vs "
                         f"untrained {_f(p.untrained)} (majority class {_f(p.majority)}; {p.cells} labelled cells, "
                         f"{p.classes} classes)" + (f" {_against(mine)}" if mine else ""))
        if m.earlier:
            lines.append("    forgetting since trained: " + "; ".join(f.phrase() for f in m.earlier))
    if checkpoint is not None:
        lines.append(f"final checkpoint {checkpoint}: step {progress.get('global_step')}, "
                     f"{progress.get('cells_seen')} cells seen, datasets {', '.join(progress.get('datasets_seen') or [])}")
    return lines


def model_verdict(base: Path) -> str:
    """One plain line: does the final model beat its baselines, and if not, why the demo cannot show it."""
    models = model_learning(_trained(base)[0])
    final = next((m for m in reversed(models) if m.comparisons()), None)  # the newest batch that was measured
    if final is None:
        return ("model: no held-out figures to compare the model with its baselines (the demo's data are too "
                "small); " + BENCH_POINTER)
    # a last batch without held-out datasets has no figures: then the newest measured one speaks for the model
    who = (f"the final model ({final.batch_id})" if final is models[-1]
           else f"the model at {final.batch_id} (the newest batch with held-out figures)")
    if final.beats_baselines():
        return (f"model: {who} beats every baseline it was measured against on held-out cells "
                f"({', '.join(c.baseline for c in final.comparisons())})")
    lost = ", ".join(c.baseline for c in final.comparisons() if not c.beats)
    return (f"model: {who} does not beat its baselines (below {lost}): the demo's data "
            "(a few hundred real cells, a few training steps) are too small for the model to learn cell state; "
            + BENCH_POINTER)


def _metrics(split: str, entry: dict[str, Any]) -> str:
    candidate, production = entry.get("candidate") or {}, entry.get("production") or {}
    # the known metrics first, in the order the decision is made on; any others (a newer evaluation's) after
    keys = [k for k in METRIC_NAMES if k in candidate] + sorted(k for k in candidate if k not in METRIC_NAMES)
    parts = []
    for k in keys:
        new, old = candidate.get(k), production.get(k)
        if not isinstance(new, int | float):
            continue
        if isinstance(old, int | float):
            parts.append(f"{METRIC_NAMES.get(k, k)} {new:.4f} vs {old:.4f} ({new - old:+.4f})")
        else:
            parts.append(f"{METRIC_NAMES.get(k, k)} {new:.4f}")
    return (f"    {split} ({entry.get('cells', '?')} cells), candidate vs production: "
            + ("; ".join(parts) or "no metrics") + ("" if production else " (no production checkpoint yet)"))


def retrain_lines(base: Path) -> list[str]:
    """The latest retraining decision (``outputs/retrain/decision.json``), or nothing when atlas_retrain has not run."""
    record = _read(base / "outputs" / "retrain" / "decision.json")
    if not isinstance(record, dict):
        return []
    action = str(record.get("action") or "none")
    candidate = Path(str(record.get("candidate"))).name if record.get("candidate") else "none"
    before = Path(str(record.get("production_before"))).name if record.get("production_before") else "none yet"
    what = {"promoted": f"PROMOTED {candidate} to production (production before: {before})",
            "kept": f"KEPT production {before}; candidate {candidate} not promoted"}.get(action, f"no decision ({action})")
    lines = [f"retraining decision (atlas_retrain run {record.get('run_id')}, {record.get('decided_at')}): {what}",
             f"    reason: {record.get('reason')}"]
    splits = record.get("splits") or {}
    lines += [_metrics(s, e) for s, e in sorted(splits.items()) if isinstance(e, dict)]
    return lines


def main() -> int:
    from airflow.models.dagrun import DagRun
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session

    config = load_config()
    base = Path(config.storage.base_dir)
    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == "atlas_ingest").order_by(DagRun.id.desc()).first()
        tis = sorted(run.get_task_instances(session=session), key=lambda t: (t.task_id, t.map_index))
        waits = {t.task_id.split(".")[0]: session.query(TaskReschedule).filter(TaskReschedule.ti_id == t.id).count()
                 for t in tis if t.task_id.endswith(".admit")}
        states: dict[str, int] = {}
        for t in tis:
            states[str(t.state)] = states.get(str(t.state), 0) + 1
    print(f"run {run.run_id}: {run.state}; task instances: {states}")
    for batch, n in sorted(waits.items()):
        print(f"  {batch}: admission waited for disk budget {n} time(s)" if n else f"  {batch}: admitted at once")
    tombs = [json.loads(p.read_text()) for p in sorted((base / "state" / "tombstones").glob("*.json"))]
    quarantined = [json.loads(p.read_text()) for p in sorted((base / "state" / "quarantine").glob("*.json"))]
    cells = sum(t["cells_after"] for t in tombs)
    print(f"datasets processed: {len(tombs)} ({cells} cells after QC), quarantined: {len(quarantined)}")
    for q in quarantined:
        print(f"  quarantined {q['dataset_id']} ({q['batch_id']}, {q['stage']}): {q['reason'][:160]}")
    ledger = Ledger(config.storage)
    samples = ledger.samples()
    peak = max((s["data"] + s["models"] + s["cache"] + s["outputs"] for s in samples), default=0)
    peak_with_reserved = max((s["data"] + s["models"] + s["cache"] + s["outputs"] + s["reserved"] for s in samples), default=0)
    print(f"disk: peak {peak / 1e6:.2f} MB on disk, {peak_with_reserved / 1e6:.2f} MB with reservations, "
          f"budget {config.storage.max_storage_bytes / 1e6:.2f} MB; {sum(d['bytes'] for d in ledger.deletions()) / 1e6:.2f} MB "
          f"freed by cleanup in {len(ledger.deletions())} deletions")
    for line in model_lines(base) + retrain_lines(base):
        print(line)
    for row in integration_scores(read_stages(base / "state")):
        scib = row["scib"]
        print(f"  integrated {row['batch_id']} ({row['mode']}): scIB total scVI {scib['scvi']['total']} vs PCA(50) "
              f"{scib['pca']['total']} (bio {scib['scvi']['bio_conservation']} vs {scib['pca']['bio_conservation']}, "
              f"batch {scib['scvi']['batch_correction']} vs {scib['pca']['batch_correction']}) on {scib['cells']} "
              f"labelled cells, {scib['cells_earlier_batches']} of them from earlier batches; "
              f"{scib['batch_unlabelled']} unlabelled cells of the batch left out")
    system = base / "state" / "system.json"
    if system.exists():
        print(f"system validation: {json.loads(system.read_text())['memory_strategy']['reason']}")
    pointer = base / "reports" / "latest.json"
    if pointer.exists():
        print(f"run report: {json.loads(pointer.read_text())['html']}")
    home = Path(os.environ["AIRFLOW_HOME"])
    state = json.loads((home / "local" / "state.json").read_text()) if (home / "local" / "state.json").exists() else {}
    pw = home / "simple_auth_manager_passwords.json.generated"
    if state.get("api_port") and pw.exists():
        print(f"Airflow UI: http://127.0.0.1:{state['api_port']}  user admin, password {json.loads(pw.read_text())['admin']}")
        if os.environ.get("KEEP_UI", "0") != "1":
            print("  (it stops when the demo ends; `make demo KEEP_UI=1` keeps it running to look at the run)")
    print(model_verdict(base))  # last: the one line a newcomer should not miss
    return 0 if run.state == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
