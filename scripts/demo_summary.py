"""Summarise the latest atlas_ingest run for `make demo`: read from Airflow's DB and the run's files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from atlasflow.config import load_config
from atlasflow.runlog import read_stages
from atlasflow.storage import Ledger


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
    latest = sorted((base / "models" / "checkpoints").glob("batch_*/progress.json"))
    if latest:
        progress = json.loads(latest[-1].read_text())
        for b in progress["batches"]:
            acc = "no held-out dataset" if b["val_masked_acc"] is None else (
                f"held-out masked-bin acc {b['val_masked_acc']:.3f} vs most-frequent-bin {b['val_baseline_acc']:.3f}")
            print(f"  trained {b['batch_id']}: {b['steps']} steps on {b['train_cells']} cells; {acc}; "
                  f"forgetting check {b['forgetting']}")
        print(f"final checkpoint {latest[-1].parent}: step {progress['global_step']}, {progress['cells_seen']} cells "
              f"seen, datasets {', '.join(progress['datasets_seen'])}")
    from atlasflow.report import integration_scores

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
    return 0 if run.state == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
