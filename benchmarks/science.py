"""Does the model learn cell state, and keep it? Every figure beside baselines from the same run.

Data: scanpy's pbmc68k_reduced (700 real PBMCs with ``bulk_labels``). Training cells are
**Poisson-resampled** from them (labelled as such) into ``--batches`` batches of
``--cells-per-batch`` cells; batch ``k`` draws 80 % of its cells from one group of cell types
(``bulk_labels`` index mod the number of batches) and 20 % from the rest, so the stream shifts
and forgetting can show. Every batch holds out the **700 real cells** as its validation dataset.

Per batch, for a run with the replay reservoir and one without:

- masked-bin accuracy vs the most frequent bin and vs the per-gene lookup (each gene's most
  frequent bin on the training cells), on the same masked positions;
- the cell-type probe (standardised features, C fixed, shuffled stratified 5-fold) on the cls
  embedding vs PCA(50) of log-normalised counts vs the same network untrained;
- forgetting: every earlier batch's held-out masked-bin accuracy now vs when it was trained.

Then the peak RSS of one evaluation at 10k, 100k and 1M held-out cells (each in a fresh process).

Run: ``make bench BENCH=science`` (writes ``benchmarks/results/science.json``) or
``.venv/bin/python benchmarks/science.py [--cells-per-batch 50000 --batches 5 --skip-memory]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _write_h5ad(path: Path, counts, labels, genes) -> None:
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(counts.shape[0])])
    ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=list(genes))).write_h5ad(path)


def _held_out_name(train_ids: list[str], batch: int, val_fraction: float, seed: int) -> str:
    """A dataset id the hash split holds out among ``train_ids`` (so the real cells are validation)."""
    from atlasflow.model.data import split_datasets

    for k in range(10_000):
        name = f"real{k}_b{batch}"
        if split_datasets(train_ids + [name], val_fraction=val_fraction, seed=seed)[1] == [name]:
            return name
    raise RuntimeError("no held-out name found")


def build_batches(root: Path, *, n_batches: int, cells_per_batch: int, datasets_per_batch: int,
                  val_fraction: float, seed: int) -> list[Path]:
    import scipy.sparse as sp

    from atlasflow_testing.realdata import pbmc_counts

    pbmc = pbmc_counts()
    labels = pbmc.obs["bulk_labels"].to_numpy().astype(str)
    types = sorted(set(labels))
    group = np.array([types.index(x) % n_batches for x in labels])
    x = sp.csr_matrix(pbmc.X)
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        folder = root / f"batch_{b:04d}"
        folder.mkdir(parents=True)
        mine = group == b
        w = np.where(mine, 0.8 / max(mine.sum(), 1), 0.2 / max((~mine).sum(), 1))
        pick = rng.choice(x.shape[0], size=cells_per_batch, p=w / w.sum())
        base = x[pick].tocsr()
        base.data = rng.poisson(base.data).astype(np.float32)
        base.eliminate_zeros()
        ids = []
        for d, rows in enumerate(np.array_split(np.arange(cells_per_batch), datasets_per_batch)):
            ids.append(f"resampled_b{b}_d{d}")
            _write_h5ad(folder / f"{ids[-1]}.h5ad", base[rows], labels[pick[rows]], pbmc.var_names)
        _write_h5ad(folder / f"{_held_out_name(ids, b, val_fraction, seed)}.h5ad", x.copy(), labels, pbmc.var_names)
        out.append(folder)
    return out


def run(batches: list[Path], models: Path, overrides: dict) -> list[dict]:
    from atlasflow.core.config import load_config
    from atlasflow.model.train import train_batch
    from atlasflow.prep.genes import Vocabulary

    config = load_config(overrides={**overrides, "storage.base_dir": str(models)})
    vocab = Vocabulary.builtin("pbmc68k")
    previous, rows = None, []
    for batch in batches:
        t0 = time.perf_counter()
        result = train_batch(config, vocab, batch, models / batch.name, resume_from=previous)
        previous = models / batch.name
        keep = ("batch_id", "steps", "train_loss", "val_loss", "val_masked_acc", "val_baseline_acc", "val_per_gene_acc",
                "val_expression_mse", "val_cells", "probe", "forgetting", "replay_cells_per_step",
                "replay_reservoir_cells")
        row = {k: result.get(k) for k in keep}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["cells_per_s"] = round(cells_in(batch) / max(row["seconds"], 1e-9), 1)
        rows.append(row)
        p = row["probe"] or {}
        drops = {b: f.get("change") for b, f in (row["forgetting"] or {}).items() if b != batch.name}
        sys.stdout.write(f"{batch.name}: forgetting (change of earlier batches' held-out masked-bin acc) {drops}\n")
        sys.stdout.write(f"{batch.name}: masked {row['val_masked_acc']:.3f} (per-gene {row['val_per_gene_acc']:.3f}, "
                         f"most-frequent {row['val_baseline_acc']:.3f}); probe {p.get('cls_probe_acc')} vs PCA "
                         f"{p.get('pca50_probe_acc')} vs untrained {p.get('untrained_probe_acc')}; "
                         f"{row['seconds']} s\n")
        sys.stdout.flush()
    return rows


def cells_in(batch: Path) -> int:
    import h5py

    total = 0
    for p in batch.glob("resampled_*.h5ad"):
        with h5py.File(p, "r") as f:
            total += int(f["X"].attrs["shape"][0])
    return total


# ---- evaluation memory ---------------------------------------------------------------------------------

_EVAL_CHILD = r"""
import json, resource, sys
from pathlib import Path
from atlasflow.core.config import load_config
from atlasflow.prep.genes import Vocabulary
from atlasflow.model.data import BatchData
from atlasflow.model.train import Trainer
folder, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
config = load_config(overrides=overrides)
trainer = Trainer(config, Vocabulary.builtin("pbmc68k"))
t = config.training
data = BatchData(folder, trainer.vocab, trainer.tokenizer, seed=t.seed, block_cells=t.block_cells,
                 val_fraction=t.val_fraction)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import time; t0 = time.perf_counter()
out = trainer.evaluate(data)
print(json.dumps({"rss_before_mb": before / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "val_cells": out["val_cells"], "val_cells_total": out["val_cells_total"],
                  "seconds": round(time.perf_counter() - t0, 2)}))
"""


def _write_big(path: Path, n_cells: int, seed: int) -> None:
    """A processed h5ad of ``n_cells`` Poisson-resampled cells, written chunk by chunk (never whole in memory)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    from atlasflow_testing.realdata import pbmc_counts

    pbmc = pbmc_counts()
    x = sp.csr_matrix(pbmc.X)
    labels = pbmc.obs["bulk_labels"].to_numpy().astype(str)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, x.shape[0], n_cells)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = (n_cells, x.shape[1])
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = [np.zeros(1, dtype=np.int64)]
        nnz = 0
        for lo in range(0, n_cells, 50_000):
            block = x[pick[lo: lo + 50_000]].tocsr()
            block.data = rng.poisson(block.data).astype(np.float32)
            block.eliminate_zeros()
            data.resize((nnz + block.nnz,))
            indices.resize((nnz + block.nnz,))
            data[nnz:], indices[nnz:] = block.data, block.indices
            indptr.append(block.indptr[1:].astype(np.int64) + nnz)
            nnz += block.nnz
        g.create_dataset("indptr", data=np.concatenate(indptr))
        obs = pd.DataFrame({"cell_type": pd.Categorical(labels[pick])}, index=pd.RangeIndex(n_cells).astype(str))
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=list(pbmc.var_names)))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    ad.read_h5ad(path, backed="r").file.close()  # fails loudly if the file is not a valid h5ad


def eval_memory(root: Path, overrides: dict, sizes: list[int]) -> list[dict]:
    from atlasflow_testing.realdata import pbmc_counts

    rows = []
    for n in sizes:
        folder = root / f"eval_{n}"
        folder.mkdir(parents=True)
        small = pbmc_counts()
        _write_h5ad(folder / "a_train.h5ad", small.X, small.obs["bulk_labels"].to_numpy(), small.var_names)
        _write_big(folder / "b_val.h5ad", n, seed=n)
        done = subprocess.run([sys.executable, "-c", _EVAL_CHILD, str(folder),
                               json.dumps({**overrides, "training.val_fraction": 0.5})],
                              capture_output=True, text=True, check=True)
        row = {"held_out_cells": n, **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        sys.stdout.write(f"evaluation at {n} held-out cells: peak RSS {row['peak_rss_mb']:.0f} MB "
                         f"(before {row['rss_before_mb']:.0f} MB), {row['seconds']} s\n")
        sys.stdout.flush()
        for p in folder.iterdir():
            p.unlink()
    return rows


def goals(with_replay: list[dict], without: list[dict]) -> dict:
    last = with_replay[-1]
    p = last["probe"] or {}
    first = with_replay[0]["batch_id"]

    def drop(rows: list[dict]) -> float | None:
        f = rows[-1]["forgetting"].get(first) or {}
        return None if f.get("change") is None else round(-f["change"], 4)

    return {
        "probe_ge_pca50": bool(p and p["cls_probe_acc"] >= p["pca50_probe_acc"]),
        "probe_ge_untrained_plus_0.05": bool(p and p["cls_probe_acc"] >= p["untrained_probe_acc"] + 0.05),
        "masked_ge_per_gene_plus_0.05": bool(last["val_masked_acc"] >= last["val_per_gene_acc"] + 0.05),
        "batch0_drop_with_replay": drop(with_replay),
        "batch0_drop_without_replay": drop(without),
        "batch0_drop_with_replay_le_0.01": (drop(with_replay) or 0) <= 0.01,
        "replay_drop_smaller": (drop(with_replay) or 0) < (drop(without) or 0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells-per-batch", type=int, default=50_000)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--datasets-per-batch", type=int, default=5)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override (JSON value), e.g. --set training.lr=0.003")
    parser.add_argument("--memory-sizes", default="10000,100000,1000000")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--replay-only", action="store_true", help="skip the comparison run without replay")
    parser.add_argument("--out", type=Path, default=RESULTS / "science.json")
    args = parser.parse_args()
    overrides: dict = {"model.preset": args.preset, "genes.vocab_path": "builtin:pbmc68k",
                       "training.val_fraction": 0.17, "training.seed": 0}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tfn\"" else value
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atlasflow-science-") as tmp:
        root = Path(tmp)
        batches = build_batches(root / "data", n_batches=args.batches, cells_per_batch=args.cells_per_batch,
                                datasets_per_batch=args.datasets_per_batch,
                                val_fraction=overrides["training.val_fraction"], seed=0)
        runs = {}
        variants = (("replay", {}), ("no_replay", {"training.replay_cells": 0}))
        for name, extra in variants[:1] if args.replay_only else variants:
            sys.stdout.write(f"== {name}\n")
            runs[name] = run(batches, root / name, {**overrides, **extra})
        result = _result(args, overrides, runs, [], t0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # kept if the memory part fails
        memory = [] if args.skip_memory else eval_memory(root / "memory", overrides,
                                                          [int(s) for s in args.memory_sizes.split(",")])
    result = _result(args, overrides, runs, memory, t0)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(json.dumps(result["goals"], indent=1) + "\n")
    return 0


def _result(args: argparse.Namespace, overrides: dict, runs: dict, memory: list[dict], t0: float) -> dict:
    return {
        "benchmark": "science",
        "command": "make bench BENCH=science  # = .venv/bin/python benchmarks/science.py " + " ".join(sys.argv[1:]),
        "data": f"Poisson-resampled pbmc68k_reduced: {args.batches} batches x {args.cells_per_batch} cells "
                "(80% from one group of cell types per batch); held out: the 700 real cells, bulk_labels",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "overrides": overrides,
        "runs": runs,
        "goals": goals(runs["replay"], runs.get("no_replay", runs["replay"])),
        "eval_memory": memory,
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
