"""Two training processes on the same cores: one thread per CPU each (torch's default) vs a half share.

With ``training.backend: local`` each batch's training child runs beside the batch's scVI step on the
Airflow worker, and both chains pace the run. This measures what ``training.threads`` /
``integration.threads`` left empty (half the CPUs each) buys: two ``atlasflow train`` children on the
same processed batch of Poisson-resampled real cells (cpu preset, 1 epoch), started together, with
``OMP_NUM_THREADS`` = all usable CPUs and = half of them; and one child alone with all CPUs for scale.
Per child: wall seconds and CPU seconds (user + system, from ``wait4``). Alternating modes, 3 repeats.

Run: ``make bench BENCH=shared_cores`` → benchmarks/results/shared_cores.json.
Environment: BENCH_SHARED_CORES_CELLS (3000), BENCH_SHARED_CORES_REPEATS (3).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CELLS = int(os.environ.get("BENCH_SHARED_CORES_CELLS", 3000))
REPEATS = int(os.environ.get("BENCH_SHARED_CORES_REPEATS", 3))


def _children(command: list[str], outs: list[Path], threads: int) -> list[dict]:
    """Start one child per output folder at once; wall and CPU seconds of each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    procs = {subprocess.Popen([*command, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).pid: out for out in outs}
    figures = []
    while procs:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in procs:
            continue
        procs.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"training child failed ({status}): {' '.join(command)}")
        figures.append({"wall_s": round(time.perf_counter() - started, 2),
                        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)})
    return figures


def main() -> int:
    from atlasflow.core.config import load_config
    from atlasflow.core.cpus import usable_cpus
    from atlasflow.prep.genes import Vocabulary
    from atlasflow_testing.realdata import processed_resampled_batch

    cpus = usable_cpus()
    half = max(1, cpus // 2)
    with tempfile.TemporaryDirectory(prefix="atlasflow-bench-shared-cores-") as tmp:
        root = Path(tmp)
        overrides = {"genes.vocab_path": "builtin:pbmc68k", "qc.min_genes": 10, "storage.base_dir": str(root / "base"),
                     "training.epochs": 1}
        batch = processed_resampled_batch(CELLS, root / "data", vocab=Vocabulary.builtin("pbmc68k"),
                                          config=load_config(overrides=overrides))
        config_file = root / "config.json"
        config_file.write_text(json.dumps(load_config(overrides=overrides).to_dict()))
        command = [sys.executable, "-m", "atlasflow.cli", "train", "--config", str(config_file), "--batch-dir", str(batch)]
        runs: dict[str, list[dict]] = {"pair_all_threads": [], "pair_half_threads": [], "alone_all_threads": []}
        for r in range(REPEATS):
            for mode, threads, n in (("pair_all_threads", cpus, 2), ("pair_half_threads", half, 2),
                                     ("alone_all_threads", cpus, 1)):
                outs = [root / "out" / f"{mode}-{r}-{i}" for i in range(n)]
                runs[mode] += _children(command, outs, threads)
                sys.stdout.write(f"shared_cores[{mode}, repeat {r}]: {runs[mode][-n:]}\n")
                sys.stdout.flush()

    def spread(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values), "n": len(values)}

    summary = {mode: {"wall_s": spread([c["wall_s"] for c in cs]), "cpu_s": spread([c["cpu_s"] for c in cs])}
               for mode, cs in runs.items()}
    result = {"cells": CELLS, "cpus": cpus, "threads": {"all": cpus, "half": half}, "repeats": REPEATS,
              "measured": time.strftime("%Y-%m-%d", time.gmtime()),
              "pair_wall_all_over_half": round(summary["pair_all_threads"]["wall_s"]["median"]
                                               / summary["pair_half_threads"]["wall_s"]["median"], 2),
              "pair_cpu_all_over_half": round(summary["pair_all_threads"]["cpu_s"]["median"]
                                              / summary["pair_half_threads"]["cpu_s"]["median"], 2),
              "summary": summary, "children": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shared_cores.json").write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(f"shared_cores: two children with {cpus} threads each took {result['pair_wall_all_over_half']}x "
                     f"the wall time and {result['pair_cpu_all_over_half']}x the CPU of two with {half}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
