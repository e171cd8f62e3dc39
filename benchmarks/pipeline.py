"""Pipelined vs sequential batches under the real scheduler: makespan, peak disk, stage busy fractions.

20 real-cell datasets (5 batches of 4) behind the stand-in server throttled per connection, the same
atlas_ingest DAG run twice on a fresh local Airflow (SQLite, LocalExecutor): ``plan.pipelining: true``
(batch i+1 downloads and processes while batch i trains, as far as the budget allows) and ``false``
(each batch is admitted only after the previous one's cleanup). Per run: makespan (DAG run start to
end), peak bytes under the base dir (sampled every 50 ms) vs the budget, and each stage's busy fraction
(the share of the makespan during which at least one of its tasks ran); the stage with the highest is
named the bottleneck. Writes benchmarks/results/pipeline.json.

Two scenarios, both 20 datasets:

- ``balanced``: batches of 4 at 40 kB/s per connection; download, process, integrate and train take
  similar time. On a 2-core machine the three CPU stages compete for the cores, so only the
  downloads truly overlap with compute.
- ``download_bound``: batches of 2 at 3 kB/s per connection (a dataset of the mean 92 kB takes
  ~30 s), the case the pipeline is built for (slow public servers, small budget-limited batches;
  the design document has downloads at 85-90 % of a sample's time): sequential batches use 2 of
  the 5 download slots, pipelined ones fill all 5 and keep the CPU busy meanwhile.

Environment: BENCH_PIPELINE_DATASETS (20), BENCH_PIPELINE_SCENARIOS (comma-separated subset),
BENCH_PIPELINE_PARALLELISM (8: Airflow's core.parallelism for both modes).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_DATASETS = int(os.environ.get("BENCH_PIPELINE_DATASETS", 20))
# LocalExecutor slots for tasks of any kind: at least the downloads pool (5) plus the CPU stages, or the
# pool can never fill (with 4, pipelined batches had at most ~3 downloads under way)
PARALLELISM = int(os.environ.get("BENCH_PIPELINE_PARALLELISM", 8))
SCENARIOS = {"balanced": {"batch_size": 4, "rate": 40_000.0},
             "download_bound": {"batch_size": 2, "rate": 3_000.0}}
STAGES = ("admit", "download", "process", "integrate", "train", "cleanup")


def run_mode(pipelining: bool, work: Path, *, batch_size: int, rate: float) -> dict:
    from atlasflow.core.config import load_config
    from atlasflow_testing.demo import build_demo
    from atlasflow_testing.disk import PeakDiskSampler
    from atlasflow_testing.geo_server import GeoServer
    from atlasflow_testing.local_airflow import LocalAirflow, union_seconds

    root = work / ("pipelined" if pipelining else "sequential")
    (root / "www").mkdir(parents=True)
    with GeoServer(root / "www", rate=rate) as server:
        build_demo(root, server.url, n_datasets=N_DATASETS, cells=700 // N_DATASETS, batch_size=batch_size, budget_mb=40,
                   missing_row=False, integration_epochs=2)
        cfg = root / "atlasflow.yaml"
        cfg.write_text(cfg.read_text().replace("  schedule: null", f"  schedule: null\n  pipelining: {str(pipelining).lower()}"))
        config = load_config(cfg)
        base = Path(config.storage.base_dir)
        airflow = LocalAirflow(root / "airflow", cfg, parallelism=PARALLELISM)
        airflow.start()
        try:
            with PeakDiskSampler([base / a for a in ("data", "models", "cache", "outputs")]) as disk:
                try:
                    run_id, rc = airflow.trigger(timeout=3000)
                except RuntimeError as exc:
                    raise RuntimeError(f"{exc}\n--- dag-processor log ---\n{airflow.log('dag-processor')[-4000:]}") from None
            times = airflow.task_times(run_id)
            start, end = airflow.run_times(run_id)
        finally:
            airflow.stop()
        bytes_served = sum(t["bytes"] for t in server.transfers())
    makespan = end - start
    busy = {s: round(union_seconds([(a, b) for (t, _), (a, b, _) in times.items() if t.endswith("." + s)])
                     / makespan, 3) for s in STAGES}
    work_stages = {s: v for s, v in busy.items() if s not in ("admit", "cleanup")}
    return {
        "pipelining": pipelining, "succeeded": rc == 0, "makespan_s": round(makespan, 1),
        "peak_bytes": disk.peak, "budget_bytes": config.storage.max_storage_bytes,
        "peak_fraction_of_budget": round(disk.peak / config.storage.max_storage_bytes, 3),
        "busy_fraction": busy, "bottleneck": max(work_stages, key=work_stages.get),
        "tasks": len(times), "bytes_served": bytes_served,
    }


def main() -> int:
    wanted = [n for n in os.environ.get("BENCH_PIPELINE_SCENARIOS", ",".join(SCENARIOS)).split(",") if n]
    scenarios = {}
    for name in wanted:
        work = Path(tempfile.mkdtemp(prefix=f"atlasflow-bench-pipeline-{name}-"))
        try:
            runs = [run_mode(True, work / "p", **SCENARIOS[name]), run_mode(False, work / "s", **SCENARIOS[name])]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        pipelined, sequential = runs
        scenarios[name] = {
            "batch_size": SCENARIOS[name]["batch_size"], "rate_bytes_per_s_per_connection": SCENARIOS[name]["rate"],
            "runs": runs,
            "makespan_ratio_sequential_over_pipelined": round(sequential["makespan_s"] / pipelined["makespan_s"], 2),
        }
        for r in runs:
            sys.stdout.write(f"pipeline[{name}, {'pipelined' if r['pipelining'] else 'sequential'}]: makespan "
                             f"{r['makespan_s']} s, peak {r['peak_bytes'] / 1e6:.1f} of {r['budget_bytes'] / 1e6:.1f} "
                             f"MB, bottleneck {r['bottleneck']}, busy {r['busy_fraction']}\n")
        sys.stdout.write(f"pipeline[{name}]: sequential/pipelined makespan = "
                         f"{scenarios[name]['makespan_ratio_sequential_over_pipelined']}x (goal >= 3x, design doc 2.5x)\n")
    result = {"datasets": N_DATASETS, "downloads_pool": 5, "parallelism": PARALLELISM, "cores": os.cpu_count(),
              "goal_ratio": 3.0, "design_doc_ratio": 2.5, "scenarios": scenarios}
    out = REPO / "benchmarks" / "results" / "pipeline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(r["succeeded"] for sc in scenarios.values() for r in sc["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
