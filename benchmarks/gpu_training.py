"""GPU training throughput of the gpu preset with the human vocabulary: cells/s, tokens/s, MFU, peak
memory, data-loader stall share and checkpoint seconds, on 1 GPU and on every visible GPU (DDP under
torchrun), plus the first steps' fp32 losses on the GPU beside the CPU's.

Without CUDA it prints why and writes ``benchmarks/results/gpu_training.json`` with ``"skipped": true``
and the figures that need no GPU (parameters, model FLOPs per cell, checkpoint bytes), exit code 0.

MFU (model FLOPs utilisation) = model FLOPs per second / the device's peak dense bf16 FLOPs.
Model FLOPs of one training step (forward + backward = 3 × forward; every position of every
sequence counts, padding included, since the network computes it)::

    per position: 2 · P_pos + 4 · L · S · d      P_pos = L · (4d² + 2·d·d_ff) + d · n_bins
                                                 (QKV, output projection and feed-forward matmuls,
                                                 the bin head; 4·S·d per layer: QKᵀ and attention × V)
    per cell:     2 · (d² + G · d)               the expression decoder on the cls embedding
    step FLOPs = 3 · cells · (S · (2·P_pos + 4·L·S·d) + 2·(d² + G·d))

with L layers, width d, feed-forward width d_ff, S = max_genes + 1 positions, G vocabulary genes.
Embedding look-ups, norms, softmax and the optimizer are left out (the usual ~6·N·tokens
convention plus the attention term). Peak dense bf16 by device name: :data:`PEAK_BF16_TFLOPS`.

Run on a GPU machine: ``make bench BENCH=gpu_training`` (unchanged on 1 GPU or 8).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = "builtin:human_grch38_ens100"
#: Dense (no sparsity) bf16 tensor-core peak, TFLOPS, from the vendors' data sheets; matched in order
#: against ``torch.cuda.get_device_name()``; a device not listed gets no MFU (said so in the JSON).
PEAK_BF16_TFLOPS = (
    ("B200", 2250.0), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("A6000", 154.8), ("A40", 149.7),
    ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
)
MFU_FORMULA = ("mfu = 3·cells·(S·(2·P_pos + 4·L·S·d) + 2·(d² + G·d)) · steps/s / (peak dense bf16 FLOPS × GPUs); "
               "P_pos = L·(4d² + 2·d·d_ff) + d·n_bins, S = max_genes + 1 (padding included), G = vocabulary genes")
PER_GPU_CELLS = 64  # cells per step per GPU (the preset's batch_cells on one GPU)


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def step_flops(config, n_genes: int, cells: int) -> float:
    """Model FLOPs of one training step of ``cells`` cells: :func:`atlasflow.model.sizing.training_flops_per_cell`."""
    from atlasflow.model.sizing import training_flops_per_cell

    return float(training_flops_per_cell(config, n_genes) * cells)


def _config(**extra: object):
    from atlasflow.core.config import load_config

    return load_config(overrides={"model.preset": "gpu", "genes.vocab_path": VOCAB, "training.val_fraction": 0.0,
                                  "training.replay_cells": 0, "training.checkpoint_every_steps": 1_000_000,
                                  "training.eval_cells": 10, "training.warmup_steps": 5, "qc.min_genes": 10,
                                  "qc.min_vocab_coverage": 0.0,  # pbmc68k_reduced has 765 of the 19,927 genes
                                  **extra})


def _static() -> dict:
    """What needs no GPU: the preset's size, its FLOPs per cell and its checkpoint bytes."""
    from atlasflow.model.sizing import checkpoint_size, n_parameters
    from atlasflow.prep.genes import Vocabulary

    config = _config()
    n_genes = len(Vocabulary.builtin(VOCAB.split(":", 1)[1]))
    size = checkpoint_size(config, n_genes)
    return {"preset": "gpu", "vocabulary": VOCAB, "n_genes": n_genes, "n_parameters": n_parameters(config, n_genes),
            "sizes": config.model.sizes(), "train_flops_per_cell": step_flops(config, n_genes, 1),
            "checkpoint_weights_optimizer_bytes": size.weights + size.optimizer}


def _make_batch(n_cells: int, folder: Path) -> Path:
    """Poisson-resampled pbmc68k_reduced cells, processed against the human vocabulary."""
    from atlasflow.prep.genes import Vocabulary
    from atlasflow_testing.realdata import processed_resampled_batch

    return processed_resampled_batch(n_cells, folder, config=_config(), vocab=Vocabulary.builtin(VOCAB.split(":", 1)[1]))


def _child_train(batch: Path, out: Path, warmup: int) -> None:
    """One rank of the throughput run (under torchrun for >1 GPU); rank 0 writes the figures to ``out``."""
    import torch

    from atlasflow.model.train import Trainer, process_group
    from atlasflow.prep.genes import Vocabulary

    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = _config(**{"training.batch_cells": PER_GPU_CELLS * world, "training.device": "cuda"})
    with process_group(config) as (rank, world):
        trainer = Trainer(config, Vocabulary.builtin(VOCAB.split(":", 1)[1]))
        stamps: list[float] = []
        trainer.on_step = lambda *_: (torch.cuda.synchronize(), stamps.append(time.perf_counter()))
        torch.cuda.reset_peak_memory_stats()
        metrics = trainer.run_batch(batch)
        if rank != 0:
            return
        peak = torch.cuda.max_memory_allocated()
        t0 = time.perf_counter()
        trainer.save(out.parent / "checkpoint")
        save_s = time.perf_counter() - t0
        ckpt_bytes = sum(f.stat().st_size for f in (out.parent / "checkpoint").rglob("*") if f.is_file())
        timed = stamps[warmup:]
        steps_per_s = (len(timed) - 1) / (timed[-1] - timed[0])
        n_genes = len(trainer.vocab)
        device = torch.cuda.get_device_name(trainer.device)
        peak_tflops = peak_bf16_tflops(device)
        cells_step = PER_GPU_CELLS * world
        flops_s = step_flops(config, n_genes, cells_step) * steps_per_s
        row = {"gpus": world, "device": device, "steps_timed": len(timed) - 1, "cells_per_step": cells_step,
               "steps_per_s": round(steps_per_s, 3), "cells_per_s": round(cells_step * steps_per_s, 1),
               "positions_per_s": round(cells_step * trainer.tokenizer.seq_len * steps_per_s),
               "model_tflops_per_s": round(flops_s / 1e12, 2), "peak_bf16_tflops_per_gpu": peak_tflops,
               "mfu": round(flops_s / (peak_tflops * 1e12 * world), 4) if peak_tflops else None,
               "peak_gpu_memory_gb_rank0": round(peak / 1e9, 2),
               "loader_stall_share": metrics.get("loader_wait_share"), "loader_workers": metrics.get("loader_workers"),
               "checkpoint_save_s": round(save_s, 2), "checkpoint_bytes": ckpt_bytes,
               "n_parameters": trainer.model.n_parameters()}
        out.write_text(json.dumps(row) + "\n")


def _child_first_steps(batch: Path, out: Path, device: str) -> None:
    """The first steps' losses in fp32 (no bf16, no TF32) on ``device``."""
    from atlasflow.model.train import Trainer
    from atlasflow.prep.genes import Vocabulary

    config = _config(**{"training.device": device, "training.bf16": False, "training.tf32": False,
                        "training.batch_cells": 8, "training.loader_workers": 0})
    trainer = Trainer(config, Vocabulary.builtin(VOCAB.split(":", 1)[1]))
    trainer.run_batch(batch)
    out.write_text(json.dumps({"device": device, "losses": trainer.progress.losses}) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, *rest = args.child
        if mode == "train":
            _child_train(Path(rest[0]), Path(rest[1]), int(rest[2]))
        else:
            _child_first_steps(Path(rest[0]), Path(rest[1]), rest[2])
        return {}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "gpu_training.json"
    import torch

    result: dict = {"benchmark": "gpu_training", **_static(), "mfu_formula": MFU_FORMULA}
    if not torch.cuda.is_available():
        reason = "no CUDA device visible to torch (torch.cuda.is_available() is False)"
        sys.stdout.write(f"gpu_training: skipped: {reason}\n")
        path.write_text(json.dumps({**result, "skipped": True, "reason": reason}, indent=1) + "\n")
        return result
    n_gpus = torch.cuda.device_count()
    result.update({"skipped": False, "visible_gpus": n_gpus, "device": torch.cuda.get_device_name(0),
                   "torch": torch.__version__, "cuda": torch.version.cuda, "runs": []})
    with tempfile.TemporaryDirectory(prefix="atlasflow-bench-gpu-") as tmp:
        for gpus in sorted({1, n_gpus}):  # the same number of steps either way: N GPUs read N × the cells
            batch = _make_batch(PER_GPU_CELLS * gpus * (args.steps + args.warmup + 1), Path(tmp) / f"data{gpus}")
            out = Path(tmp) / f"run{gpus}" / "row.json"
            out.parent.mkdir()
            child = [__file__, "--child", "train", str(batch), str(out), str(args.warmup)]
            launch = [sys.executable, *child] if gpus == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc_per_node={gpus}", *child]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"} if gpus == 1 else dict(os.environ)
            subprocess.run(launch, check=True, env=env)
            row = json.loads(out.read_text())
            result["runs"].append(row)
            sys.stdout.write(f"{gpus} GPU(s): {row}\n")
            sys.stdout.flush()
        first = _make_batch(24, Path(tmp) / "first")
        losses = {}
        for device in ("cuda", "cpu"):
            out = Path(tmp) / f"first_{device}.json"
            subprocess.run([sys.executable, __file__, "--child", "first", str(first), str(out), device], check=True)
            losses[device] = json.loads(out.read_text())["losses"]
        diffs = [abs(a - b) for a, b in zip(losses["cuda"], losses["cpu"], strict=True)]
        result["fp32_first_steps"] = {"cells_per_step": 8, "cuda": losses["cuda"], "cpu": losses["cpu"],
                                      "max_abs_difference": max(diffs) if diffs else None}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
