"""Incremental training on real cells: exact resume across batches and after a kill mid-batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from atlasflow.core.config import load_config
from atlasflow.model.data import split_datasets
from atlasflow.model.train import Trainer, linear_probe_accuracy, log_normalised_pca, train_batch
from atlasflow.prep.genes import Vocabulary
from atlasflow_testing.realdata import pbmc_counts, processed_batches

TINY = {"model.preset": "custom", "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 64,
        "model.max_genes": 64, "training.batch_cells": 32, "training.block_cells": 64, "training.warmup_steps": 3,
        "training.checkpoint_every_steps": 3, "qc.min_genes": 10,
        "genes.vocab_path": "builtin:pbmc68k"}  # the small vocabulary of these cells (the default is human)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Two batch folders of processed files (the contract's format), two datasets each, from real cells."""
    return processed_batches(tmp_path_factory.mktemp("batches"), config=load_config(overrides=TINY),
                             vocab=Vocabulary.builtin("pbmc68k"), cells=150)


def config_for(tmp_path: Path, **extra):
    return load_config(overrides={**TINY, "storage.base_dir": str(tmp_path / "base"), **extra})


def test_validation_holds_out_whole_datasets():
    train, val = split_datasets(["a", "b", "c", "d", "e"], val_fraction=0.2, seed=0)
    assert len(val) == 1 and not set(train) & set(val) and sorted(train + val) == ["a", "b", "c", "d", "e"]
    assert split_datasets(["a", "b", "c", "d", "e"], val_fraction=0.2, seed=0) == (train, val)
    assert split_datasets(["only"], val_fraction=0.5, seed=0) == (["only"], [])


@pytest.mark.slow


def test_batch0_then_batch1_from_checkpoint_equals_straight_through(batches, tmp_path):
    config, vocab = config_for(tmp_path, **{"training.epochs": 3}), Vocabulary.builtin("pbmc68k")
    straight = Trainer(config, vocab)
    straight.run_batch(batches / "batch_0000")
    straight.run_batch(batches / "batch_0001")

    first = Trainer(config, vocab)
    first.run_batch(batches / "batch_0000")
    first.save(tmp_path / "ckpt0")
    resumed = Trainer.load(tmp_path / "ckpt0", config, vocab)
    resumed.run_batch(batches / "batch_0001")

    a, b = np.array(straight.progress.losses), np.array(resumed.progress.losses)
    assert a.size == b.size > 10
    assert np.max(np.abs(a - b)) <= 1e-6
    assert a[-1] < a[0]  # it learns something
    metrics = resumed.progress.batches[-1]
    assert metrics["val_datasets"] and not set(metrics["val_datasets"]) & set(metrics["train_datasets"])
    assert 0 <= metrics["val_baseline_acc"] <= 1 and 0 <= metrics["val_masked_acc"] <= 1
    # forgetting: batch 0's held-out sample, kept in the checkpoint, is scored again after batch 1
    assert set(metrics["forgetting"]) == {"batch_0000", "batch_0001"}
    assert metrics["forgetting"] == straight.progress.batches[-1]["forgetting"]
    probe = metrics["probe"]
    assert probe["classes"] >= 2 and 0 < probe["cls_probe_acc"] <= 1 and 0 < probe["pca50_probe_acc"] <= 1


def test_checkpoint_refuses_a_different_vocabulary_or_model(batches, tmp_path):
    config, vocab = config_for(tmp_path), Vocabulary.builtin("pbmc68k")
    trainer = Trainer(config, vocab)
    trainer.run_batch(batches / "batch_0000")
    trainer.save(tmp_path / "ckpt")
    other = Vocabulary.from_genes(["A", "B"])
    with pytest.raises(ValueError, match="trained on vocabulary"):
        Trainer.load(tmp_path / "ckpt", config, other)
    with pytest.raises(ValueError, match="model section"):
        Trainer.load(tmp_path / "ckpt", config.with_overrides({"model.d_model": 64}), vocab)


class _Payload:
    """Unpickling this runs ``os.system``: what a crafted checkpoint from another cluster user could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_load_never_unpickles_code(batches, tmp_path):
    import torch

    config, vocab = config_for(tmp_path), Vocabulary.builtin("pbmc68k")
    trainer = Trainer(config, vocab)
    trainer.save(tmp_path / "ckpt")
    Trainer.load(tmp_path / "ckpt", config, vocab)  # the real one loads
    marker = tmp_path / "pwned"
    for name in ("state.pt", "model.pt"):
        good = (tmp_path / "ckpt" / name).read_bytes()
        torch.save({"optimizer": _Payload(marker)}, tmp_path / "ckpt" / name)
        with pytest.raises(ValueError, match=f"{name}: not a tensor-only checkpoint file"):
            Trainer.load(tmp_path / "ckpt", config, vocab)
        assert not marker.exists(), f"loading {name} ran the pickled command"
        (tmp_path / "ckpt" / name).write_bytes(good)
    # a checkpoint of the old, pickled format is refused with the reason, before any file is unpickled
    progress = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    (tmp_path / "ckpt" / "progress.json").write_text(json.dumps({**progress, "version": 2}))
    torch.save({"numpy": _Payload(marker)}, tmp_path / "ckpt" / "state.pt")
    with pytest.raises(ValueError, match="version 2 keeps its optimizer and RNG state as a Python pickle"):
        Trainer.load(tmp_path / "ckpt", config, vocab)
    assert not marker.exists()


def test_checkpoint_restores_every_rng_exactly(tmp_path):
    import random

    config, vocab = config_for(tmp_path), Vocabulary.builtin("pbmc68k")
    trainer = Trainer(config, vocab)
    np.random.seed(7), random.seed(7), np.random.standard_normal()  # a cached gaussian too
    trainer.save(tmp_path / "ckpt")
    expected = (np.random.standard_normal(3).tolist(), random.random(), trainer.generator.get_state().clone())
    np.random.seed(1), random.seed(1)
    loaded = Trainer.load(tmp_path / "ckpt", config, vocab)
    assert (np.random.standard_normal(3).tolist(), random.random()) == expected[:2]
    assert bool((loaded.generator.get_state() == expected[2]).all())


def _cli(config_path: Path, batch: Path, out: Path, resume: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "atlasflow.cli", "train", "--config", str(config_path), "--batch-dir", str(batch),
           "--out", str(out)]
    return cmd + (["--resume-from", str(resume)] if resume else [])


def _write_config(tmp_path: Path, **extra) -> Path:
    import yaml

    data: dict = {}
    for key, value in {**TINY, "storage.base_dir": str(tmp_path / "base"), **extra}.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow


def test_cli_writes_checkpoints_with_lineage(batches, tmp_path):
    cfg = _write_config(tmp_path)
    out0, out1 = tmp_path / "models" / "batch_0000", tmp_path / "models" / "batch_0001"
    r0 = json.loads(subprocess.run(_cli(cfg, batches / "batch_0000", out0), capture_output=True, text=True,
                                   check=True).stdout)
    r1 = json.loads(subprocess.run(_cli(cfg, batches / "batch_0001", out1, out0), capture_output=True, text=True,
                                   check=True).stdout)
    assert json.loads((out1 / "result.json").read_text()) == r1
    assert r0["parent_checkpoint"] is None and r1["parent_checkpoint"] == str(out0) and len(r1["parent_hash"]) == 16
    assert r1["global_step"] > r0["global_step"] and r1["cells_seen"] > r0["cells_seen"]
    assert r1["datasets_seen"] == ["d0", "d1", "d2", "d3"] and r1["vocab_version"] == Vocabulary.builtin("pbmc68k").version
    assert sorted(p.name for p in out1.iterdir()) == ["model.pt", "progress.json", "replay.npz", "result.json",
                                                      "rng.json", "state.pt", "stats.npz", "val_sets.npz"]
    # the reservoir after two batches is a sample of both batches' training cells
    assert r1["replay_reservoir_cells"] > 0 and r1["replay_cells_per_step"] > 0 == r0["replay_cells_per_step"]
    assert not (tmp_path / "models" / "batch_0001.partial").exists()
    # re-running a finished batch does no work and returns the same result
    again = subprocess.run(_cli(cfg, batches / "batch_0001", out1, out0), capture_output=True, text=True, check=True)
    assert json.loads(again.stdout) == r1


@pytest.mark.slow


def test_killed_job_resumes_from_its_intra_batch_checkpoint(batches, tmp_path):
    # the same thread count in this process (the reference) and in the job: exact only at the same count
    cfg = _write_config(tmp_path, **{"training.epochs": 30, "training.checkpoint_every_steps": 5,
                                     "training.threads": 1})
    reference = train_batch(load_config(cfg), Vocabulary.builtin("pbmc68k"), batches / "batch_0000", tmp_path / "ref")
    out = tmp_path / "run" / "batch_0000"
    proc = subprocess.Popen(_cli(cfg, batches / "batch_0000", out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out.with_name("batch_0000.partial") / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and not partial.exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists(), "the job finished before it could be killed; make it longer"
    interrupted_at = json.loads(partial.read_text())["global_step"]
    assert 0 < interrupted_at < reference["global_step"]
    # also as if killed between Trainer.save's two renames: only the moved-aside copy is left
    os.replace(partial.parent, out.with_name(".batch_0000.partial.old"))
    cmd = _cli(cfg, batches / "batch_0000", out)
    cmd.insert(cmd.index("train"), "-v")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    # the losses alone cannot tell a resume from a restart (both are exact): the log says where it began
    assert f"intra-batch checkpoint at step {interrupted_at}" in done.stderr
    assert not out.with_name(".batch_0000.partial.old").exists() and not partial.parent.exists()
    result = json.loads(done.stdout)
    assert result["global_step"] == reference["global_step"]
    ref_losses = json.loads((tmp_path / "ref" / "progress.json").read_text())["losses"]
    losses = json.loads((out / "progress.json").read_text())["losses"]
    assert np.max(np.abs(np.array(ref_losses) - np.array(losses))) <= 1e-6


@pytest.mark.slow


def test_embed_cli_adds_cell_and_gene_embeddings(batches, tmp_path):
    import anndata as ad

    cfg = _write_config(tmp_path)
    ckpt = tmp_path / "ckpt"
    subprocess.run(_cli(cfg, batches / "batch_0000", ckpt), capture_output=True, text=True, check=True)
    src = tmp_path / "cells.h5ad"
    pbmc_counts()[:40].copy().write_h5ad(src)
    done = subprocess.run([sys.executable, "-m", "atlasflow.cli", "embed", "--config", str(cfg), "--checkpoint",
                           str(ckpt), "--input", str(src), "--out", str(tmp_path / "emb.h5ad")],
                          capture_output=True, text=True, check=True)
    info = json.loads(done.stdout)
    out = ad.read_h5ad(tmp_path / "emb.h5ad")
    assert out.obsm["X_atlas"].shape == (40, 32) and info["genes_in_vocab"] == 765
    assert out.varm["X_atlas_gene"].shape == (765, 32) and np.abs(out.varm["X_atlas_gene"]).sum() > 0
    assert not np.allclose(out.obsm["X_atlas"][0], out.obsm["X_atlas"][1])  # cells differ


@pytest.mark.slow


def test_loader_workers_and_prefetch_leave_the_losses_unchanged(batches, tmp_path):
    """Two DataLoader workers (blocks handed over in reused shared buffers) and a prefetch thread feed
    the same steps as reading in the training process: the same losses, bit for bit."""
    vocab = Vocabulary.builtin("pbmc68k")
    losses = {}
    for workers, prefetch in ((0, 0), (2, 2)):
        trainer = Trainer(config_for(tmp_path, **{"training.epochs": 2, "training.loader_workers": workers,
                                                  "training.prefetch_steps": prefetch}), vocab)
        trainer.run_batch(batches / "batch_0000")
        losses[workers] = trainer.progress.losses
    assert len(losses[0]) >= 10 and losses[2] == losses[0]


def test_cell_type_head_trains_on_labelled_cells(batches, tmp_path):
    import torch

    types = "CD14+ Monocyte,CD19+ B,CD4+/CD25 T Reg,CD56+ NK,CD8+ Cytotoxic T,Dendritic"
    config = config_for(tmp_path, **{"model.cell_types": types, "model.cell_type_weight": 1.0, "training.epochs": 2})
    with_head = Trainer(config, Vocabulary.builtin("pbmc68k"))
    assert with_head.model.cell_head is not None and with_head.model.cell_head.out_features == 6
    with_head.run_batch(batches / "batch_0000")
    plain = Trainer(config_for(tmp_path, **{"training.epochs": 2}), Vocabulary.builtin("pbmc68k"))
    plain.run_batch(batches / "batch_0000")
    # the extra loss term is really there: same seed and data, different losses
    assert with_head.progress.losses != plain.progress.losses
    assert torch.any(with_head.model.cell_head.weight.grad != 0)


def test_pca_probe_baseline_on_pbmc68k_bulk_labels():
    """The baseline the cls probe is compared with scores about 0.80 on all 700 pbmc68k_reduced cells."""
    pbmc = pbmc_counts()
    labels = pbmc.obs["bulk_labels"].astype(str).to_numpy()
    acc = linear_probe_accuracy(log_normalised_pca(pbmc.X), labels)
    assert 0.75 <= acc <= 0.87, acc
    # and a probe on shuffled labels is near chance (10 classes, the largest ~0.14): the probe is not trivially high
    shuffled = np.random.default_rng(0).permutation(labels)
    assert linear_probe_accuracy(log_normalised_pca(pbmc.X), shuffled) < 0.3


# ---- issue 16 point 11: no kill leaves a half-deleted checkpoint that a retry would load ----------------------

_KILL_IN_RMTREE = """
import os, shutil, signal, sys
from pathlib import Path
from atlasflow.core.config import load_config
from atlasflow.model.train import train_batch
from atlasflow.prep.genes import Vocabulary

cfg, batch, out = map(Path, sys.argv[1:4])
real = shutil.rmtree

def rmtree_then_killed(path, *args, **kwargs):
    p = Path(path)
    # deleting the intra-batch checkpoint once the batch's own checkpoint is written: a file goes, then SIGKILL
    if "batch_0000.partial" in p.name and (out / "progress.json").exists() and (p / "model.pt").exists():
        (p / "model.pt").unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)

shutil.rmtree = rmtree_then_killed
train_batch(load_config(cfg), Vocabulary.builtin("pbmc68k"), batch, out)
"""


@pytest.mark.slow
def test_a_kill_while_the_intra_batch_checkpoint_is_deleted_leaves_a_retry_that_works(batches, tmp_path):
    from atlasflow.core.fsutil import prune_stale_temps

    cfg = _write_config(tmp_path)
    out = tmp_path / "models" / "batch_0000"
    done = subprocess.run([sys.executable, "-c", _KILL_IN_RMTREE, str(cfg), str(batches / "batch_0000"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    partial = out.with_name("batch_0000.partial")
    assert not partial.exists() or (partial / "model.pt").exists()  # never half-deleted under its own name
    # the retry finishes (or finds the batch done) without training it again from scratch
    retry = subprocess.run(_cli(cfg, batches / "batch_0000", out), capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stderr[-3000:]
    result = json.loads(retry.stdout)
    assert result["global_step"] > 0 and (out / "result.json").exists()
    # what the kill left is a temporary of a dead owner: pruned, and then nothing else is left over
    prune_stale_temps(tmp_path / "models")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["batch_0000"]


def test_a_half_deleted_intra_batch_checkpoint_is_discarded_not_loaded(batches, tmp_path, caplog):
    """What an older release's kill during rmtree(partial) left: the retry discards it and trains."""
    config = config_for(tmp_path)
    vocab = Vocabulary.builtin("pbmc68k")
    out = tmp_path / "models" / "batch_0000"
    trainer = Trainer(config, vocab)
    partial = out.with_name("batch_0000.partial")
    trainer.save(partial)
    (partial / "model.pt").unlink()
    (partial / "stats.npz").unlink()
    result = train_batch(config, vocab, batches / "batch_0000", out)
    assert result["global_step"] > 0 and not partial.exists()
    assert "discarding an incomplete intra-batch checkpoint (no model.pt, stats.npz)" in caplog.text
    assert sorted(p.name for p in out.parent.iterdir()) == ["batch_0000"]
