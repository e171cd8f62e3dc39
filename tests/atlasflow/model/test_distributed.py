"""Data-parallel training (DDP, gloo on CPU) under a real torchrun, against one process, on real cells.

Tolerance: the loss curve of 2 gloo ranks and of one process that accumulates the same global batch
(the same cells, masks and replay cells in every step: both deal the blocks to 2 shards) agree to
``LOSS_TOL`` = 1e-4 absolute per step. What differs is only float summation order (the all-reduce
adds two gradients where one process accumulates them; 1 vs 2 intra-op threads).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from atlasflow.core.config import load_config
from atlasflow.model.data import BatchData
from atlasflow.model.loader import Prefetch, shard_blocks
from atlasflow.model.tokenizer import Tokenizer
from atlasflow.model.train import train_batch
from atlasflow.prep.genes import Vocabulary
from atlasflow_testing.realdata import processed_batches

LOSS_TOL = 1e-4
TINY = {"model.preset": "custom", "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 64,
        "model.max_genes": 64, "model.cell_types": "CD14+ Monocyte,Dendritic,CD56+ NK,CD8+ Cytotoxic T",
        "training.batch_cells": 32, "training.block_cells": 32, "training.warmup_steps": 3,
        "training.checkpoint_every_steps": 4, "training.replay_cells": 200, "qc.min_genes": 10,
        "genes.vocab_path": "builtin:pbmc68k"}


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Two batch folders of processed real cells (two datasets each; one of them is held out)."""
    return processed_batches(tmp_path_factory.mktemp("ddp"), config=load_config(overrides=TINY),
                             vocab=Vocabulary.builtin("pbmc68k"), cells=170)


def _config(tmp_path: Path, name: str, **extra) -> Path:
    import yaml

    data: dict = {}
    for key, value in {**TINY, "storage.base_dir": str(tmp_path / "base"), **extra}.items():
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _torchrun(config: Path, batch: Path, out: Path, resume: Path | None, ranks: int = 2) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={ranks}",
           "-m", "atlasflow.cli", "-v", "train", "--config", str(config), "--batch-dir", str(batch), "--out", str(out)]
    return cmd + (["--resume-from", str(resume)] if resume else [])


def _losses(checkpoint: Path) -> np.ndarray:
    return np.array(json.loads((checkpoint / "progress.json").read_text())["losses"])


@pytest.fixture(scope="module")
def first_batch(batches, tmp_path_factory):
    """batch_0000 trained by one process: what batch_0001 resumes from (so it has replay cells)."""
    tmp = tmp_path_factory.mktemp("first")
    out = tmp / "batch_0000"
    train_batch(load_config(_config(tmp, "c", **{"training.epochs": 2})), Vocabulary.builtin("pbmc68k"),
                batches / "batch_0000", out)
    return out


def test_shards_and_workers_split_blocks_without_overlap(batches):
    """Two shards × two DataLoader workers: every training cell once, each shard in its own order."""
    config = load_config(overrides=TINY)
    vocab = Vocabulary.builtin("pbmc68k")
    tok = Tokenizer(len(vocab), 64, config.model.n_bins)
    data = BatchData(batches / "batch_0000", vocab, tok, seed=0, block_cells=32, val_fraction=0.0)
    whole = np.concatenate([c.tokens for c in data.stream(epoch=1)])
    per_shard = []
    for shard in range(2):
        inline = np.concatenate([c.tokens for c in shard_blocks(data, epoch=1, start_cell=0, shard=shard, shards=2,
                                                                workers=0)])
        forked = np.concatenate([c.tokens for c in shard_blocks(data, epoch=1, start_cell=0, shard=shard, shards=2,
                                                                workers=2)])
        np.testing.assert_array_equal(inline, forked)  # the workers give the shard's own order back
        resumed = np.concatenate([c.tokens for c in shard_blocks(data, epoch=1, start_cell=45, shard=shard, shards=2,
                                                                 workers=2)])
        np.testing.assert_array_equal(resumed, inline[45:])
        per_shard.append(inline)
    assert [len(s) for s in per_shard] == data.shard_cells(epoch=1, shards=2)
    assert sum(len(s) for s in per_shard) == len(whole) == data.n_train_cells
    rows = lambda a: {r.tobytes() for r in a}  # noqa: E731
    assert not rows(per_shard[0]) & rows(per_shard[1])  # disjoint
    assert rows(per_shard[0]) | rows(per_shard[1]) == rows(whole)


def test_prefetch_keeps_order_and_raises_the_producers_error():
    def produce():
        yield from range(5)
        raise OSError("disk gone")

    feed = Prefetch(produce(), depth=2)
    assert [next(feed) for _ in range(5)] == list(range(5))
    with pytest.raises(OSError, match="disk gone"):
        next(feed)
    feed.close()


@pytest.mark.slow
def test_two_gloo_ranks_give_the_loss_curve_of_one_process_with_the_same_global_batch(batches, first_batch, tmp_path):
    vocab = Vocabulary.builtin("pbmc68k")
    extra = {"training.epochs": 2}
    one = train_batch(load_config(_config(tmp_path, "one", **extra, **{"training.micro_batch_cells": 16})), vocab,
                      batches / "batch_0001", tmp_path / "one" / "batch_0001", resume_from=first_batch)
    two_out = tmp_path / "two" / "batch_0001"
    run = subprocess.run(_torchrun(_config(tmp_path, "two", **extra), batches / "batch_0001", two_out, first_batch),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((two_out / "result.json").read_text())
    assert (two["world_size"], two["data_shards"], one["world_size"], one["data_shards"]) == (2, 2, 1, 2)
    assert two["global_step"] == one["global_step"] and two["cells_seen"] == one["cells_seen"]
    assert two["replay_cells_per_step"] == one["replay_cells_per_step"] > 0  # the replay path ran, split by rank
    a, b = _losses(tmp_path / "one" / "batch_0001"), _losses(two_out)
    assert a.size == b.size > 20
    print(f"2 gloo ranks vs 1 process, {a.size} steps: max |loss difference| {np.max(np.abs(a - b)):.2e}")
    assert np.max(np.abs(a - b)) <= LOSS_TOL, np.max(np.abs(a - b))
    # rank 0 counted every rank's tokens: the per-gene baseline is the same as one process's
    assert two["val_per_gene_acc"] == pytest.approx(one["val_per_gene_acc"], abs=1e-9)
    assert not two_out.with_name("batch_0001.partial").exists()


@pytest.mark.slow
def test_two_rank_run_killed_mid_batch_resumes_on_two_ranks_or_one(batches, first_batch, tmp_path):
    vocab = Vocabulary.builtin("pbmc68k")
    extra = {"training.epochs": 12, "training.checkpoint_every_steps": 4}
    reference = train_batch(load_config(_config(tmp_path, "ref", **extra, **{"training.micro_batch_cells": 16})),
                            vocab, batches / "batch_0001", tmp_path / "ref" / "batch_0001", resume_from=first_batch)
    cfg = _config(tmp_path, "two", **extra)
    out = tmp_path / "run" / "batch_0001"
    partial = out.with_name("batch_0001.partial") / "progress.json"
    proc = subprocess.Popen(_torchrun(cfg, batches / "batch_0001", out, first_batch), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not partial.exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    # torchrun and both ranks, mid-batch, as a node failure would (each rank is in a session of its own)
    import psutil

    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        os.kill(p.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists(), "the job finished before it could be killed; make it longer"
    interrupted_at = json.loads(partial.read_text())["global_step"]
    assert json.loads(partial.read_text())["data_shards"] == 2
    copy = tmp_path / "copy" / "batch_0001"
    shutil.copytree(partial.parent, copy.with_name("batch_0001.partial"))

    # one process without micro_batch_cells would deal the cells to 1 shard: refused, saying what to set
    with pytest.raises(ValueError, match=r"changes the cell order.*micro_batch_cells = 16"):
        train_batch(load_config(_config(tmp_path, "plain", **extra)), vocab, batches / "batch_0001", copy,
                    resume_from=first_batch)

    done = subprocess.run(_torchrun(cfg, batches / "batch_0001", out, first_batch), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"intra-batch checkpoint at step {interrupted_at}" in done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["global_step"] == reference["global_step"] > interrupted_at
    assert np.max(np.abs(_losses(out) - _losses(tmp_path / "ref" / "batch_0001"))) <= LOSS_TOL

    # the same checkpoint resumed by one process accumulating 2 micro-batches: the same cell order, handled
    single = train_batch(load_config(_config(tmp_path, "one", **extra, **{"training.micro_batch_cells": 16})), vocab,
                         batches / "batch_0001", copy, resume_from=first_batch)
    assert single["global_step"] == reference["global_step"] and single["world_size"] == 1
    assert np.max(np.abs(_losses(copy) - _losses(tmp_path / "ref" / "batch_0001"))) <= LOSS_TOL
