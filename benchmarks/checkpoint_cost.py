"""What each model preset costs: parameters, checkpoint size and save time, memory, throughput.

For the presets ``cpu``, ``gpu-small`` and ``gpu-large`` with the human vocabulary
(``builtin:human_grch38_ens100``):

- computed from the code (:mod:`atlasflow.model.sizing`): parameters, the checkpoint estimate and
  the per-batch model-artefact reservation admission makes, training memory per device, model
  FLOPs per cell and the GPU throughput they imply at a stated peak and MFU (no GPU measured here);
- measured on this machine, each preset in a fresh subprocess: a :class:`~atlasflow.model.train.Trainer`
  after one AdamW step (so the optimizer holds its two moments), saved twice with the real
  ``Trainer.save`` (a fresh save, then the replacing save an intra-batch checkpoint makes), the
  seconds of each and the bytes on disk against the estimate of the same parts;
- measured CPU training throughput of the ``cpu`` preset with the human vocabulary (one epoch over
  Poisson-resampled real PBMCs, processed by the pipeline's QC).

Run: ``make bench BENCH=checkpoint_cost`` or ``.venv/bin/python benchmarks/checkpoint_cost.py
[--presets cpu,gpu-small,gpu-large] [--train-cells 5000]``.
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
VOCAB = "builtin:human_grch38_ens100"
# dense bf16 peaks (vendor data sheets), and the share of it a well-fed transformer step reaches
PEAK_BF16 = {"H100 SXM": 989.4e12, "A100 SXM": 312e12}
ASSUMED_MFU = 0.4
MICRO_BATCH = {"cpu": 64, "gpu-small": 64, "gpu-large": 32}
GPUS = {"cpu": 1, "gpu-small": 1, "gpu-large": 8}


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _computed(preset: str) -> dict:
    from atlasflow.core.config import load_config
    from atlasflow.model.sizing import model_artifacts, n_parameters, training_flops_per_cell, training_memory
    from atlasflow.prep.genes import Vocabulary

    config = load_config(overrides={"model.preset": preset, "genes.vocab_path": VOCAB})
    n_genes = len(Vocabulary.load(VOCAB))
    art = model_artifacts(config, n_genes)
    flops = training_flops_per_cell(config, n_genes)
    mem = training_memory(config, n_genes, MICRO_BATCH[preset])
    throughput = {gpu: round(peak * ASSUMED_MFU / flops, 1) for gpu, peak in PEAK_BF16.items()}
    return {"preset": preset, "sizes": config.model.sizes(), "n_genes": n_genes,
            "n_parameters": n_parameters(config, n_genes), "checkpoint_estimate_bytes": art.checkpoint.total(),
            "checkpoint_estimate": {k: v for k, v in art.to_dict().items() if k in (
                "weights", "optimizer", "stats", "replay", "val_sets_per_batch")},
            "reservation_per_batch_bytes": art.bytes(), "training_flops_per_cell": flops,
            "micro_batch_cells": MICRO_BATCH[preset], "training_memory_bytes": mem,
            "gpus": GPUS[preset], "computed_cells_per_s_per_gpu": throughput,
            "computed_cells_per_s_all_gpus": {g: round(v * GPUS[preset], 1) for g, v in throughput.items()}}


def _save(preset: str, folder: Path) -> dict:
    import torch

    from atlasflow.core.config import load_config
    from atlasflow.model.sizing import checkpoint_size
    from atlasflow.model.train import Trainer
    from atlasflow.prep.genes import Vocabulary

    config = load_config(overrides={"model.preset": preset, "genes.vocab_path": VOCAB, "training.device": "cpu"})
    vocab = Vocabulary.load(VOCAB)
    t0 = time.perf_counter()
    trainer = Trainer(config, vocab)
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    trainer.optimizer.step()  # AdamW's moments exist from the first step on
    build = time.perf_counter() - t0
    path = folder / "ckpt"
    t0 = time.perf_counter()
    trainer.save(path)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.save(path)  # replaces the previous one: what every intra-batch checkpoint does
    second = time.perf_counter() - t0
    files = {f.name: f.stat().st_size for f in path.iterdir()}
    est = checkpoint_size(config, len(vocab))
    # the trainer has no replay reservoir or held-out sets yet; the gene statistics are estimated
    # uncompressed (int64) and stored compressed, so weights + optimizer are compared on their own
    tensors = files["model.pt"] + files["state.pt"]
    written = sum(files.values())
    return {"preset": preset, "build_and_step_s": round(build, 2), "first_save_s": round(first, 2),
            "replacing_save_s": round(second, 2), "bytes": written, "files": files,
            "estimate_weights_optimizer_bytes": est.weights + est.optimizer,
            "weights_optimizer_written_over_estimate": round(tensors / (est.weights + est.optimizer), 4),
            "estimate_stats_bytes": est.stats, "write_mb_per_s": round(written / 1e6 / second, 1),
            "peak_rss_mb": _rss_mb()}


def _train(n_cells: int, folder: Path) -> dict:
    import torch

    from atlasflow.core.config import load_config
    from atlasflow.intake.manifest import Dataset
    from atlasflow.model.train import train_batch
    from atlasflow.prep.genes import Vocabulary
    from atlasflow.prep.process import process_dataset
    from atlasflow_testing.realdata import pbmc_counts, resample

    torch.set_num_threads(os.cpu_count() or 1)
    # the PBMCs' 765 genes are 4 % of the human vocabulary: the coverage gate is for real datasets
    config = load_config(overrides={"genes.vocab_path": VOCAB, "qc.min_genes": 10, "qc.min_vocab_coverage": 0,
                                    "training.val_fraction": 0.0, "training.checkpoint_every_steps": 10**6,
                                    "training.device": "cpu", "integration.enabled": False})
    vocab = Vocabulary.load(VOCAB)
    raw = folder / "raw"
    raw.mkdir(parents=True)
    resample(pbmc_counts(), n_cells, seed=1).write_h5ad(raw / "data.h5ad")
    batch = folder / "batch_0000"
    process_dataset(raw, Dataset("bench", "https://h/x.h5ad", "direct", 2), out_path=batch / "bench.h5ad",
                    config=config, vocab=vocab, cache_dir=folder / "c")
    load = os.getloadavg()[0]
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    result = train_batch(config, vocab, batch, folder / "out")
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    # on a shared machine the wall time depends on the neighbours: CPU seconds do not
    return {"preset": "cpu", "cells": result["cells_seen"], "seconds": round(seconds, 1),
            "cells_per_s": round(result["cells_seen"] / seconds, 1), "cpu_seconds": round(cpu, 1),
            "cells_per_cpu_s": round(result["cells_seen"] / cpu, 1), "n_parameters": result["n_parameters"],
            "includes": "streaming + tokenising + training steps + end-of-batch evaluation and checkpoint",
            "cpus": os.cpu_count(), "load_average_at_start": round(load, 2), "peak_rss_mb": _rss_mb()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="cpu,gpu-small,gpu-large")
    parser.add_argument("--train-cells", type=int, default=5000, help="cells of the cpu-preset training run (0: skip)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, a, b = args.child
        row = _save(a, Path(b)) if mode == "save" else _train(int(a), Path(b))
        sys.stdout.write(json.dumps(row) + "\n")
        return row

    def child(*parts: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", *parts], check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    result: dict = {"benchmark": "checkpoint_cost", "vocabulary": VOCAB, "cpus": os.cpu_count(),
                    "gpu_throughput_formula": "cells/s = peak bf16 FLOP/s x assumed MFU / training FLOPs per cell "
                                              "(atlasflow.model.sizing.training_flops_per_cell)",
                    "peak_bf16_flops": PEAK_BF16, "assumed_mfu": ASSUMED_MFU, "presets": []}
    for preset in presets:
        row = _computed(preset)
        with tempfile.TemporaryDirectory(prefix="atlasflow-bench-ckpt-") as tmp:
            row["measured_save"] = child("save", preset, tmp)
        result["presets"].append(row)
        sys.stdout.write(f"{preset}: {json.dumps(row['measured_save'])}\n")
        sys.stdout.flush()
    if args.train_cells:
        with tempfile.TemporaryDirectory(prefix="atlasflow-bench-ckpt-") as tmp:
            result["cpu_training"] = child("train", str(args.train_cells), tmp)
        sys.stdout.write(f"cpu training: {json.dumps(result['cpu_training'])}\n")
    result["command"] = "benchmarks/checkpoint_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
