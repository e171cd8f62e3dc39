"""The training feed: cells/s into tensors with 0/1/2 DataLoader workers, and training steps/s fed
synchronously vs ahead (workers + prefetch thread), with a model small enough to be loader-bound
and with the cpu preset.

Data: Poisson-resampled real cells (scanpy's pbmc68k_reduced) through atlasflow's own QC into the
processed-h5ad contract (as ``model_training``). Every figure is the median of ``--repeats`` runs
with its spread ((max − min) / median); the load average before and after is recorded, since the
2-core machine this runs on is shared.

- ``feed``: block-shuffled reads + tokenisation + cutting into 64-cell steps + tensors (tokens,
  bins, dense expression), worker start-up included; ``workers=0`` reads in the training process.
  Repeats are interleaved (0, 1, 2 workers, then again), each in a fresh interpreter (the memory
  allocator's state left by earlier work moved in-process reading by ~20 %). ``ceiling_two_processes`` is what the
  machine allows: the same reading and tokenising split between two independent processes, over
  one process (on a shared 2-core VM it has measured 1.76–2.08: the cores share caches and memory bandwidth, and the host is not quiet).
  ``after_first_block`` counts from the first block's arrival to the end: the steady state an
  epoch of millions of cells sees, without the workers' start-up (fork, first block) that a pass
  over 100,000 cells (~5 s) still feels a little.
- ``training``: steps/s between the first and the last step (``Trainer.on_step`` timestamps) of one
  epoch; ``compute_only`` repeats one cached step (no loading at all), the ceiling; the loader share
  is ``1 − compute_only / synchronous`` steps/s. ``loader_share_own_core`` gives loading a core of its
  own (1 compute thread, 1 loader worker) against ``compute_only`` with 1 thread: near 0, training runs
  at the pace of its compute. With 2 threads the compute takes both cores of this machine, and workers
  and compute can only take turns.

Run: ``make bench BENCH=loader`` or ``python benchmarks/loader.py [--cells 100000] [--repeats 3]
[--only feed|training]`` (one part; the other's figures stay as the last run left them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_training import _make_batch  # noqa: E402  (the same processed cells as the model benchmark)

RESULTS = Path(__file__).resolve().parent / "results"
TINY = {"model.preset": "custom", "model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 32,
        "model.max_genes": 128}


def _summary(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": round(med, 2), "runs": [round(v, 2) for v in values],
            "spread": round((max(values) - min(values)) / med, 3) if med else None}


def _config(**extra: object):
    from atlasflow.core.config import load_config

    return load_config(overrides={"genes.vocab_path": "builtin:pbmc68k", "training.val_fraction": 0.0,
                                  "training.replay_cells": 0, "training.checkpoint_every_steps": 1_000_000,
                                  "training.eval_cells": 10, "training.block_cells": 2048, **extra})


def _feed_data(batch: Path):
    from atlasflow.model.data import BatchData
    from atlasflow.model.tokenizer import Tokenizer
    from atlasflow.prep.genes import Vocabulary

    config = _config()
    vocab = Vocabulary.builtin("pbmc68k")
    tok = Tokenizer(len(vocab), config.model.sizes()["max_genes"], config.model.n_bins)
    return BatchData(batch, vocab, tok, seed=0, block_cells=config.training.block_cells, val_fraction=0.0)


def _feed(batch: Path, workers: int) -> tuple[float, float]:
    """(cells/s from the start, worker start-up included; cells/s once the first block is in)."""
    import torch

    from atlasflow.model.data import rebatch
    from atlasflow.model.loader import shard_blocks

    data = _feed_data(batch)
    block = data.block_cells
    t0 = time.perf_counter()
    n, t_first = 0, 0.0
    blocks = shard_blocks(data, epoch=0, start_cell=0, shard=0, shards=1, workers=workers, prefetch_blocks=2)
    for _, cells in rebatch(blocks, batch_cells=64):
        torch.from_numpy(cells.tokens), torch.from_numpy(cells.bins), torch.from_numpy(cells.expr.toarray())
        n += len(cells)
        if not t_first and n >= block:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return n / (t_end - t0), (n - block) / (t_end - t_first)


def _fresh(fn, *args):
    """``fn(*args)`` in a new interpreter: the allocator's state left by earlier work (glibc raises its
    mmap threshold after large frees) changed in-process reading by ~20 %, so every figure starts alike."""
    from multiprocessing import get_context

    ctx = get_context("spawn")
    results = ctx.SimpleQueue()
    child = ctx.Process(target=_call, args=(results, fn, args))  # not a Pool's: its own workers are children
    child.start()
    value = results.get()
    child.join()
    if isinstance(value, BaseException):
        raise value
    return value


def _call(results, fn, args) -> None:
    try:
        results.put(fn(*args))
    except Exception as exc:  # handed to the parent, raised there
        results.put(exc)


def _read_share(args: tuple[Path, int, int]) -> int:
    batch, worker, workers = args
    return sum(len(cells) for cells in _feed_data(batch).stream(epoch=0, worker=worker, workers=workers))


def _two_processes(batch: Path) -> float:
    """The machine's ceiling for 2 workers: the same blocks read and tokenised by two independent
    processes (no DataLoader, no hand-over, no consumer), cells/s from the start of both to the end of
    the slower, over one such process doing all of it (each process warmed by one pass first)."""
    from multiprocessing import get_context

    rates = {}
    for n in (1, 2):
        shares = [(batch, w, n) for w in range(n)]
        with get_context("fork").Pool(n) as pool:
            pool.map(_read_share, shares)  # warm: fork, imports and the allocator out of the figure
            t0 = time.perf_counter()
            rates[n] = sum(pool.map(_read_share, shares)) / (time.perf_counter() - t0)
    return rates[2] / rates[1]


def _train(batch: Path, model: dict, *, workers: int, prefetch: int, threads: int | None = None) -> float:
    from atlasflow.model.threads import torch_threads
    from atlasflow.model.train import Trainer
    from atlasflow.prep.genes import Vocabulary

    with torch_threads(threads):
        trainer = Trainer(_config(**model, **{"training.loader_workers": workers, "training.prefetch_steps": prefetch}),
                          Vocabulary.builtin("pbmc68k"))
        stamps: list[float] = []
        trainer.on_step = lambda *_: stamps.append(time.perf_counter())
        trainer.run_batch(batch)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _compute_only(batch: Path, model: dict, steps: int = 60, threads: int | None = None) -> float:
    from atlasflow.model.threads import torch_threads

    with torch_threads(threads):
        return _compute_only_steps(batch, model, steps)


def _compute_only_steps(batch: Path, model: dict, steps: int) -> float:
    import torch

    from atlasflow.model.data import BatchData
    from atlasflow.model.train import Trainer
    from atlasflow.prep.genes import Vocabulary

    trainer = Trainer(_config(**model), Vocabulary.builtin("pbmc68k"))
    data = BatchData(batch, trainer.vocab, trainer.tokenizer, seed=0, block_cells=2048, val_fraction=0.0)
    _, cells = next(data.batches(epoch=0, batch_cells=64))
    micro = trainer._tensors(cells, len(cells), pin=False)
    t0 = 0.0
    for i in range(steps + 5):
        if i == 5:  # after warm-up
            t0 = time.perf_counter()
        loss = trainer._loss(micro, torch.rand((len(cells), trainer.tokenizer.seq_len))).total
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000, help="cells of the feed measurement")
    parser.add_argument("--train-cells", type=int, default=6_000, help="cells of each training run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("feed", "training"), default=None,
                        help="run one part; the other part's figures are kept from the last results file")
    args = parser.parse_args(argv)
    result: dict = {"benchmark": "loader", "data": "Poisson-resampled pbmc68k_reduced cells", "cpus": os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in os.getloadavg()],
                    "command": f"python benchmarks/loader.py --cells {args.cells} --train-cells {args.train_cells} "
                               f"--repeats {args.repeats}" + (f" --only {args.only}" if args.only else "")}
    if args.only and (RESULTS / "loader.json").exists():
        kept = json.loads((RESULTS / "loader.json").read_text())
        part = "training_steps_per_s" if args.only == "feed" else "feed_cells_per_s"
        if part in kept:
            result[part] = {**kept[part], "command": kept[part].get("command", kept.get("command"))}
    with tempfile.TemporaryDirectory(prefix="atlasflow-bench-loader-") as tmp:
        if args.only != "training":
            _feed_part(result, Path(tmp), args)
        if args.only != "feed":
            _training_part(result, Path(tmp), args)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    _write(result)
    return result


def _feed_part(result: dict, tmp: Path, args: argparse.Namespace) -> None:
    big = _make_batch(args.cells, tmp / "feed")
    runs: dict[int, list[float]] = {0: [], 1: [], 2: []}
    steady: dict[int, list[float]] = {0: [], 1: [], 2: []}
    ratios, steady_ratios, ceilings = [], [], []
    for _ in range(args.repeats):  # interleaved, so a change of load hits every setting alike
        for workers in runs:
            whole, after_first = _fresh(_feed, big, workers)
            runs[workers].append(whole)
            steady[workers].append(after_first)
        ratios.append(runs[2][-1] / runs[0][-1])
        steady_ratios.append(steady[2][-1] / steady[0][-1])
        ceilings.append(_fresh(_two_processes, big))
        sys.stdout.write(f"feed cells/s by workers: { {w: round(r[-1]) for w, r in runs.items()} }, after the "
                         f"first block { {w: round(r[-1]) for w, r in steady.items()} }, 2 independent "
                         f"processes: {ceilings[-1]:.2f}x\n")
        sys.stdout.flush()
    feed: dict = {f"workers_{w}": _summary(r) for w, r in runs.items()}
    feed["speedup_2_vs_0"] = round(feed["workers_2"]["median"] / feed["workers_0"]["median"], 2)
    feed["speedup_1_vs_0"] = round(feed["workers_1"]["median"] / feed["workers_0"]["median"], 2)
    feed["speedup_2_vs_0_per_repeat"] = _summary(ratios)
    # the same once the first block is in: worker start-up (fork, first block) out of the figure
    feed["after_first_block"] = {f"workers_{w}": _summary(r) for w, r in steady.items()}
    feed["after_first_block"]["speedup_2_vs_0_per_repeat"] = _summary(steady_ratios)
    feed["ceiling_two_processes"] = _summary(ceilings)
    result["feed_cells_per_s"] = {"cells": args.cells, "block_cells": 2048, "step_cells": 64,
                                  "command": result["command"], **feed}
    _write(result)  # the feed's figures survive an interrupted training phase


def _training_part(result: dict, tmp: Path, args: argparse.Namespace) -> None:
    small = _make_batch(args.train_cells, tmp / "train")
    training: dict = {"cells": args.train_cells, "step_cells": 64, "command": result["command"]}
    for name, model in (("tiny (loader-bound)", TINY), ("cpu preset", {"model.preset": "cpu"})):
        row: dict = {"compute_only": _summary([_compute_only(small, model) for _ in range(args.repeats)])}
        for label, workers, prefetch in (("synchronous", 0, 0), ("prefetch_thread", 0, 2),
                                         ("workers_2_prefetch", 2, 2)):
            row[label] = _summary([_train(small, model, workers=workers, prefetch=prefetch)
                                   for _ in range(args.repeats)])
        # loading on a core of its own: one compute thread, one loader worker; "own core" share near 0
        # means training runs at the pace its compute allows (on 2 cores the rows above cannot show it:
        # the compute uses both cores, so workers and compute take turns)
        row["compute_only_1_thread"] = _summary([_compute_only(small, model, threads=1) for _ in range(args.repeats)])
        row["workers_1_prefetch_1_thread"] = _summary([_train(small, model, workers=1, prefetch=2, threads=1)
                                                       for _ in range(args.repeats)])
        sync, ceiling = row["synchronous"]["median"], row["compute_only"]["median"]
        row["loader_share_synchronous"] = round(1 - sync / ceiling, 3)
        row["loader_share_workers_2"] = round(1 - row["workers_2_prefetch"]["median"] / ceiling, 3)
        row["speedup_workers_2_vs_synchronous"] = round(row["workers_2_prefetch"]["median"] / sync, 2)
        row["loader_share_own_core"] = round(
            1 - row["workers_1_prefetch_1_thread"]["median"] / row["compute_only_1_thread"]["median"], 3)
        training[name] = row
        result["training_steps_per_s"] = training
        _write(result)
        sys.stdout.write(f"training steps/s, {name}: {row}\n")
        sys.stdout.flush()


def _write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "loader.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(RESULTS / "loader.json")


if __name__ == "__main__":
    main()
