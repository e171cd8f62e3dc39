"""Foundation-model data loading and training throughput, and training memory vs batch size.

Data: Poisson-resampled real cells (scanpy's pbmc68k_reduced), processed by atlasflow's own QC
into the processed-h5ad contract. Measures, each in a fresh subprocess:

- loader: cells/s from a backed processed h5ad into token tensors (block shuffle + tokenisation),
  beside anndata's AnnLoader (shuffled, backed) on the same file in the same run;
- training: cells/s and peak RSS of one epoch with the CPU preset, for 10k, 50k and 200k cells
  (goal: peak RSS flat as the batch grows, because cells are streamed).

Run: ``make bench BENCH=model_training`` or ``.venv/bin/python benchmarks/model_training.py [--sizes ...]``.
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


def _make_batch(n_cells: int, folder: Path) -> Path:
    from atlasflow.core.config import load_config
    from atlasflow.prep.genes import Vocabulary
    from atlasflow_testing.realdata import processed_resampled_batch

    return processed_resampled_batch(n_cells, folder, vocab=Vocabulary.builtin("pbmc68k"), config=load_config(
        overrides={"qc.min_genes": 10, "genes.vocab_path": "builtin:pbmc68k"}))


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _loader(batch: Path) -> dict:
    import anndata as ad
    import torch
    from anndata.experimental import AnnLoader

    from atlasflow.core.config import load_config
    from atlasflow.model.data import BatchData
    from atlasflow.model.tokenizer import Tokenizer
    from atlasflow.prep.genes import Vocabulary

    config = load_config(overrides={"genes.vocab_path": "builtin:pbmc68k"})
    tok = Tokenizer(765, config.model.sizes()["max_genes"], config.model.n_bins)
    data = BatchData(batch, Vocabulary.builtin("pbmc68k"), tok, seed=0, block_cells=4096, val_fraction=0)
    t0 = time.perf_counter()
    n = 0
    for _, cells in data.batches(epoch=0, batch_cells=256):
        torch.from_numpy(cells.tokens), torch.from_numpy(cells.bins), torch.from_numpy(cells.expr.toarray())
        n += len(cells)
    ours = n / (time.perf_counter() - t0)
    adata = ad.read_h5ad(next(batch.glob("*.h5ad")), backed="r")
    loader = AnnLoader(adata, batch_size=256, shuffle=True)
    t0 = time.perf_counter()
    m = 0
    for b in loader:
        m += b.X.shape[0]
        if m >= min(n, 50_000):
            break
    annloader = m / (time.perf_counter() - t0)
    return {"cells": n, "ours_cells_per_s": round(ours), "annloader_cells_per_s": round(annloader),
            "ours_includes": "read + block shuffle + tokenisation into int64 tensors",
            "annloader_includes": "shuffled backed reads into torch (no tokenisation)", "peak_rss_mb": _rss_mb()}


def _train(batch: Path, out: Path) -> dict:
    import torch

    from atlasflow.core.config import load_config
    from atlasflow.model.train import train_batch
    from atlasflow.prep.genes import Vocabulary

    torch.set_num_threads(os.cpu_count() or 1)
    config = load_config(overrides={"training.val_fraction": 0.0, "training.checkpoint_every_steps": 10_000,
                                    "genes.vocab_path": "builtin:pbmc68k"})
    t0 = time.perf_counter()
    result = train_batch(config, Vocabulary.builtin("pbmc68k"), batch, out)
    seconds = time.perf_counter() - t0
    return {"cells": result["cells_seen"], "seconds": round(seconds, 1), "cells_per_s": round(result["cells_seen"] / seconds),
            "n_parameters": result["n_parameters"], "final_loss": result["train_loss"], "peak_rss_mb": _rss_mb()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, a, b = args.child
        if mode == "make":
            _make_batch(int(a), Path(b))
            return {}
        row = _loader(Path(a)) if mode == "loader" else _train(Path(a), Path(b))
        sys.stdout.write(json.dumps(row) + "\n")
        return row

    def child(*parts: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", *parts], check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}

    result: dict = {"benchmark": "model_training", "data": "Poisson-resampled pbmc68k_reduced cells", "cpus": os.cpu_count(),
                    "preset": "cpu", "training": []}
    for i, n in enumerate(int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="atlasflow-bench-model-") as tmp:
            child("make", str(n), tmp)
            batch = Path(tmp) / "batch_0000"
            if i == len(args.sizes.split(",")) - 1 or n >= 50_000 and "loader" not in result:
                result["loader"] = child("loader", str(batch), "-")
                sys.stdout.write(f"loader: {result['loader']}\n")
            row = {"batch_cells": n, **child("train", str(batch), str(Path(tmp) / "ckpt"))}
            result["training"].append(row)
            sys.stdout.write(f"training {n} cells: {row}\n")
            sys.stdout.flush()
    peaks = [r["peak_rss_mb"] for r in result["training"]]
    result["training_peak_rss_spread"] = round((max(peaks) - min(peaks)) / min(peaks), 3)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_training.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
