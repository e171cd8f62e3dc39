"""Pipelined vs sequential batches under the real scheduler: makespan, peak disk, stage busy fractions.

20 real-cell datasets (5 batches of 4) behind the stand-in server throttled per connection, the same
atlas_ingest DAG run twice on a fresh local Airflow (SQLite, LocalExecutor): ``plan.pipelining: true``
(batch i+1 downloads and processes while batch i trains, as far as the budget allows) and ``false``
(each batch is admitted only after the previous one's cleanup). Per run: makespan (DAG run start to
end), peak bytes under the base dir (sampled every 50 ms) vs the budget, and each stage's busy fraction
(the share of the makespan during which at least one of its tasks ran); the stage with the highest is
named the bottleneck. Writes benchmarks/results/pipeline.json.

Environment: BENCH_PIPELINE_RATE (bytes/s per connection, default 40000), BENCH_PIPELINE_DATASETS (20).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATE = float(os.environ.get("BENCH_PIPELINE_RATE", 40_000))
N_DATASETS = int(os.environ.get("BENCH_PIPELINE_DATASETS", 20))
STAGES = ("admit", "download", "process", "integrate", "train", "cleanup")


def run_mode(pipelining: bool, work: Path) -> dict:
    from atlasflow.config import load_config
    from atlasflow.storage import tree_bytes
    from atlasflow.testing.demo import build_demo
    from atlasflow.testing.geo_server import GeoServer
    from atlasflow.testing.local_airflow import LocalAirflow, union_seconds

    root = work / ("pipelined" if pipelining else "sequential")
    (root / "www").mkdir(parents=True)
    with GeoServer(root / "www", rate=RATE) as server:
        build_demo(root, server.url, n_datasets=N_DATASETS, cells=700 // N_DATASETS, batch_size=4, budget_mb=40,
                   missing_row=False, integration_epochs=2)
        cfg = root / "atlasflow.yaml"
        cfg.write_text(cfg.read_text().replace("  schedule: null", f"  schedule: null\n  pipelining: {str(pipelining).lower()}"))
        config = load_config(cfg)
        base = Path(config.storage.base_dir)
        airflow = LocalAirflow(root / "airflow", cfg, parallelism=4)
        airflow.start()
        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], sum(tree_bytes(base / a) for a in ("data", "models", "cache", "outputs")))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            try:
                run_id, rc = airflow.trigger(timeout=3000)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n--- dag-processor log ---\n{airflow.log('dag-processor')[-4000:]}") from None
            times = airflow.task_times(run_id)
            start, end = airflow.run_times(run_id)
        finally:
            stop.set()
            sampler.join()
            airflow.stop()
        bytes_served = sum(t["bytes"] for t in server.transfers())
    makespan = end - start
    busy = {s: round(union_seconds([(a, b) for (t, _), (a, b, _) in times.items() if t.endswith("." + s)])
                     / makespan, 3) for s in STAGES}
    work_stages = {s: v for s, v in busy.items() if s not in ("admit", "cleanup")}
    return {
        "pipelining": pipelining, "succeeded": rc == 0, "makespan_s": round(makespan, 1),
        "peak_bytes": peak[0], "budget_bytes": config.storage.max_storage_bytes,
        "peak_fraction_of_budget": round(peak[0] / config.storage.max_storage_bytes, 3),
        "busy_fraction": busy, "bottleneck": max(work_stages, key=work_stages.get),
        "tasks": len(times), "bytes_served": bytes_served,
    }


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="atlasflow-bench-pipeline-"))
    try:
        runs = [run_mode(True, work), run_mode(False, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pipelined, sequential = runs
    result = {
        "datasets": N_DATASETS, "batch_size": 4, "rate_bytes_per_s_per_connection": RATE, "downloads_pool": 5,
        "parallelism": 4, "cores": os.cpu_count(),
        "runs": runs,
        "makespan_ratio_sequential_over_pipelined": round(sequential["makespan_s"] / pipelined["makespan_s"], 2),
        "goal_ratio": 3.0, "design_doc_ratio": 2.5,
    }
    out = REPO / "benchmarks" / "results" / "pipeline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        sys.stdout.write(f"pipeline[{'pipelined' if r['pipelining'] else 'sequential'}]: makespan {r['makespan_s']} s, "
                         f"peak {r['peak_bytes'] / 1e6:.1f} of {r['budget_bytes'] / 1e6:.1f} MB, bottleneck "
                         f"{r['bottleneck']}, busy {r['busy_fraction']}\n")
    sys.stdout.write(f"pipeline: sequential/pipelined makespan = {result['makespan_ratio_sequential_over_pipelined']}x "
                     "(goal >= 3x, design doc 2.5x)\n")
    return 0 if all(r["succeeded"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
