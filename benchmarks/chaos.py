"""Fault campaign under the real scheduler: SIGKILL tasks (and the scheduler) at seeded random moments.

The demo pipeline (9 real-cell datasets and one 404 row in 4 batches, a local "GEO" throttled so downloads
take seconds) runs once on a fresh local Airflow (SQLite, LocalExecutor) while
:func:`atlasflow_testing.chaos.run_campaign` kills the process group of running tasks across download,
extraction, process, integrate, train, checkpoint save and cleanup, and twice the scheduler (restarted
as an operator would). Airflow's retries resume the work. Then: every dataset trained or quarantined
with a reason (none because of a kill), no good download deleted, no batch trained twice, no leaked
temporary file, peak disk within the budget, the final checkpoint loadable.
Writes benchmarks/results/chaos.json (kills made, kills survived, each kill, each check).

Environment: BENCH_CHAOS_KILLS (20 task kills), BENCH_CHAOS_SCHEDULER_KILLS (2), BENCH_CHAOS_SEED (0).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    from atlasflow_testing.chaos import run_campaign

    work = Path(tempfile.mkdtemp(prefix="atlasflow-bench-chaos-"))
    try:
        result = run_campaign(work, task_kills=int(os.environ.get("BENCH_CHAOS_KILLS", 20)),
                              scheduler_kills=int(os.environ.get("BENCH_CHAOS_SCHEDULER_KILLS", 2)),
                              seed=int(os.environ.get("BENCH_CHAOS_SEED", 0)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data = {**result.to_dict(), "cores": os.cpu_count(),
            "command": "make bench BENCH=chaos"}
    out = REPO / "benchmarks" / "results" / "chaos.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    sys.stdout.write(f"chaos: {data['kills_survived']} of {data['kills_made']} kills survived "
                     f"({data['kills_by_target']}); run {data['run_state']} in {data['makespan_s']} s; failed checks: "
                     f"{[k for k, v in data['checks'].items() if not v.get('ok')]}\n")
    return 0 if data["kills_survived"] == data["kills_made"] else 1


if __name__ == "__main__":
    sys.exit(main())
