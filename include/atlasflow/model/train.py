"""Incremental training, one batch at a time, with checkpoints that resume exactly.

A :class:`Trainer` holds everything training depends on — weights, optimizer, the masking RNG,
step counters, loss history, lineage, the per-gene bin counts, the gene medians and the replay
reservoir — and saves all of it. Training batch 0, saving, loading and training batch 1
therefore gives the same numbers as training both in one go; an intra-batch checkpoint every
``training.checkpoint_every_steps`` steps lets a killed job resume where it was (the data order
is a pure function of seed, batch and epoch).

Objective (see ``docs/model.md`` for the measurements behind it): masked-bin cross-entropy at
the masked gene positions, plus ``model.expression_weight`` × the mean squared error of the
expression decoder, which predicts every measured vocabulary gene's log-normalised expression
from the ``<cls>`` output. Continual learning: each batch warms up and decays (cosine) its own
learning rate, embeddings/norms/biases are not weight-decayed, and a share of every step's cells
comes from a replay reservoir of earlier batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from atlasflow.core.config import AtlasConfig
from atlasflow.core.fsutil import discard_dir, fsync_dir, fsync_tree, owner_tag, write_json_atomic
from atlasflow.model.checkpoint_clock import CheckpointClock
from atlasflow.model.data import BatchData, CellBatch, HeldOutSample, log_normalise, rebatch
from atlasflow.model.genestats import GeneMedians
from atlasflow.model.loader import Prefetch, auto_workers, pinned, shard_blocks
from atlasflow.model.network import AtlasTransformer, no_decay
from atlasflow.model.pseudo import PseudoLabels, apply_pseudo_labels
from atlasflow.model.tokenizer import N_SPECIAL, Tokenizer
from atlasflow.model.tracking import BatchTracker
from atlasflow.prep.genes import Vocabulary

__all__ = ["Trainer", "embed_file", "linear_probe_accuracy", "log_normalised_pca", "per_gene_baseline_accuracy",
           "train_batch"]

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 3  # 3: no pickled Python objects (state.pt holds tensors only, RNG states in rng.json)
# what every checkpoint folder holds (replay.npz and val_sets.npz only when there is something to keep)
CHECKPOINT_FILES = ("model.pt", "state.pt", "rng.json", "stats.npz", "progress.json")
PROBE_C = 0.1  # fixed inverse regularisation of every probe: no tuning that could favour one representation
VAL_SET_CELLS = 1000  # held-out cells per batch kept in the checkpoint for forgetting and atlas_retrain


@dataclass
class Progress:
    """Counters and history saved with every checkpoint."""

    global_step: int = 0
    batch_id: str | None = None  # the batch being (or last) trained
    batch_start_step: int = 0  # global_step when the current batch started
    epoch: int = 0  # within the current batch
    step_in_epoch: int = 0
    batch_done: bool = False
    losses: list[float] = field(default_factory=list)  # every step, all batches
    batches: list[dict[str, Any]] = field(default_factory=list)  # per finished batch: id, steps, metrics
    datasets_seen: list[str] = field(default_factory=list)
    cells_seen: int = 0
    parent: str | None = None  # hash of the checkpoint this one grew from
    medians_batches: list[str] = field(default_factory=list)  # batches whose cells are in the gene medians
    replay_cells_represented: int = 0  # training cells the reservoir is a uniform sample of
    replay_version: str | None = None  # the batch that last updated the reservoir
    pseudo_labels_sha256: str | None = None  # the retraining set the current batch started with
    world_size: int = 1  # data-parallel ranks of the current batch
    data_shards: int = 1  # shards its cells are dealt to (ranks × accumulation steps): fixes the cell order


def _device(config: AtlasConfig) -> torch.device:
    if config.training.device == "cuda" or (config.training.device == "auto" and torch.cuda.is_available()):
        if "LOCAL_RANK" in os.environ:  # one GPU per rank under torchrun
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda")
    return torch.device("cpu")


def _agree(flag: bool) -> bool:
    """True on every rank when it is True on any (a checkpoint is a collective: all ranks decide alike)."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Objective(torch.nn.Module):
    """The network and both cell-level heads in one forward, so DDP (and torch.compile) see all of them.

    Only the encoder runs under bf16 autocast; the decoder and the cell-type head read the cls
    embedding in fp32, as the losses do.
    """

    def __init__(self, net: AtlasTransformer, *, bf16: bool, device_type: str) -> None:
        super().__init__()
        self.net, self.bf16, self.device_type = net, bf16, device_type

    def forward(self, tokens: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            logits, cls = self.net(tokens, inputs)
        cls32 = cls.float()
        expr = self.net.decoder(cls32) if self.net.decoder is not None else cls32[:, :0]
        types = self.net.cell_head(cls32) if self.net.cell_head is not None else cls32[:, :0]
        return logits, cls, expr, types


@dataclass(frozen=True)
class _Micro:
    """One forward/backward's cells (new cells of one shard, then its replay cells) as tensors."""

    cells: CellBatch
    n_new: int
    tokens: torch.Tensor
    bins: torch.Tensor
    labels: torch.Tensor  # cell types
    expr: torch.Tensor | None  # dense target, when the network has a decoder
    measured: torch.Tensor | None


@dataclass(frozen=True)
class _Step:
    step: int  # in the epoch
    micros: list[_Micro | None]  # this rank's shards; None where the shard has run out
    rows: list[tuple[int, int]]  # (offset, cells) of each of this rank's micro-batches in the step's mask draw
    total: int  # cells of the step over every shard (rows of the mask draw)
    n_new: int  # new (not replayed) cells of the step over every shard


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def _load_tensors(path: Path, **kwargs: Any) -> Any:
    """``torch.load`` that unpickles tensors and plain containers only: a checkpoint file may come from
    a job we did not write (a shared cluster), and a full unpickle could run any code it names."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: not a tensor-only checkpoint file (refused to unpickle it: "
                         f"{str(exc).splitlines()[0]})") from exc


def _rng_to_json() -> dict[str, Any]:
    """The numpy and Python global RNG states as plain JSON (no pickle)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def _rng_from_json(data: dict[str, Any], source: Path) -> None:
    try:
        n, p = data["numpy"], data["python"]
        np.random.set_state((str(n["kind"]), np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached_gaussian"])))
        gauss_next = p["gauss_next"]
        random.setstate((int(p["version"]), tuple(int(v) for v in p["internal"]),
                         None if gauss_next is None else float(gauss_next)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: malformed RNG state ({exc!r})") from exc


def _build_network(config: AtlasConfig, tokenizer: Tokenizer, n_genes: int) -> AtlasTransformer:
    sizes = config.model.sizes()
    return AtlasTransformer(n_tokens=tokenizer.n_tokens, n_bins=config.model.n_bins, d_model=sizes["d_model"],
                            n_layers=sizes["n_layers"], n_heads=sizes["n_heads"], d_ff=sizes["d_ff"],
                            dropout=config.model.dropout, n_cell_types=len(config.model.cell_type_labels()),
                            n_genes=n_genes if config.model.cell_objective == "expression" else 0)


def lr_factor(step_in_batch: int, total_steps: int, *, warmup: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor`` at the batch's last step."""
    if step_in_batch < warmup:
        return (step_in_batch + 1) / warmup
    span = max(total_steps - warmup, 1)
    done = min(step_in_batch - warmup, span) / span
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    masked_bins: torch.Tensor
    expression: torch.Tensor | None
    logits: torch.Tensor
    labels: torch.Tensor  # -100 where not masked


class Trainer:
    """Model + optimisation state for incremental training; see the module docstring."""

    def __init__(self, config: AtlasConfig, vocab: Vocabulary) -> None:
        self.config = config
        self.vocab = vocab
        sizes = config.model.sizes()
        self.n_genes = len(vocab)
        self.tokenizer = Tokenizer(self.n_genes, sizes["max_genes"], config.model.n_bins)
        self.device = _device(config)
        t = config.training
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32
        self.bf16 = cuda and t.bf16  # CPU always trains and evaluates in fp32
        torch.manual_seed(config.training.seed)  # initial weights depend on the seed only
        self.model = _build_network(config, self.tokenizer, self.n_genes).to(self.device)
        decayed, kept = no_decay(self.model)
        self._fused = cuda and t.fused_adamw
        self.optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": t.weight_decay},
                                            {"params": kept, "weight_decay": 0.0}], lr=t.lr,
                                           **({"fused": True} if self._fused else {}))
        self._objective: torch.nn.Module | None = None  # built by the first training step (DDP, compile)
        self._bins_delta: np.ndarray | None = None  # this rank's bin counts since the last all-reduce
        self.generator = torch.Generator().manual_seed(t.seed + 1)
        self.progress = Progress()
        self.on_step: Callable[[int, float, float], None] | None = None  # (global step, loss, lr): tracking's hook
        # each gene's bin counts over every training token: the per-gene baseline of masked-bin accuracy
        self.gene_bins = np.zeros((self.n_genes, config.model.n_bins), dtype=np.int64)
        self.medians = GeneMedians(self.n_genes)
        self.replay: CellBatch | None = None
        # a small sample of every batch's validation cells, kept with the checkpoint so later
        # batches can measure forgetting after the processed files are cleaned up
        self.val_sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # the dataset id of every sampled validation cell, so atlas_retrain can split them by dataset
        self.val_datasets: dict[str, np.ndarray] = {}
        # their curated obs cell_type ("" unlabelled), so atlas_retrain can score the cell-type head
        self.val_labels: dict[str, np.ndarray] = {}

    # ---- persistence -----------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write a complete checkpoint folder atomically (temp folder + rename)."""
        tmp = path.with_name(f".{path.name}.{owner_tag()}.tmp")  # pruned by its owner's death if killed
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(self.model.state_dict(), tmp / "model.pt")
        # tensors and plain containers only, so that load can refuse anything else (weights_only=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                    "torch": torch.get_rng_state()}, tmp / "state.pt")
        write_json_atomic(tmp / "rng.json", _rng_to_json())
        np.savez_compressed(tmp / "stats.npz", gene_bins=self.gene_bins, medians=self.medians.counts)
        if self.replay is not None:
            previous = path / "replay.npz"
            if previous.exists() and self._replay_saved == (path, self.progress.replay_version):
                os.link(previous, tmp / "replay.npz")  # unchanged since the last save: no rewrite
            else:
                np.savez_compressed(tmp / "replay.npz", **self.replay.to_arrays(""))
        if self.val_sets:
            arrays = {f"{k}__{part}": arr for k, (t, b) in self.val_sets.items()
                      for part, arr in (("tokens", t), ("bins", b))}
            arrays.update({f"{k}__datasets": ids for k, ids in self.val_datasets.items() if k in self.val_sets})
            arrays.update({f"{k}__labels": v for k, v in self.val_labels.items() if k in self.val_sets})
            np.savez_compressed(tmp / "val_sets.npz", **arrays)
        write_json_atomic(tmp / "progress.json", {"version": CHECKPOINT_VERSION, "vocab_version": self.vocab.version,
                                                  "config": self.config.to_dict(), **asdict(self.progress)})
        fsync_tree(tmp)  # on disk before it is published: a crash after the rename finds whole files
        # the previous checkpoint is moved aside, not deleted, until the new one is in place: a kill
        # at any moment leaves one complete checkpoint under ``path`` or its ``.old`` name (and
        # discard_dir renames before deleting, so neither is ever seen half-deleted)
        old = path.with_name(f".{path.name}.old")
        discard_dir(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        discard_dir(old)
        self._replay_saved = (path, self.progress.replay_version)
        return path

    _replay_saved: tuple[Path, str | None] | None = None

    @classmethod
    def load(cls, path: Path, config: AtlasConfig, vocab: Vocabulary) -> Trainer:
        meta = json.loads((path / "progress.json").read_text())
        if isinstance(meta.get("version"), int) and meta["version"] < 3:
            raise ValueError(f"{path}: checkpoint version {meta['version']} keeps its optimizer and RNG state as a "
                             f"Python pickle, which this release no longer loads (loading a pickle can run code); "
                             f"train from scratch in a new models folder, or finish with the release that wrote it "
                             f"(format {CHECKPOINT_VERSION} stores tensors and JSON only)")
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: checkpoint version {meta.get('version')} is not {CHECKPOINT_VERSION} (written by "
                             "another atlasflow release: train from scratch in a new models folder, or use that release)")
        if meta["vocab_version"] != vocab.version:
            raise ValueError(f"{path}: trained on vocabulary {meta['vocab_version']}, but {vocab.version} is in use")
        if meta["config"]["model"] != config.to_dict()["model"]:
            raise ValueError(f"{path}: the model section of the config changed since this checkpoint")
        trainer = cls(config, vocab)
        trainer.model.load_state_dict(_load_tensors(path / "model.pt", map_location=trainer.device))
        state = _load_tensors(path / "state.pt")
        trainer.optimizer.load_state_dict(state["optimizer"])
        for group in trainer.optimizer.param_groups:  # the kernel is this machine's choice, not the checkpoint's
            group["fused"] = trainer._fused or None
        trainer.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        _rng_from_json(json.loads((path / "rng.json").read_text()), path / "rng.json")
        # a field added since the checkpoint was written keeps its default
        fields = {k: meta[k] for k in Progress.__dataclass_fields__ if k in meta}
        trainer.progress = Progress(**fields)
        with np.load(path / "stats.npz") as z:
            trainer.gene_bins = z["gene_bins"].astype(np.int64)
            trainer.medians = GeneMedians(trainer.n_genes, z["medians"])
        if (path / "replay.npz").exists():
            with np.load(path / "replay.npz") as z:
                trainer.replay = CellBatch.from_arrays(z, "")
            trainer._replay_saved = (path, trainer.progress.replay_version)
        if (path / "val_sets.npz").exists():
            with np.load(path / "val_sets.npz") as z:
                names = sorted({k.rsplit("__", 1)[0] for k in z.files})
                trainer.val_sets = {n: (z[f"{n}__tokens"], z[f"{n}__bins"]) for n in names}
                trainer.val_datasets = {n: z[f"{n}__datasets"] for n in names if f"{n}__datasets" in z.files}
                trainer.val_labels = {n: z[f"{n}__labels"] for n in names if f"{n}__labels" in z.files}
        return trainer

    # ---- the objective -----------------------------------------------------------------------------

    def _mask(self, tokens: torch.Tensor, bins: torch.Tensor, generator: torch.Generator | None = None, *,
              scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask ``mask_ratio`` of each cell's genes: the lowest ``scores`` (drawn from ``generator`` when not given)."""
        valid = tokens >= N_SPECIAL  # gene positions (not pad/cls/mask)
        n_valid = valid.sum(dim=1)
        k = torch.clamp(torch.round(n_valid * self.config.training.mask_ratio), min=1).long()
        if scores is None:
            scores = torch.rand(tokens.shape, generator=generator)
        scores = scores.clone()
        scores[~valid] = 2.0
        ranks = scores.argsort(dim=1).argsort(dim=1)
        masked = (ranks < k[:, None]) & valid
        inputs = bins.masked_fill(masked, self.model.mask_bin)
        labels = bins.masked_fill(~masked, -100)
        return inputs, labels

    def gene_scale(self) -> np.ndarray | None:
        """The tokenizer's ranking scale: the gene medians with ``median`` ranking, else None."""
        return self.medians.medians() if self.config.model.gene_ranking == "median" else None

    def _forward(self) -> torch.nn.Module:
        """The module a training step calls: the objective, DDP-wrapped with >1 rank, compiled when asked."""
        if self._objective is None:
            module: torch.nn.Module = _Objective(self.model, bf16=self.bf16, device_type=self.device.type)
            if _world()[1] > 1:
                from torch.nn.parallel import DistributedDataParallel

                module = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda"
                                                 else None)
            if self.config.training.compile:
                module = torch.compile(module)
            self._objective = module
        return self._objective

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=t.is_pinned())

    def _loss(self, micro: _Micro, scores: torch.Tensor) -> LossParts:
        """One process, one shard: every term a mean over this step's cells (the single-process objective)."""
        inputs, labels = self._mask(micro.tokens, micro.bins, scores=scores)
        t, inputs, labels = self._to(micro.tokens), inputs.to(self.device), labels.to(self.device)
        logits, _, expr, types = self._forward()(t, inputs)
        masked = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        total, expression = masked, None
        if micro.expr is not None:
            target, measured = self._to(micro.expr), self._to(micro.measured)
            err = (expr - target) ** 2
            expression = (err * measured).sum() / measured.sum().clamp(min=1)
            total = total + self.config.model.expression_weight * expression
        if self.model.cell_head is not None and (micro.cells.labels >= 0).any():
            total = total + self.config.model.cell_type_weight * F.cross_entropy(types, self._to(micro.labels),
                                                                                ignore_index=-100)
        return LossParts(total, masked, expression, logits, labels)

    def _sharded_loss(self, micro: _Micro, inputs: torch.Tensor, labels: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the step's objective: each term's sum over its cells divided by the
        term's count over the whole step (every rank and micro-batch), so that the shares add up to the
        same means one process computes over the whole step's cells."""
        logits, _, expr, types = self._forward()(self._to(micro.tokens), inputs.to(self.device))
        total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.to(self.device).reshape(-1),
                                ignore_index=-100, reduction="sum") / counts[0].clamp(min=1)
        if micro.expr is not None:
            err = (expr - self._to(micro.expr)) ** 2 * self._to(micro.measured)
            total = total + self.config.model.expression_weight * err.sum() / counts[1].clamp(min=1)
        if self.model.cell_head is not None:  # always in the graph: DDP needs every parameter's gradient
            ct = F.cross_entropy(types, self._to(micro.labels), ignore_index=-100, reduction="sum")
            total = total + self.config.model.cell_type_weight * ct / counts[2].clamp(min=1)
        return total

    # ---- training --------------------------------------------------------------------------------

    def _start_batch(self, data: BatchData) -> None:
        """Fold the batch's training cells into the gene medians (once per batch, before its first step)."""
        p = self.progress
        if self.config.model.gene_ranking == "median" and data.batch_dir.name not in p.medians_batches:
            sample = data.sample("train", max(self.config.training.eval_cells, 10000), seed=self.config.training.seed)
            if sample is not None:
                self.medians.update(sample.cells.expr)
            p.medians_batches.append(data.batch_dir.name)
        data.gene_scale = self.gene_scale()

    def _replay_cells(self, step_in_batch: int, n: int, batch_key: int) -> CellBatch | None:
        if self.replay is None or n == 0 or len(self.replay) == 0:
            return None
        rng = np.random.default_rng([self.config.training.seed, batch_key, step_in_batch, 17])
        return self.replay.take(rng.integers(0, len(self.replay), n))

    def _update_replay(self, data: BatchData) -> None:
        """Keep the reservoir a uniform sample of every training cell so far (new cells in proportion)."""
        t, p = self.config.training, self.progress
        if t.replay_cells == 0 or p.replay_version == data.batch_dir.name:
            return
        new = data.sample("train", t.replay_cells, seed=t.seed + 3)
        if new is None:
            return
        seen, n_new = p.replay_cells_represented, new.total_cells
        rng = np.random.default_rng([t.seed, data.batch_key, 5])
        old = self.replay if self.replay is not None else None
        k_new = min(len(new.cells), max(t.replay_cells - (len(old) if old else 0),
                                        round(t.replay_cells * n_new / (seen + n_new))))
        k_old = min(len(old) if old else 0, t.replay_cells - k_new)
        parts = [new.cells.take(np.sort(rng.choice(len(new.cells), k_new, replace=False)))]
        if old is not None and k_old:
            parts.insert(0, old.take(np.sort(rng.choice(len(old), k_old, replace=False))))
        self.replay = CellBatch.concat(parts)
        p.replay_cells_represented = seen + n_new
        p.replay_version = data.batch_dir.name

    def run_batch(self, batch_dir: Path, *, checkpoint: Path | None = None,
                  pseudo_labels: PseudoLabels | None = None) -> dict[str, Any]:
        """Train on one batch folder, continuing wherever the progress says; returns its metrics.

        ``pseudo_labels`` (the retraining set) label the cell-type head's unlabelled training cells
        (see :mod:`atlasflow.model.pseudo`); the metrics' ``pseudo_labels`` say what was used.
        """
        t = self.config.training
        data = BatchData(batch_dir, self.vocab, self.tokenizer, seed=t.seed, block_cells=t.block_cells,
                         val_fraction=t.val_fraction, cell_types=self.config.model.cell_type_labels())
        p = self.progress
        sha = pseudo_labels.sha256 if pseudo_labels is not None else None
        if p.batch_id != batch_dir.name or p.batch_done:
            p.batch_id, p.epoch, p.step_in_epoch, p.batch_done = batch_dir.name, 0, 0, False
            p.batch_start_step = p.global_step
            p.pseudo_labels_sha256 = sha
        elif p.pseudo_labels_sha256 != sha:
            # atlas_retrain may rebuild the table while a killed job waits for its retry; refusing would
            # fail every retry the same way, so the rest of the batch trains on the new labels, recorded
            log.warning("%s resumes with another retraining set (sha256 %s; the batch started with %s): its "
                        "remaining steps train on the new pseudo-labels", batch_dir.name, sha, p.pseudo_labels_sha256)
        pseudo_use = None
        if pseudo_labels is not None:
            # held out here or by any earlier batch: what atlas_retrain measures on never gets a training label
            held_out = {f.dataset_id for f in data.val} | {d for b in p.batches for d in b.get("val_datasets") or []}
            data.train, use = apply_pseudo_labels(data.train, pseudo_labels, self.config.model.cell_type_labels(),
                                                  held_out=held_out)
            pseudo_use = {**use.to_dict(), "sha256_at_batch_start": p.pseudo_labels_sha256}
        self._start_batch(data)
        rank, world = _world()
        micro, accum = self._micro_batches(world)
        shards = world * accum
        if (p.epoch or p.step_in_epoch) and p.data_shards != shards:
            raise ValueError(
                f"{batch_dir.name}: its intra-batch checkpoint dealt the cells to {p.data_shards} shard(s) "
                f"({p.world_size} rank(s) × {p.data_shards // max(p.world_size, 1)} accumulation step(s)); this run would "
                f"deal them to {shards} ({world} × {accum}), which changes the cell order in the middle of the batch. "
                f"Resume with {p.world_size} rank(s), or keep training.batch_cells / training.micro_batch_cells = "
                f"{p.data_shards} (micro_batch_cells = {t.batch_cells // p.data_shards}) on any number of ranks that "
                f"divides it")
        p.world_size, p.data_shards = world, shards
        has_replay = self.replay is not None and len(self.replay) > 0
        n_replay = round(t.replay_share * micro) if has_replay else 0  # per micro-batch
        n_new = max(micro - n_replay, 1)
        sizes = {e: data.shard_cells(epoch=e, shards=shards) for e in range(t.epochs)}
        epoch_steps = {e: max(math.ceil(max(c, 1) / n_new) for c in sizes[e]) for e in sizes}
        total_steps = sum(epoch_steps.values())
        cuda = self.device.type == "cuda"
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # ranks sharing this node's CPUs
        workers = t.loader_workers if t.loader_workers is not None else auto_workers(cuda=cuda, local_ranks=local_ranks)
        mine = [rank * accum + a for a in range(accum)]
        t0 = time.monotonic()
        wait_s = 0.0
        clock = CheckpointClock(t.checkpoint_every_steps, t.checkpoint_every_minutes)
        self.model.train()
        while p.epoch < t.epochs:
            start = p.step_in_epoch
            # worker processes fork here, on the training thread, before the prefetch thread reads them
            sources = [rebatch(shard_blocks(data, epoch=p.epoch, start_cell=start * n_new, shard=v, shards=shards,
                                            workers=workers, prefetch_blocks=t.prefetch_blocks),
                               batch_cells=n_new, start_step=start) for v in mine]
            steps = self._assemble(sources, sizes=sizes[p.epoch], shard_ids=mine, n_new=n_new, n_replay=n_replay,
                                   first=start, last=epoch_steps[p.epoch],
                                   in_batch0=p.global_step - p.batch_start_step, batch_key=data.batch_key,
                                   pin=cuda and t.pin_memory)
            feed = Prefetch(steps, depth=t.prefetch_steps)
            try:
                while True:
                    waited = time.perf_counter()
                    st = next(feed, None)  # the time spent here is the step waiting for its cells
                    wait_s += time.perf_counter() - waited
                    if st is None:
                        break
                    in_batch = p.global_step - p.batch_start_step
                    for m in st.micros:
                        if m is not None:
                            self._count_bins(m.cells.take(slice(0, m.n_new)))
                    factor = lr_factor(in_batch, total_steps, warmup=t.warmup_steps, floor=t.lr_floor)
                    for group in self.optimizer.param_groups:
                        group["lr"] = t.lr * factor
                    scores = torch.rand((st.total, self.tokenizer.seq_len), generator=self.generator)
                    if shards == 1:  # the single-process objective, unchanged
                        loss = self._loss(st.micros[0], scores).total  # type: ignore[arg-type]
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        step_loss = loss.detach()
                    else:
                        step_loss = self._sharded_step(st, scores, world)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                    self.optimizer.step()
                    p.losses.append(float(step_loss))
                    p.global_step += 1
                    if self.on_step is not None and rank == 0:
                        self.on_step(p.global_step, p.losses[-1], t.lr * factor)
                    p.step_in_epoch = st.step + 1
                    p.cells_seen += st.n_new
                    if checkpoint is not None and clock.due(p.global_step, agree=_agree if world > 1 else None):
                        self._sync_bins()
                        if rank == 0:
                            self.save(checkpoint)  # intra-batch: a killed job resumes here
            finally:
                feed.close()
            p.epoch += 1
            p.step_in_epoch = 0
        self._sync_bins()
        steps_done = p.global_step - p.batch_start_step  # the whole batch, also after a resume
        loop_s = time.monotonic() - t0
        metrics: dict[str, Any] = {"batch_id": batch_dir.name, "steps": steps_done, "world_size": world,
                                   "data_shards": shards, "loader_workers": workers,
                                   "loader_wait_share": round(wait_s / loop_s, 4) if loop_s > 0 else None}
        if rank != 0:  # evaluation, the reservoir and every file are rank 0's
            return metrics
        metrics.update(self.evaluate(data))
        metrics.update({"batch_id": batch_dir.name, "steps": steps_done, "seconds": round(time.monotonic() - t0, 3),
                        "train_cells": data.n_train_cells, "replay_cells_per_step": n_replay * shards,
                        "train_loss": float(np.mean(p.losses[-steps_done:])) if steps_done and p.losses else None,
                        "train_datasets": [f.dataset_id for f in data.train], "pseudo_labels": pseudo_use,
                        "val_datasets": [f.dataset_id for f in data.val]})
        self._update_replay(data)
        metrics["replay_reservoir_cells"] = len(self.replay) if self.replay is not None else 0
        p.datasets_seen = sorted(set(p.datasets_seen) | {f.dataset_id for f in data.train + data.val})
        p.batches.append(metrics)
        p.batch_done = True
        return metrics

    def _micro_batches(self, world: int) -> tuple[int, int]:
        """``(micro_batch_cells, accumulation steps)`` for ``world`` ranks; a clear error when they do not divide."""
        t = self.config.training
        micro = t.micro_batch_cells or t.batch_cells // world
        if micro < 1 or t.batch_cells % (world * micro):
            raise ValueError(f"training.batch_cells={t.batch_cells} does not split into {world} rank(s) × "
                             f"micro-batches of {micro} cells (training.micro_batch_cells); pick batch_cells a "
                             f"multiple of ranks × micro_batch_cells")
        return micro, t.batch_cells // (world * micro)

    def _assemble(self, sources: list[Iterator[tuple[int, CellBatch]]], *, sizes: list[int], shard_ids: list[int],
                  n_new: int, n_replay: int, first: int, last: int, in_batch0: int, batch_key: int,
                  pin: bool) -> Iterator[_Step]:
        """The epoch's steps ``first``..``last - 1``: this rank's micro-batches (new cells of each of its shards,
        then that shard's slice of the step's replay cells) as tensors, and where their rows sit in the step."""
        shards = len(sizes)
        for step in range(first, last):
            news = [min(n_new, max(0, c - step * n_new)) for c in sizes]  # every shard's new cells this step
            lens = [k + (n_replay if k else 0) for k in news]
            offsets = np.concatenate(([0], np.cumsum(lens)))
            rep = self._replay_cells(in_batch0 + step - first, n_replay * shards, batch_key)
            micros: list[_Micro | None] = []
            for v, src in zip(shard_ids, sources, strict=True):
                got = next(src, None) if news[v] else None
                if got is None:
                    micros.append(None)
                    continue
                at, cells = got
                if at != step or len(cells) != news[v]:
                    raise RuntimeError(f"shard {v} gave step {at} with {len(cells)} cells, expected step {step} with "
                                       f"{news[v]}")
                if rep is not None:
                    cells = CellBatch.concat([cells, rep.take(slice(v * n_replay, (v + 1) * n_replay))])
                micros.append(self._tensors(cells, news[v], pin=pin))
            yield _Step(step, micros, [(int(offsets[v]), lens[v]) for v in shard_ids], int(offsets[-1]), sum(news))

    def _tensors(self, cells: CellBatch, n_new: int, *, pin: bool) -> _Micro:
        decoder = self.model.decoder is not None
        return _Micro(cells, n_new, pinned(cells.tokens, pin=pin), pinned(cells.bins, pin=pin),
                      pinned(cells.labels, pin=pin),
                      pinned(cells.expr.toarray(), pin=pin) if decoder else None,
                      pinned(cells.measured_mask(), pin=pin) if decoder else None)

    def _sharded_step(self, st: _Step, scores: torch.Tensor, world: int) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches; returns the step's loss over every rank."""
        import torch.distributed as dist

        masks = []
        counts = torch.zeros(3, dtype=torch.float64)
        for m, (offset, n) in zip(st.micros, st.rows, strict=True):
            if m is None:
                masks.append(None)
                continue
            inputs, labels = self._mask(m.tokens, m.bins, scores=scores[offset: offset + n])
            masks.append((inputs, labels))
            counts[0] += int((labels != -100).sum())
            counts[1] += float(m.measured.sum()) if m.measured is not None else 0.0
            counts[2] += int((m.cells.labels >= 0).sum())
        counts = counts.to(self.device)
        if world > 1:
            dist.all_reduce(counts)
        self.optimizer.zero_grad(set_to_none=True)
        module = self._forward()
        total = torch.zeros((), device=self.device)
        for k, (m, mask) in enumerate(zip(st.micros, masks, strict=True)):
            weight = 1.0
            if m is None or mask is None:
                if world == 1:
                    continue
                m, mask, weight = self._dummy(), None, 0.0  # DDP needs this rank's (zero) gradients too
            inputs, labels = mask if mask is not None else self._mask(m.tokens, m.bins, scores=torch.zeros(m.tokens.shape))
            sync = world == 1 or k == len(st.micros) - 1 or not hasattr(module, "no_sync")
            with contextlib.nullcontext() if sync else module.no_sync():  # type: ignore[operator]
                share = self._sharded_loss(m, inputs, labels, counts)
                # DDP averages gradients over ranks: × world makes it their sum, as one process would get
                (share * (weight * world)).backward()
            total = total + share.detach() * weight
        if world > 1:
            dist.all_reduce(total)
        return total

    def _dummy(self) -> _Micro:
        """One empty cell (<cls> alone) for a rank whose shards ran out before the others'."""
        tokens = np.zeros((1, self.tokenizer.seq_len), dtype=np.int64)
        tokens[0, 0] = 1
        cells = CellBatch(tokens, np.zeros_like(tokens), np.full(1, -100, dtype=np.int64),
                          sp.csr_matrix((1, self.n_genes), dtype=np.float32), np.zeros(1, dtype=np.int32),
                          np.zeros((1, self.n_genes), dtype=bool))
        return self._tensors(cells, 0, pin=False)

    def _sync_bins(self) -> None:
        """Add every rank's bin counts since the last call to each rank's copy (a no-op in one process)."""
        if self._bins_delta is None:
            return
        import torch.distributed as dist

        delta = torch.from_numpy(self._bins_delta)
        if self.device.type == "cuda":
            delta = delta.to(self.device)
        dist.all_reduce(delta)
        self.gene_bins += delta.cpu().numpy()
        self._bins_delta = None

    def _count_bins(self, cells: CellBatch) -> None:
        valid = cells.tokens >= N_SPECIAL
        flat = (cells.tokens[valid] - N_SPECIAL) * self.gene_bins.shape[1] + cells.bins[valid]
        counts = np.bincount(flat, minlength=self.gene_bins.size).reshape(self.gene_bins.shape)
        if _world()[1] == 1:
            self.gene_bins += counts
        else:  # other ranks counted other cells: added up at the next checkpoint (_sync_bins)
            self._bins_delta = counts if self._bins_delta is None else self._bins_delta + counts

    # ---- evaluation -------------------------------------------------------------------------------

    def masked_metrics(self, tokens: np.ndarray, bins: np.ndarray) -> dict[str, float]:
        """Masked-bin ``loss``, ``masked_acc``, ``baseline_acc`` (most frequent bin) and ``per_gene_acc``
        (each gene's most frequent bin on the training cells) on these cells, with the masks every
        evaluation uses (so two checkpoints scored on the same cells are compared on the same positions)."""
        return self._masked_metrics(tokens.astype(np.int64), bins.astype(np.int64))

    def per_gene_table(self) -> np.ndarray:
        """``int[n_genes]``: each gene's most frequent training bin (the overall most frequent for unseen genes)."""
        seen = self.gene_bins.sum(axis=1) > 0
        table = self.gene_bins.argmax(axis=1)
        table[~seen] = self.gene_bins.sum(axis=0).argmax() if seen.any() else 1
        return table

    @torch.no_grad()
    def _masked_metrics(self, tokens: np.ndarray, bins: np.ndarray) -> dict[str, float]:
        self.model.eval()
        gen = torch.Generator().manual_seed(self.config.training.seed + 7)  # same masks every evaluation
        loss_sum, correct, total = 0.0, 0, 0
        counts = np.zeros(self.config.model.n_bins, dtype=np.int64)
        labels_all, genes_all = [], []
        for lo in range(0, tokens.shape[0], 256):
            t = torch.from_numpy(tokens[lo: lo + 256])
            inputs, labels = self._mask(t, torch.from_numpy(bins[lo: lo + 256]), gen)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits, _ = self.model(t.to(self.device), inputs.to(self.device))
            logits = logits.float().cpu()
            sel = labels != -100
            pred = logits.argmax(-1)[sel].numpy()
            lab = labels[sel].numpy()
            loss_sum += float(F.cross_entropy(logits[sel], labels[sel], reduction="sum"))
            correct += int((pred == lab).sum())
            total += lab.size
            counts += np.bincount(lab, minlength=counts.size)
            labels_all.append(lab)
            genes_all.append(t[sel].numpy() - N_SPECIAL)
        self.model.train()
        if total == 0:
            return {"loss": float("nan"), "masked_acc": float("nan"), "baseline_acc": float("nan"),
                    "per_gene_acc": float("nan")}
        labels, genes = np.concatenate(labels_all), np.concatenate(genes_all)
        return {"loss": loss_sum / total, "masked_acc": correct / total,
                "baseline_acc": float((labels == counts.argmax()).mean()),
                "per_gene_acc": per_gene_baseline_accuracy(self.per_gene_table(), genes, labels)}

    @torch.no_grad()
    def embed_tokens(self, tokens: np.ndarray, bins: np.ndarray, *, model: AtlasTransformer | None = None) -> np.ndarray:
        """cls embeddings, unmasked, ``float32[n_cells, d_model]`` (of ``model``, default the trained one)."""
        net = model or self.model
        net.eval()
        out = []
        for lo in range(0, tokens.shape[0], 256):
            t = torch.from_numpy(tokens[lo: lo + 256]).to(self.device)
            b = torch.from_numpy(bins[lo: lo + 256]).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out.append(net(t, b)[1].float().cpu().numpy())
        net.train()
        return np.concatenate(out) if out else np.zeros((0, net.head.in_features), np.float32)

    @torch.no_grad()
    def predict_cell_types(self, tokens: np.ndarray, bins: np.ndarray) -> np.ndarray | None:
        """The cell-type head's class (index into ``model.cell_types``) per cell, unmasked; None without a head."""
        head = self.model.cell_head
        if head is None:
            return None
        cls = self.embed_tokens(tokens.astype(np.int64), bins.astype(np.int64))
        return head(torch.from_numpy(cls).to(self.device)).argmax(-1).cpu().numpy()

    def untrained_network(self) -> AtlasTransformer:
        """The network as initialised by this config's seed (the baseline every probe is compared with)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.training.seed)
            return _build_network(self.config, self.tokenizer, self.n_genes).to(self.device)

    @torch.no_grad()
    def _expression_mse(self, cells: CellBatch) -> float | None:
        if self.model.decoder is None or not len(cells):
            return None
        self.model.eval()
        err, n = 0.0, 0
        for lo in range(0, len(cells), 256):
            part = cells.take(slice(lo, lo + 256))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                _, cls = self.model(torch.from_numpy(part.tokens).to(self.device),
                                    torch.from_numpy(part.bins).to(self.device))
            measured = torch.from_numpy(part.measured_mask()).to(self.device)
            target = torch.from_numpy(part.expr.toarray()).to(self.device)
            err += float((((self.model.decoder(cls.float()) - target) ** 2) * measured).sum())
            n += int(measured.sum())
        self.model.train()
        return err / max(n, 1)

    def evaluate(self, data: BatchData) -> dict[str, Any]:
        """Held-out metrics for this batch, forgetting on earlier batches' samples, and the probes.

        Every figure stands beside its baselines from the same run and cells: masked-bin accuracy
        vs the most frequent bin and vs each gene's most frequent training bin; the cell-type probe
        on the cls embedding vs PCA(50) of log-normalised counts and vs the untrained network.
        Only a seeded sample of ``training.eval_cells`` held-out cells is read (bounded memory).
        """
        t = self.config.training
        out: dict[str, Any] = {"val_loss": None, "val_masked_acc": None, "val_baseline_acc": None,
                               "val_per_gene_acc": None, "val_expression_mse": None, "val_cells": 0,
                               "val_cells_total": 0, "probe": None}
        sample = data.sample("val", t.eval_cells, seed=t.seed) if data.val else None
        batch = data.batch_dir.name
        if sample is not None and len(sample.cells):
            cells = sample.cells
            m = self._masked_metrics(cells.tokens, cells.bins)
            out.update({"val_loss": m["loss"], "val_masked_acc": m["masked_acc"], "val_baseline_acc": m["baseline_acc"],
                        "val_per_gene_acc": m["per_gene_acc"], "val_expression_mse": self._expression_mse(cells),
                        "val_cells": len(cells), "val_cells_total": sample.total_cells})
            keep = np.sort(np.random.default_rng(t.seed).permutation(len(cells))[:VAL_SET_CELLS])
            self.val_sets[batch] = (cells.tokens[keep].astype(np.int32), cells.bins[keep].astype(np.int16))
            self.val_datasets[batch] = sample.dataset_ids[keep]
            if sample.cell_type is not None:
                self.val_labels[batch] = sample.cell_type[keep].astype(str)
            out["probe"] = self._probe(sample)
        out["forgetting"] = self._forgetting(batch)
        return out

    def _forgetting(self, current: str) -> dict[str, dict[str, float | None]]:
        """Every stored held-out sample's masked-bin accuracy now, beside the figure when its batch was trained."""
        at_training = {b["batch_id"]: b.get("forgetting", {}).get(b["batch_id"], {}).get("now")
                       for b in self.progress.batches if isinstance(b.get("forgetting"), dict)}
        out = {}
        for batch, (tok, bins) in sorted(self.val_sets.items()):
            now = round(self._masked_metrics(tok.astype(np.int64), bins.astype(np.int64))["masked_acc"], 4)
            then = now if batch == current else at_training.get(batch)
            out[batch] = {"at_training": then, "now": now,
                          "change": None if then is None else round(now - then, 4)}
        return out

    def _probe(self, sample: HeldOutSample) -> dict[str, Any] | None:
        """5-fold probe of cell type: trained cls vs untrained cls vs PCA(50), labelled cells only."""
        if sample.cell_type is None:
            return None
        labels = sample.cell_type
        labelled = labels != ""
        classes, sizes = np.unique(labels[labelled], return_counts=True)
        common = labelled & np.isin(labels, classes[sizes >= 5])  # 5-fold CV needs 5 cells of a class
        if len(classes[sizes >= 5]) < 2:
            return None
        idx = np.flatnonzero(common)
        cells, labels = sample.cells.take(idx), labels[idx]
        ours = linear_probe_accuracy(self.embed_tokens(cells.tokens, cells.bins), labels)
        untrained = linear_probe_accuracy(self.embed_tokens(cells.tokens, cells.bins, model=self.untrained_network()),
                                          labels)
        pca = linear_probe_accuracy(log_normalised_pca(cells.expr, normalised=True), labels)
        majority = float(sizes[sizes >= 5].max() / sizes[sizes >= 5].sum())
        return {"cells": int(len(labels)), "unlabelled_left_out": int((~labelled).sum()),
                "classes": int(len(set(labels))), "cls_probe_acc": round(ours, 4),
                "untrained_probe_acc": round(untrained, 4), "pca50_probe_acc": round(pca, 4),
                "majority_acc": round(majority, 4)}


def per_gene_baseline_accuracy(table: np.ndarray, genes: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of predicting each masked position's bin as ``table[gene]`` (ignores the rest of the cell)."""
    return float((table[genes] == labels).mean()) if labels.size else float("nan")


def log_normalised_pca(counts: Any, *, n_comps: int = 50, target_sum: float = 1e4, normalised: bool = False) -> np.ndarray:
    """PCA of log1p(counts per ``target_sum``): the unintegrated baseline representation of cells.

    ``normalised=True`` takes values that are log-normalised already. Sparse in, so memory is the
    sample's non-zeros plus the components, not a dense copy of the matrix.
    """
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    norm = sp.csr_matrix(counts, dtype=np.float32)
    if not normalised:
        norm = log_normalise(norm, np.asarray(norm.sum(axis=1)).reshape(-1), target_sum=target_sum)
    n = min(n_comps, norm.shape[1] - 1, norm.shape[0] - 1)
    return PCA(n_components=n, svd_solver="arpack", random_state=0).fit_transform(norm)


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Mean accuracy of a logistic-regression probe (standardised features, ``C`` fixed at ``PROBE_C``)
    in shuffled stratified ``folds``-fold cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=3000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, features, labels, cv=cv).mean())


@contextlib.contextmanager
def process_group(config: AtlasConfig) -> Iterator[tuple[int, int]]:
    """``(rank, world_size)``; under torchrun (``WORLD_SIZE`` > 1) a process group for the duration.

    NCCL when this rank trains on CUDA, gloo on CPU. torchrun sets ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every rank it starts.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield _world()
        return
    backend = "nccl" if _device(config).type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        log.info("rank %d of %d (%s)", dist.get_rank(), world, backend)
        yield dist.get_rank(), world
    finally:
        dist.destroy_process_group()


def train_batch(config: AtlasConfig, vocab: Vocabulary, batch_dir: Path, out: Path, *,
                resume_from: Path | None = None, pseudo_labels: Path | None = None) -> dict[str, Any]:
    """What ``atlasflow train`` does: resume, train one batch, evaluate, write ``out`` and ``out/result.json``.

    ``pseudo_labels``: the retraining set (``outputs/retrain/retrain.csv``) whose labels train the
    cell-type head; not there yet (no atlas_retrain run so far) means none, recorded as such.
    ``result.json``'s ``pseudo_labels`` gives the table's sha256, the cells it labelled and why its
    other rows were not used (None when no table was asked for).

    Under torchrun every rank calls this: all of them load the same checkpoint and train their
    shards (DDP); rank 0 alone writes checkpoints and the result, and returns it (the others
    return ``{"rank": r, ...}`` and write nothing).
    """
    from atlasflow.model.threads import torch_threads

    # training.threads, per rank; empty: as the process has them (the local backend's OMP_NUM_THREADS)
    with torch_threads(config.training.threads), process_group(config) as (rank, world):
        return _train_batch(config, vocab, batch_dir, out, resume_from=resume_from, pseudo_labels=pseudo_labels,
                            rank=rank, world=world)


def _train_batch(config: AtlasConfig, vocab: Vocabulary, batch_dir: Path, out: Path, *, resume_from: Path | None,
                 pseudo_labels: Path | None, rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    t0 = time.monotonic()
    if pseudo_labels is not None and not config.model.cell_type_labels():
        raise ValueError("pseudo-labels train the cell-type head, and model.cell_types is empty: list the labels there "
                         "(or turn retrain.train_on_pseudo_labels off)")
    partial = out.with_name(out.name + ".partial")
    aside = partial.with_name(f".{partial.name}.old")
    if (out / "result.json").exists():
        log.info("%s already trained: %s", batch_dir.name, out)
        if rank == 0:
            discard_dir(partial)  # killed after the result was written, before its intra-batch copy went
            discard_dir(aside)
        return json.loads((out / "result.json").read_text())
    if rank == 0 and not partial.exists() and (aside / "progress.json").exists():
        os.replace(aside, partial)  # killed between the two renames of Trainer.save
    if rank == 0 and partial.exists() and (missing := [f for f in CHECKPOINT_FILES if not (partial / f).exists()]):
        # only an older release's kill mid-rmtree leaves this (saves and deletions are renames now)
        log.warning("%s: discarding an incomplete intra-batch checkpoint (no %s)", partial, ", ".join(missing))
        discard_dir(partial)
    if world > 1:
        dist.barrier()  # every rank resumes from what rank 0 found
    if partial.exists():
        trainer = Trainer.load(partial, config, vocab)
        log.info("resuming %s from its intra-batch checkpoint at step %d", batch_dir.name, trainer.progress.global_step)
    elif resume_from is not None:
        trainer = Trainer.load(resume_from, config, vocab)
        trainer.progress.parent = _file_hash(resume_from / "model.pt")
        log.info("continuing from %s (step %d)", resume_from, trainer.progress.global_step)
    else:
        trainer = Trainer(config, vocab)
    table = None
    if pseudo_labels is not None and pseudo_labels.exists():
        table = PseudoLabels.read(pseudo_labels)
    elif pseudo_labels is not None:
        log.info("no retraining set at %s yet: %s trains without pseudo-labels", pseudo_labels, batch_dir.name)
    metrics_only_on_rank0 = rank != 0  # one MLflow run per batch, whatever the number of ranks
    tracker = None if metrics_only_on_rank0 else BatchTracker.start(config, batch_id=batch_dir.name,
                                                                    checkpoint_dir=out, parent=resume_from)
    trainer.on_step = tracker.step if tracker is not None else None  # opt-in MLflow run (tracking.mlflow)
    metrics = trainer.run_batch(batch_dir, checkpoint=partial, pseudo_labels=table)
    if tracker is None:
        return {"rank": rank, "world_size": world, "batch_id": batch_dir.name, "steps": metrics["steps"]}
    trainer.save(out)
    p = trainer.progress
    used = metrics["pseudo_labels"]
    if pseudo_labels is not None and table is None:  # asked for, not built yet: say so rather than nothing
        used = {"path": str(pseudo_labels), "sha256": None, "rows": 0, "cells": 0, "labels": {}, "datasets": {},
                "skipped": {}, "sha256_at_batch_start": None}
    result = {
        "batch_id": batch_dir.name, "checkpoint_dir": str(out), "parent_checkpoint": str(resume_from) if resume_from else None,
        "parent_hash": p.parent, "vocab_version": vocab.version, "cells_seen": p.cells_seen,
        "datasets_seen": p.datasets_seen, "global_step": p.global_step,
        **{k: metrics[k] for k in ("steps", "train_loss", "val_loss", "val_masked_acc", "val_baseline_acc",
                                   "val_per_gene_acc", "val_expression_mse", "val_cells", "val_cells_total", "probe",
                                   "forgetting", "replay_cells_per_step", "replay_reservoir_cells")},
        "pseudo_labels": used,
        "gene_ranking": config.model.gene_ranking, "cell_objective": config.model.cell_objective,
        "gene_medians_version": trainer.medians.version() if config.model.gene_ranking == "median" else None,
        "device": str(trainer.device), "n_parameters": trainer.model.n_parameters(),
        "world_size": world, "data_shards": p.data_shards, "loader_workers": metrics["loader_workers"],
        "cpu_threads": torch.get_num_threads(),  # per rank: training.threads, or the backend's share of the CPUs
        "loader_wait_share": metrics["loader_wait_share"],  # of the training loop's time, this run
        "seconds": round(time.monotonic() - t0, 3),
    }
    write_json_atomic(out / "result.json", result)
    # only now: a kill before the result is written resumes from it instead of training the batch again
    discard_dir(partial)
    tracker.finish(result)
    return result


def embed_file(checkpoint: Path, input_path: Path, out_path: Path, *, config: AtlasConfig,
               vocab: Vocabulary | None = None, chunk_cells: int = 4096) -> dict[str, Any]:
    """Write ``input_path`` with ``obsm["X_atlas"]`` (cls embeddings) and ``varm["X_atlas_gene"]``.

    The input is any readable count file (see :mod:`atlasflow.readers.formats`); cells are tokenised as in
    training (with the checkpoint's gene medians under ``median`` ranking) and embedded without
    masking. Genes outside the vocabulary get a zero gene embedding.
    """
    import anndata as ad

    from atlasflow.prep.genes import map_genes
    from atlasflow.readers.formats import open_counts, read_counts

    if vocab is None:
        raise ValueError("embed_file needs the vocabulary the checkpoint was trained on")
    trainer = Trainer.load(checkpoint, config, vocab)
    scale = trainer.gene_scale()
    src = open_counts(input_path)
    try:
        columns = np.asarray(map_genes(src.genes, vocab, gene_ids=src.gene_ids).positions, dtype=np.int64)
        parts = [trainer.embed_tokens(*trainer.tokenizer.encode(block, columns, gene_scale=scale,
                                                                 tie_seed=config.training.seed))
                 for _, block in src.chunks(chunk_cells)]
    finally:
        src.close()
    adata = ad.read_h5ad(input_path) if input_path.suffix == ".h5ad" else read_counts(input_path)
    adata.obsm["X_atlas"] = np.concatenate(parts).astype(np.float32)
    weights = trainer.model.gene.weight.detach().float().cpu().numpy()
    gene_emb = np.zeros((len(columns), weights.shape[1]), dtype=np.float32)
    known = columns >= 0
    gene_emb[known] = weights[N_SPECIAL + columns[known]]
    adata.varm["X_atlas_gene"] = gene_emb
    adata.uns["atlasflow_embedding"] = {"checkpoint": str(checkpoint), "vocab_version": vocab.version,
                                        "genes_in_vocab": int(known.sum())}
    tmp = out_path.with_name(f".{out_path.name}.{owner_tag()}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(tmp)
    os.replace(tmp, out_path)
    return {"cells": int(adata.n_obs), "dim": int(adata.obsm["X_atlas"].shape[1]), "genes_in_vocab": int(known.sum()),
            "out": str(out_path)}
