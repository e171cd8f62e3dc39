"""QC peak memory and time vs dataset size with the chunked strategy (goal: peak RSS flat within ±20 %).

Datasets are Poisson-resampled from scanpy's real pbmc68k_reduced cells (50k, 200k, 500k cells by
default). Each size is generated and then processed in its own fresh subprocess, so peak RSS
(``ru_maxrss``) belongs to that run alone. Run: ``make bench BENCH=qc_memory`` or
``.venv/bin/python benchmarks/qc_memory.py [--sizes 50000,200000,500000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _generate(n_cells: int, path: Path) -> None:
    from atlasflow_testing.realdata import pbmc_counts, resample

    resample(pbmc_counts(), n_cells, seed=n_cells).write_h5ad(path)


def _process(path: Path, out: Path, strategy: str) -> dict:
    from atlasflow.core.config import load_config
    from atlasflow.intake.manifest import Dataset
    from atlasflow.prep.genes import Vocabulary
    from atlasflow.prep.process import process_dataset

    config = load_config(overrides={"qc.min_genes": 10, "qc.strategy": strategy, "qc.chunk_cells": 10_000,
                                    "genes.vocab_path": "builtin:pbmc68k"})
    raw = path.parent
    t0 = time.perf_counter()
    summary = process_dataset(raw, Dataset("bench", "https://h/x.h5ad", "direct", 2, format="h5ad"), config=config,
                              out_path=out, vocab=Vocabulary.builtin("pbmc68k"), cache_dir=out.parent / "cache")
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "cells_after": summary["cells_after"], "raw_bytes": summary["raw_bytes"],
            "processed_bytes": summary["processed_bytes"], "cells_per_s": round(summary["cells_before"] / seconds)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50000,200000,500000")
    parser.add_argument("--strategy", default="chunked", choices=["chunked", "in_memory"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, a, b = args.child
        if mode == "generate":
            _generate(int(a), Path(b))
            return {}
        sys.stdout.write(json.dumps(_process(Path(a), Path(b), args.strategy)) + "\n")
        return {}
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="atlasflow-bench-qc-") as tmp:
            raw = Path(tmp) / "raw"
            raw.mkdir()
            data = raw / "data.h5ad"
            subprocess.run([sys.executable, __file__, "--child", "generate", str(n), str(data)], check=True)
            out = subprocess.run([sys.executable, __file__, "--strategy", args.strategy, "--child", "process",
                                  str(data), str(Path(tmp) / "out" / "bench.h5ad")],
                                 check=True, capture_output=True, text=True).stdout
            row = {"cells": n, **json.loads(out.strip().splitlines()[-1])}
            rows.append(row)
            sys.stdout.write(f"qc_memory[{args.strategy}]: {n} cells: {row['seconds']} s, peak RSS {row['peak_rss_mb']} MB\n")
            sys.stdout.flush()
    peaks = [r["peak_rss_mb"] for r in rows]
    spread = (max(peaks) - min(peaks)) / min(peaks) if peaks else 0.0
    result = {"benchmark": "qc_memory", "strategy": args.strategy, "data": "Poisson-resampled pbmc68k_reduced cells",
              "cpus": os.cpu_count(), "rows": rows, "peak_rss_spread": round(spread, 3),
              "goal": "peak RSS within ±20 % across sizes", "meets_goal": spread <= 0.2}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"qc_memory_{args.strategy}.json").write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(f"peak RSS spread {spread:.1%} (goal ≤ 20 %)\n")
    return result


if __name__ == "__main__":
    main()
