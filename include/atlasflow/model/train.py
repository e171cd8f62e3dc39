"""Incremental training, one batch at a time, with checkpoints that resume exactly.

A :class:`Trainer` holds everything training depends on — weights, optimizer, scheduler, the
masking RNG, step counters, loss history and lineage — and saves all of it. Training batch 0,
saving, loading and training batch 1 therefore gives the same numbers as training both in one
go; an intra-batch checkpoint every ``training.checkpoint_every_steps`` steps lets a killed job
resume where it was (the data order is a pure function of seed, batch and epoch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atlasflow.config import AtlasConfig
from atlasflow.fsutil import write_json_atomic
from atlasflow.genes import Vocabulary
from atlasflow.model.data import BatchData
from atlasflow.model.network import AtlasTransformer
from atlasflow.model.tokenizer import Tokenizer

__all__ = ["Trainer", "embed_file", "linear_probe_accuracy", "log_normalised_pca", "train_batch"]

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1


@dataclass
class Progress:
    """Counters and history saved with every checkpoint."""

    global_step: int = 0
    batch_id: str | None = None  # the batch being (or last) trained
    epoch: int = 0  # within the current batch
    step_in_epoch: int = 0
    batch_done: bool = False
    losses: list[float] = field(default_factory=list)  # every step, all batches
    batches: list[dict[str, Any]] = field(default_factory=list)  # per finished batch: id, steps, metrics
    datasets_seen: list[str] = field(default_factory=list)
    cells_seen: int = 0
    parent: str | None = None  # hash of the checkpoint this one grew from


def _device(config: AtlasConfig) -> torch.device:
    if config.training.device == "cuda" or (config.training.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


class Trainer:
    """Model + optimisation state for incremental training; see the module docstring."""

    def __init__(self, config: AtlasConfig, vocab: Vocabulary) -> None:
        self.config = config
        self.vocab = vocab
        sizes = config.model.sizes()
        self.tokenizer = Tokenizer(len(vocab), sizes["max_genes"], config.model.n_bins)
        self.device = _device(config)
        torch.manual_seed(config.training.seed)  # initial weights depend on the seed only
        self.model = AtlasTransformer(n_tokens=self.tokenizer.n_tokens, n_bins=config.model.n_bins,
                                      d_model=sizes["d_model"], n_layers=sizes["n_layers"], n_heads=sizes["n_heads"],
                                      d_ff=sizes["d_ff"], dropout=config.model.dropout,
                                      n_cell_types=len(config.model.cell_type_labels())).to(self.device)
        t = config.training
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        warm = max(t.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        self.generator = torch.Generator().manual_seed(t.seed + 1)
        self.progress = Progress()
        # a small sample of every batch's validation cells, kept with the checkpoint so later
        # batches can measure forgetting after the processed files are cleaned up
        self.val_sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # the dataset id of every sampled validation cell, so atlas_retrain can split them by dataset
        self.val_datasets: dict[str, np.ndarray] = {}

    # ---- persistence -----------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write a complete checkpoint folder atomically (temp folder + rename)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(self.model.state_dict(), tmp / "model.pt")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(), "python": random.getstate()}, tmp / "state.pt")
        if self.val_sets:
            arrays = {f"{k}__{part}": arr for k, (t, b) in self.val_sets.items()
                      for part, arr in (("tokens", t), ("bins", b))}
            arrays.update({f"{k}__datasets": ids for k, ids in self.val_datasets.items() if k in self.val_sets})
            np.savez_compressed(tmp / "val_sets.npz", **arrays)
        write_json_atomic(tmp / "progress.json", {"version": CHECKPOINT_VERSION, "vocab_version": self.vocab.version,
                                                  "config": self.config.to_dict(), **asdict(self.progress)})
        # the previous checkpoint is moved aside, not deleted, until the new one is in place: a kill
        # at any moment leaves one complete checkpoint under ``path`` or its ``.old`` name
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: Path, config: AtlasConfig, vocab: Vocabulary) -> Trainer:
        meta = json.loads((path / "progress.json").read_text())
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: checkpoint version {meta.get('version')} is not {CHECKPOINT_VERSION}")
        if meta["vocab_version"] != vocab.version:
            raise ValueError(f"{path}: trained on vocabulary {meta['vocab_version']}, but {vocab.version} is in use")
        if meta["config"]["model"] != config.to_dict()["model"]:
            raise ValueError(f"{path}: the model section of the config changed since this checkpoint")
        trainer = cls(config, vocab)
        trainer.model.load_state_dict(torch.load(path / "model.pt", map_location=trainer.device, weights_only=True))
        state = torch.load(path / "state.pt", weights_only=False)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        fields = {k: meta[k] for k in Progress.__dataclass_fields__}
        trainer.progress = Progress(**fields)
        if (path / "val_sets.npz").exists():
            with np.load(path / "val_sets.npz") as z:
                names = sorted({k.rsplit("__", 1)[0] for k in z.files})
                trainer.val_sets = {n: (z[f"{n}__tokens"], z[f"{n}__bins"]) for n in names}
                # checkpoints written before dataset ids were kept have none
                trainer.val_datasets = {n: z[f"{n}__datasets"] for n in names if f"{n}__datasets" in z.files}
        return trainer

    # ---- training --------------------------------------------------------------------------------

    def _mask(self, tokens: torch.Tensor, bins: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        valid = tokens >= 3  # gene positions (not pad/cls/mask)
        n_valid = valid.sum(dim=1)
        k = torch.clamp(torch.round(n_valid * self.config.training.mask_ratio), min=1).long()
        scores = torch.rand(tokens.shape, generator=generator)
        scores[~valid] = 2.0
        ranks = scores.argsort(dim=1).argsort(dim=1)
        masked = (ranks < k[:, None]) & valid
        inputs = bins.masked_fill(masked, self.model.mask_bin)
        labels = bins.masked_fill(~masked, -100)
        return inputs, labels

    def _loss(self, tokens: np.ndarray, bins: np.ndarray, generator: torch.Generator,
              cell_labels: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(tokens)
        b = torch.from_numpy(bins)
        inputs, labels = self._mask(t, b, generator)
        t, inputs, labels = t.to(self.device), inputs.to(self.device), labels.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits, cls = self.model(t, inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        head = self.model.cell_head
        if head is not None and cell_labels is not None and (cell_labels >= 0).any():
            target = torch.from_numpy(cell_labels).to(self.device)
            loss = loss + self.config.model.cell_type_weight * F.cross_entropy(head(cls.float()), target, ignore_index=-100)
        return loss, logits, labels

    def run_batch(self, batch_dir: Path, *, checkpoint: Path | None = None) -> dict[str, Any]:
        """Train on one batch folder, continuing wherever the progress says; returns its metrics."""
        t = self.config.training
        data = BatchData(batch_dir, self.vocab, self.tokenizer, seed=t.seed, block_cells=t.block_cells,
                         val_fraction=t.val_fraction, cell_types=self.config.model.cell_type_labels())
        p = self.progress
        if p.batch_id != batch_dir.name or p.batch_done:
            p.batch_id, p.epoch, p.step_in_epoch, p.batch_done = batch_dir.name, 0, 0, False
        t0 = time.monotonic()
        first_step = p.global_step
        self.model.train()
        while p.epoch < t.epochs:
            for step, tokens, bins, cell_labels in data.batches(epoch=p.epoch, batch_cells=t.batch_cells,
                                                                start_step=p.step_in_epoch):
                loss, _, _ = self._loss(tokens, bins, self.generator, cell_labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.scheduler.step()
                p.losses.append(float(loss.detach()))
                p.global_step += 1
                p.step_in_epoch = step + 1
                p.cells_seen += int(tokens.shape[0])
                if checkpoint is not None and p.global_step % t.checkpoint_every_steps == 0:
                    self.save(checkpoint)  # intra-batch: a killed job resumes here
            p.epoch += 1
            p.step_in_epoch = 0
        steps = p.global_step - first_step
        metrics = self.evaluate(data)
        metrics.update({"batch_id": batch_dir.name, "steps": steps, "seconds": round(time.monotonic() - t0, 3),
                        "train_cells": data.n_train_cells,
                        "train_loss": float(np.mean(p.losses[-max(steps, 1):])) if p.losses else None,
                        "train_datasets": [f.dataset_id for f in data.train],
                        "val_datasets": [f.dataset_id for f in data.val]})
        p.datasets_seen = sorted(set(p.datasets_seen) | {f.dataset_id for f in data.train + data.val})
        p.batches.append(metrics)
        p.batch_done = True
        return metrics

    def masked_metrics(self, tokens: np.ndarray, bins: np.ndarray) -> dict[str, float]:
        """Masked-bin ``loss``, ``masked_acc`` and ``baseline_acc`` on these cells, with the masks every
        evaluation uses (so two checkpoints scored on the same cells are compared on the same positions)."""
        return self._masked_metrics(tokens.astype(np.int64), bins.astype(np.int64))

    @torch.no_grad()
    def _masked_metrics(self, tokens: np.ndarray, bins: np.ndarray) -> dict[str, float]:
        """Masked-bin loss/accuracy, and the most-frequent-bin baseline on the same masked positions."""
        self.model.eval()
        gen = torch.Generator().manual_seed(self.config.training.seed + 7)  # same masks every evaluation
        loss_sum, correct, total = 0.0, 0, 0
        counts = np.zeros(self.config.model.n_bins, dtype=np.int64)
        labels_all = []
        for lo in range(0, tokens.shape[0], 256):
            loss, logits, labels = self._loss(tokens[lo: lo + 256], bins[lo: lo + 256], gen)
            sel = labels != -100
            pred = logits.argmax(-1)[sel].cpu().numpy()
            lab = labels[sel].cpu().numpy()
            loss_sum += float(loss) * lab.size
            correct += int((pred == lab).sum())
            total += lab.size
            counts += np.bincount(lab, minlength=counts.size)
            labels_all.append(lab)
        self.model.train()
        labels = np.concatenate(labels_all)
        return {"loss": loss_sum / total, "masked_acc": correct / total,
                "baseline_acc": float((labels == counts.argmax()).mean())}

    @torch.no_grad()
    def embed_tokens(self, tokens: np.ndarray, bins: np.ndarray) -> np.ndarray:
        """cls embeddings, unmasked, ``float32[n_cells, d_model]``."""
        self.model.eval()
        out = []
        for lo in range(0, tokens.shape[0], 256):
            t = torch.from_numpy(tokens[lo: lo + 256]).to(self.device)
            b = torch.from_numpy(bins[lo: lo + 256]).to(self.device)
            out.append(self.model(t, b)[1].float().cpu().numpy())
        self.model.train()
        return np.concatenate(out) if out else np.zeros((0, self.model.head.in_features), np.float32)

    def evaluate(self, data: BatchData, *, sample_cells: int = 1000) -> dict[str, Any]:
        """Held-out metrics for this batch, forgetting on earlier batches' samples, and a linear probe.

        Every figure comes with its baseline from the same run and cells: masked-bin accuracy vs always
        predicting the most frequent bin; the cell-type probe on cls embeddings vs the same probe on
        PCA(50) of log-normalised counts.
        """
        out: dict[str, Any] = {"val_loss": None, "val_masked_acc": None, "val_baseline_acc": None, "val_cells": 0}
        if data.val:
            t_parts, b_parts = [], []
            for _, t, b, _ in data.batches(epoch=0, batch_cells=1024, split="val", shuffle=False):
                t_parts.append(t)
                b_parts.append(b)
            tokens, bins = np.concatenate(t_parts), np.concatenate(b_parts)
            m = self._masked_metrics(tokens, bins)
            out.update({"val_loss": m["loss"], "val_masked_acc": m["masked_acc"], "val_baseline_acc": m["baseline_acc"],
                        "val_cells": int(tokens.shape[0])})
            pick = np.sort(np.random.default_rng(self.config.training.seed).permutation(tokens.shape[0])[:sample_cells])
            self.val_sets[data.batch_dir.name] = (tokens[pick].astype(np.int32), bins[pick].astype(np.int16))
            # the unshuffled validation stream is the files in order, every cell once
            ids = np.repeat(np.array([f.dataset_id for f in data.val]), [f.n_cells for f in data.val])
            if ids.shape[0] == tokens.shape[0]:
                self.val_datasets[data.batch_dir.name] = ids[pick]
            out["probe"] = self._probe(data, tokens, bins)
        out["forgetting"] = {
            batch: round(self._masked_metrics(t.astype(np.int64), b.astype(np.int64))["masked_acc"], 4)
            for batch, (t, b) in sorted(self.val_sets.items())
        }
        return out

    def _probe(self, data: BatchData, tokens: np.ndarray, bins: np.ndarray) -> dict[str, Any] | None:
        """5-fold linear probe of cell type on cls embeddings vs on PCA(50) of log-normalised counts."""
        labels, counts = data.val_labels_and_counts("cell_type")
        if labels is None:
            return None
        classes, sizes = np.unique(labels, return_counts=True)
        common = np.isin(labels, classes[sizes >= 5])  # 5-fold CV needs 5 cells of a class
        if len(classes[sizes >= 5]) < 2:
            return None
        labels, counts, tokens, bins = labels[common], counts[common], tokens[common], bins[common]
        ours = linear_probe_accuracy(self.embed_tokens(tokens, bins), labels)
        base = linear_probe_accuracy(log_normalised_pca(counts), labels)
        return {"cells": int(len(labels)), "classes": int(len(set(labels))), "cls_probe_acc": round(ours, 4),
                "pca50_probe_acc": round(base, 4)}


def log_normalised_pca(counts: Any, *, n_comps: int = 50, target_sum: float = 1e4) -> np.ndarray:
    """PCA of log1p(counts per ``target_sum``): the unintegrated baseline representation of cells."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    counts = sp.csr_matrix(counts)
    norm = counts.multiply(target_sum / np.maximum(np.asarray(counts.sum(axis=1)), 1)).tocsr()
    norm.data = np.log1p(norm.data)
    n = min(n_comps, norm.shape[1] - 1, norm.shape[0] - 1)
    return PCA(n_components=n, random_state=0).fit_transform(norm.toarray())


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, *, folds: int = 5) -> float:
    """Mean accuracy of a logistic-regression probe in stratified ``folds``-fold cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    return float(cross_val_score(LogisticRegression(max_iter=2000), features, labels, cv=folds).mean())


def train_batch(config: AtlasConfig, vocab: Vocabulary, batch_dir: Path, out: Path, *,
                resume_from: Path | None = None) -> dict[str, Any]:
    """What ``atlasflow train`` does: resume, train one batch, evaluate, write ``out`` and ``out/result.json``."""
    t0 = time.monotonic()
    partial = out.with_name(out.name + ".partial")
    if (out / "result.json").exists():
        log.info("%s already trained: %s", batch_dir.name, out)
        return json.loads((out / "result.json").read_text())
    aside = partial.with_name(f".{partial.name}.old")
    if not partial.exists() and (aside / "progress.json").exists():
        os.replace(aside, partial)  # killed between the two renames of Trainer.save
    if partial.exists():
        trainer = Trainer.load(partial, config, vocab)
        log.info("resuming %s from its intra-batch checkpoint at step %d", batch_dir.name, trainer.progress.global_step)
    elif resume_from is not None:
        trainer = Trainer.load(resume_from, config, vocab)
        trainer.progress.parent = _file_hash(resume_from / "model.pt")
        log.info("continuing from %s (step %d)", resume_from, trainer.progress.global_step)
    else:
        trainer = Trainer(config, vocab)
    metrics = trainer.run_batch(batch_dir, checkpoint=partial)
    trainer.save(out)
    shutil.rmtree(partial, ignore_errors=True)
    p = trainer.progress
    result = {
        "batch_id": batch_dir.name, "checkpoint_dir": str(out), "parent_checkpoint": str(resume_from) if resume_from else None,
        "parent_hash": p.parent, "vocab_version": vocab.version, "cells_seen": p.cells_seen,
        "datasets_seen": p.datasets_seen, "global_step": p.global_step, "train_loss": metrics["train_loss"],
        "val_loss": metrics["val_loss"], "val_masked_acc": metrics["val_masked_acc"],
        "val_baseline_acc": metrics["val_baseline_acc"], "device": str(trainer.device),
        "n_parameters": trainer.model.n_parameters(), "seconds": round(time.monotonic() - t0, 3),
    }
    write_json_atomic(out / "result.json", result)
    return result


def embed_file(checkpoint: Path, input_path: Path, out_path: Path, *, config: AtlasConfig,
               vocab: Vocabulary | None = None, chunk_cells: int = 4096) -> dict[str, Any]:
    """Write ``input_path`` with ``obsm["X_atlas"]`` (cls embeddings) and ``varm["X_atlas_gene"]``.

    The input is any readable count file (see :mod:`atlasflow.formats`); cells are tokenised as in
    training and embedded without masking. Genes outside the vocabulary get a zero gene embedding.
    """
    import anndata as ad

    from atlasflow.formats import open_counts, read_counts
    from atlasflow.genes import map_genes

    if vocab is None:
        raise ValueError("embed_file needs the vocabulary the checkpoint was trained on")
    trainer = Trainer.load(checkpoint, config, vocab)
    src = open_counts(input_path)
    try:
        columns = np.asarray(map_genes(src.genes, vocab, gene_ids=src.gene_ids).positions, dtype=np.int64)
        parts = [trainer.embed_tokens(*trainer.tokenizer.encode(block, columns)) for _, block in src.chunks(chunk_cells)]
    finally:
        src.close()
    adata = ad.read_h5ad(input_path) if input_path.suffix == ".h5ad" else read_counts(input_path)
    adata.obsm["X_atlas"] = np.concatenate(parts).astype(np.float32)
    weights = trainer.model.gene.weight.detach().float().cpu().numpy()
    gene_emb = np.zeros((len(columns), weights.shape[1]), dtype=np.float32)
    known = columns >= 0
    gene_emb[known] = weights[3 + columns[known]]
    adata.varm["X_atlas_gene"] = gene_emb
    adata.uns["atlasflow_embedding"] = {"checkpoint": str(checkpoint), "vocab_version": vocab.version,
                                        "genes_in_vocab": int(known.sum())}
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(tmp)
    os.replace(tmp, out_path)
    return {"cells": int(adata.n_obs), "dim": int(adata.obsm["X_atlas"].shape[1]), "genes_in_vocab": int(known.sum()),
            "out": str(out_path)}
