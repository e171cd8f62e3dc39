"""DAG-folder parse time against a generated 1,000-dataset manifest (goal: < 1 s).

Each measurement is a fresh interpreter (as the dag-processor's parsing subprocess is): Airflow is
imported first and not counted, then ``DagBag(dags/)`` is timed. Records the seconds, the task count,
which top-level modules the parse itself imported, and whether any heavy science module was among
them. Run: ``make bench`` or ``.venv/bin/python benchmarks/parse_time.py [--datasets N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
HEAVY = ("scanpy", "anndata", "scvi", "torch", "numpy", "pandas", "lightning")

PROBE = r"""
import json, sys, time
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
before = {m.split(".")[0] for m in sys.modules}
t0 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - t0
after = {m.split(".")[0] for m in sys.modules}
print(json.dumps({
    "seconds": seconds,
    "import_errors": {k: str(v)[-500:] for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "tasks": sum(len(d.tasks) for d in bag.dags.values()),
    "new_modules": sorted(after - before),
}))
"""


def make_manifest(folder: Path, n: int, kind: str) -> Path:
    header = ["dataset_id", "download_url", "type", "disease_status", "tissue_type", "species", "format", "expected_bytes"]
    rows = []
    for i in range(n):
        if i % 3 == 0:
            rows.append([f"GSE{100000 + i}", f"GSE{100000 + i}", "geo", "ALS", "spinal_cord", "human", "", 20 * 10**9])
        else:
            rows.append([f"ds{i:05d}", f"https://data.example.org/sets/ds{i:05d}.h5ad", "direct", "control",
                         "motor_cortex", "human", "h5ad", 5 * 10**9])
    if kind == "xlsx":
        import openpyxl

        book = openpyxl.Workbook()
        ws = book.active
        ws.append(header)
        for r in rows:
            ws.append(r)
        path = folder / "manifest.xlsx"
        book.save(path)
    else:
        import csv

        path = folder / "manifest.csv"
        with path.open("w", newline="") as fh:
            csv.writer(fh).writerows([header, *rows])
    return path


def measure(kind: str, n: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="atlasflow-bench-parse-") as tmp:
        folder = Path(tmp)
        manifest = make_manifest(folder, n, kind)
        config = folder / "atlasflow.yaml"
        config.write_text(f"storage: {{base_dir: {folder / 'base'}}}\nmanifest: {{path: {manifest}}}\n")
        env = {**os.environ, "ATLASFLOW_CONFIG": str(config), "AIRFLOW_HOME": str(folder / "airflow"),
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
               "PYTHONPATH": str(REPO / "plugins")}
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags")], env=env, capture_output=True,
                                 text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    first = runs[0]
    if first["import_errors"]:
        raise SystemExit(f"DAG import errors: {first['import_errors']}")
    seconds = [r["seconds"] for r in runs]
    return {
        "manifest_format": kind,
        "datasets": n,
        "repeats": repeats,
        "seconds_median": round(statistics.median(seconds), 4),
        "seconds_all": [round(s, 4) for s in seconds],
        "goal_seconds": 1.0,
        "meets_goal": statistics.median(seconds) < 1.0,
        "dags": first["dags"],
        "tasks": first["tasks"],
        "modules_imported_by_parse": first["new_modules"],
        "heavy_modules_imported": sorted(set(first["new_modules"]) & set(HEAVY)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    result = {
        "benchmark": "parse_time",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "results": [measure(kind, args.datasets, args.repeats) for kind in ("xlsx", "csv")],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "parse_time.json").write_text(json.dumps(result, indent=1) + "\n")
    for r in result["results"]:
        sys.stdout.write(
            f"parse_time[{r['manifest_format']}]: {r['datasets']} datasets -> {r['tasks']} tasks, "
            f"median {r['seconds_median']:.3f} s (goal < 1 s), heavy modules: {r['heavy_modules_imported'] or 'none'}\n"
        )
    return result


if __name__ == "__main__":
    main()
