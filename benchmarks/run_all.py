"""Run every benchmark script in benchmarks/ (each writes its own JSON under benchmarks/results/).

``make bench`` runs them all; ``make bench BENCH=parse_time`` (or ``--only parse_time,...``) picks some.
A summary with each script's status, wall time and finish time goes to benchmarks/results/summary.json;
a run of some benchmarks updates their entries and keeps the others' from earlier runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=os.environ.get("BENCH", ""), help="comma-separated benchmark names")
    args = parser.parse_args()
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_"))
    if wanted:
        unknown = wanted - {p.stem for p in scripts}
        if unknown:
            sys.stderr.write(f"unknown benchmark(s): {', '.join(sorted(unknown))}\n")
            return 2
        scripts = [p for p in scripts if p.stem in wanted]
    summary = []
    for script in scripts:
        sys.stdout.write(f"== {script.stem}\n")
        sys.stdout.flush()
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode
        summary.append({"benchmark": script.stem, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / "summary.json"
    ran = {s["benchmark"] for s in summary}
    try:
        earlier = [s for s in json.loads(path.read_text()) if s.get("benchmark") not in ran]
    except (OSError, ValueError):  # none yet, or damaged: start over
        earlier = []
    merged = sorted(earlier + summary, key=lambda s: s["benchmark"])
    path.write_text(json.dumps(merged, indent=1) + "\n")
    failed = [s["benchmark"] for s in summary if s["returncode"] != 0]
    if failed:
        sys.stderr.write(f"failed: {', '.join(failed)}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
