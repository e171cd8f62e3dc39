"""Pseudo-labels from outputs/retrain/retrain.csv train the cell-type head (opt-in), and the retraining
decision shows the head's accuracy on canary cells, candidate beside production.

One batch of four processed datasets of real pbmc cells: ``d0`` has curated labels (obs cell_type from
bulk_labels) and is the batch's held-out dataset; ``d1``-``d3`` have none. The retraining set labels
every cell with its true bulk label (a perfect annotator), so what the head learns comes from it alone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from atlasflow.cli.main import main
from atlasflow.core.config import ConfigError, load_config
from atlasflow.core.fsutil import write_json_atomic
from atlasflow.intake.manifest import Dataset
from atlasflow.model import pseudo
from atlasflow.model.data import BatchData, split_datasets
from atlasflow.model.train import Trainer
from atlasflow.prep.genes import Vocabulary
from atlasflow.prep.process import process_dataset
from atlasflow.steps import ingest as P
from atlasflow.steps import retrain as R
from atlasflow_testing.realdata import pbmc_counts, write_format

pytestmark = pytest.mark.slow  # every test trains on real cells (module fixture ~25 s)

TINY = {"model.preset": "custom", "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 64,
        "model.max_genes": 64, "training.batch_cells": 32, "training.block_cells": 64, "training.warmup_steps": 3,
        "training.checkpoint_every_steps": 3, "qc.min_genes": 10, "genes.vocab_path": "builtin:pbmc68k",
        "training.epochs": 2, "training.lr": 0.003, "training.val_fraction": 0.25, "model.cell_type_weight": 1.0}
DATASETS = ["d0", "d1", "d2", "d3"]


def _obs_names(path: Path) -> list[str]:
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        return [str(n) for n in read_elem(f["obs"]["_index"])]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The processed batch, the true labels of its cells, and the cell-type classes."""
    root = tmp_path_factory.mktemp("pseudo")
    pbmc = pbmc_counts()
    truth = dict(zip(pbmc.obs_names.astype(str), pbmc.obs["bulk_labels"].astype(str), strict=True))
    types = sorted(set(truth.values()))
    config = load_config(overrides=TINY)
    vocab = Vocabulary.builtin("pbmc68k")
    batch = root / "base" / "data" / "processed" / "batch_0000"
    for i, ds in enumerate(DATASETS):
        raw = root / "raw" / ds
        write_format(pbmc[i * 150: (i + 1) * 150].copy(), "h5ad", raw)
        key = "bulk_labels" if ds == "d0" else None  # only d0 has curated labels
        process_dataset(raw, Dataset(ds, "https://h/x.h5ad", "direct", 2, cell_type_key=key), config=config,
                        out_path=batch / f"{ds}.h5ad", vocab=vocab, cache_dir=root / "cache")
    assert split_datasets(DATASETS, val_fraction=0.25, seed=0) == (["d1", "d2", "d3"], ["d0"])  # d0 is held out
    return {"root": root, "batch": batch, "truth": truth, "types": types, "vocab": vocab}


def _write_table(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(R.RETRAIN_COLUMNS)
        for cell, ds, label in rows:
            w.writerow([cell, ds, label, "0.95", "test", "", "fb.csv", "0" * 64, 0, "0.9"])
    return path


def _config(world, **extra):
    return load_config(overrides={**TINY, "storage.base_dir": str(world["root"] / "base"),
                                  "model.cell_types": ",".join(world["types"]), **extra})


def test_switching_it_on_without_cell_types_names_both_settings():
    with pytest.raises(ConfigError, match="retrain.train_on_pseudo_labels is on but model.cell_types is empty"):
        load_config(overrides={"retrain.train_on_pseudo_labels": True})
    assert load_config(overrides={"retrain.train_on_pseudo_labels": True, "model.cell_types": "B,T"})


def test_matching_rules_curated_labels_win_and_held_out_datasets_get_none(world, tmp_path):
    types = world["types"]
    config = _config(world)
    data = BatchData(world["batch"], world["vocab"], Trainer(config, world["vocab"]).tokenizer, seed=0,
                     block_cells=64, val_fraction=0.25, cell_types=types)
    (d0,) = data.val
    names = {f.dataset_id: _obs_names(f.path) for f in data.train + data.val}
    assert names["d1"][0].startswith("d1:")  # processed obs names are <dataset_id>:<barcode>
    label_of = world["truth"]
    other = next(t for t in types if t != label_of[names["d0"][0].split(":", 1)[1]])
    rows = ([(n, "d1", label_of[n.split(":", 1)[1]]) for n in names["d1"][:10]]  # the processed obs name
            + [(n.split(":", 1)[1], "d2", label_of[n.split(":", 1)[1]]) for n in names["d2"][:5]]  # the barcode
            + [(names["d3"][0], "d3", "not a cell type of the model"), (names["d3"][1], "d3", types[0]),
               ("no-such-cell", "d3", types[0]), ("c1", "elsewhere", types[0])]
            + [(n, "d0", other) for n in names["d0"]])  # held out here, and curated anyway
    table = pseudo.PseudoLabels.read(_write_table(tmp_path / "retrain.csv", rows))
    assert table.sha256 == hashlib.sha256((tmp_path / "retrain.csv").read_bytes()).hexdigest()

    train, use = pseudo.apply_pseudo_labels(data.train, table, types, held_out={"d0"})
    assert use.cells == 16 and use.datasets == {"d1": 10, "d2": 5, "d3": 1}
    assert use.skipped == {pseudo.HELD_OUT: 150, pseudo.UNKNOWN_LABEL: 1, pseudo.NO_CELL: 1, pseudo.NOT_IN_BATCH: 1}
    assert use.cells + sum(use.skipped.values()) == use.rows == len(rows)  # every row accounted for once
    by_id = {f.dataset_id: f for f in train}
    assert [types[i] for i in by_id["d1"].labels[:10]] == [label_of[n.split(":", 1)[1]] for n in names["d1"][:10]]
    assert (by_id["d1"].labels[10:] == -100).all() and (by_id["d3"].labels[2:] == -100).all()
    assert by_id["d3"].labels[0] == -100 and types[by_id["d3"].labels[1]] == types[0]

    # a curated obs cell_type always wins over a pseudo-label that contradicts it
    (curated,), kept = pseudo.apply_pseudo_labels([d0], table, types, held_out=())
    assert kept.cells == 0 and kept.skipped[pseudo.CURATED] == 150
    assert np.array_equal(curated.labels, d0.labels) and (d0.labels >= 0).all()


@pytest.fixture(scope="module")
def trained(world):
    """The batch trained by `atlasflow train` with the setting off and on, the retraining set in its place."""
    base = world["root"] / "base"
    rows = [(n, ds, world["truth"][n.split(":", 1)[1]]) for ds in DATASETS
            for n in _obs_names(world["batch"] / f"{ds}.h5ad")]
    table = _write_table(base / "outputs" / "retrain" / "retrain.csv", rows)
    out = {"table": table}
    for name, on in (("off", False), ("on", True)):
        config = _config(world, **{"retrain.train_on_pseudo_labels": on})
        path = write_json_atomic(world["root"] / f"{name}.json", config.to_dict())
        ckpt = base / "models" / "checkpoints" / f"{name}"
        assert main(["train", "--config", str(path), "--batch-dir", str(world["batch"]), "--out", str(ckpt)],
                    out=io.StringIO()) == 0
        out[name] = {"config": config, "ckpt": ckpt, "result": json.loads((ckpt / "result.json").read_text())}
    return out


def _held_out_head_accuracy(world, config, ckpt: Path) -> float | None:
    trainer = Trainer.load(ckpt, config, world["vocab"])
    sample = BatchData(world["batch"], world["vocab"], trainer.tokenizer, seed=0, block_cells=64,
                       val_fraction=0.25).sample("val", 1000, seed=0)
    return R.head_accuracy(trainer, sample.cells.tokens, sample.cells.bins, sample.cell_type,
                           world["types"])["cell_type_acc"]


def test_pseudo_labels_train_the_head_when_on_and_are_ignored_when_off(world, trained):
    off, on = trained["off"], trained["on"]
    # off: the file is there, nothing reads it; no training cell has a label, so the head never moves
    assert off["result"]["pseudo_labels"] is None
    initial = Trainer(off["config"], world["vocab"]).model.cell_head.weight.detach()
    off_head = Trainer.load(off["ckpt"], off["config"], world["vocab"]).model.cell_head.weight.detach()
    assert torch.equal(initial, off_head)
    # on: every training cell of d1-d3 is labelled, the held-out d0 never is; result.json says so
    used = on["result"]["pseudo_labels"]
    assert used["path"] == str(trained["table"]) and used["sha256"] == R._sha256(trained["table"])
    assert used["cells"] == 450 and used["datasets"] == {"d1": 150, "d2": 150, "d3": 150}
    assert used["skipped"] == {pseudo.HELD_OUT: 150}
    on_head = Trainer.load(on["ckpt"], on["config"], world["vocab"]).model.cell_head.weight.detach()
    assert not torch.equal(initial, on_head)
    # and the head does better on the held-out curated cells than the untrained one
    acc_off = _held_out_head_accuracy(world, off["config"], off["ckpt"])
    acc_on = _held_out_head_accuracy(world, on["config"], on["ckpt"])
    print(f"held-out (d0) head accuracy: without pseudo-labels {acc_off}, with {acc_on}")
    assert acc_on > acc_off + 0.05
    # the checkpoint keeps the held-out cells' curated labels for atlas_retrain
    with np.load(on["ckpt"] / "val_sets.npz") as z:
        assert set(z["batch_0000__labels"].astype(str)) <= set(world["types"]) and z["batch_0000__labels"].size

    # the pipeline's command line names the file only when the setting is on, derived from base_dir
    for name, expect in (("off", False), ("on", True)):
        cmd = P.training_job(trained[name]["config"], "batch_0000", previous_checkpoint=None)["command"]
        assert ("--pseudo-labels" in cmd) is expect
        if expect:
            assert cmd[cmd.index("--pseudo-labels") + 1] == str(trained["table"])


def test_asked_for_before_any_retraining_set_exists_trains_without(world, tmp_path):
    from atlasflow.model.train import train_batch

    config = _config(world, **{"storage.base_dir": str(tmp_path / "base"), "retrain.train_on_pseudo_labels": True})
    result = train_batch(config, world["vocab"], world["batch"], tmp_path / "ckpt",
                         pseudo_labels=R.retrain_set_path(config))
    assert result["pseudo_labels"]["cells"] == 0 and result["pseudo_labels"]["sha256"] is None


def test_decision_record_carries_the_canary_head_accuracy(world, trained):
    on, off = trained["on"], trained["off"]
    # every held-out dataset in the canary split
    config = on["config"].with_overrides({"retrain.canary_fraction": 1.0})
    write_json_atomic(config.base_dir / "models" / "production.json",
                      {"checkpoint_dir": str(off["ckpt"]), "model_sha256": R._sha256(off["ckpt"] / "model.pt")})
    evaluation = R.evaluate_candidate(config, on["ckpt"])
    canary = evaluation["splits"]["canary"]
    assert set(evaluation["splits"]) == {"canary"} and canary["datasets"] == ["d0"]
    assert canary["cell_type_cells"] == canary["cells"] == 150  # every d0 cell has a curated label the head knows
    assert canary["candidate"]["cell_type_acc"] is not None and canary["production"]["cell_type_acc"] is not None
    record = R.promote_or_keep(config, evaluation, run_id="t1")
    print("decision:", record["action"], "-", record["reason"])
    head = record["cell_type_head"]["canary"]
    assert head["candidate"] == canary["candidate"]["cell_type_acc"]
    assert head["production"] == canary["production"]["cell_type_acc"]
    assert head["candidate"] > head["production"] and head["change"] == round(head["candidate"] - head["production"], 6)
    assert "canary: cell-type head accuracy" in record["reason"]
    assert record["candidate_pseudo_labels"]["cells"] == 450
    on_disk = json.loads((config.base_dir / "outputs" / "retrain" / "decision.json").read_text())
    assert on_disk["cell_type_head"] == record["cell_type_head"]

    # a checkpoint written before labels were kept: its cells count as unlabelled, no figure, no error
    old = on["ckpt"].parent / "old"
    shutil.copytree(on["ckpt"], old)
    with np.load(old / "val_sets.npz") as z:
        arrays = {k: z[k] for k in z.files if not k.endswith("__labels")}
    np.savez_compressed(old / "val_sets.npz", **arrays)
    cells = R._eval_cells(config, old)
    assert (cells["canary"]["labels"] == "").all()
    assert R._score(config, old, cells)["canary"]["cell_type_acc"] is None


def test_decide_shows_head_figures_only_where_there_are_some():
    m = {"loss": 1.0, "masked_acc": 0.5, "baseline_acc": 0.3, "cell_type_acc": None}
    no_head = {"production": "p", "splits": {"canary": {"cells": 10, "cell_type_cells": 0, "candidate": m,
                                                        "production": m}}}
    d = R.decide(no_head, tolerance=0.01)
    assert d.cell_type_head == {} and "cell-type" not in d.reason
    first = {"production": None, "splits": {"canary": {"cells": 10, "cell_type_cells": 8,
                                                       "candidate": {**m, "cell_type_acc": 0.4}}}}
    d = R.decide(first, tolerance=0.01)
    assert d.promote and d.cell_type_head == {"canary": {"candidate": 0.4, "production": None, "change": None,
                                                         "cells": 8}}
    assert "canary: cell-type head accuracy n/a -> 0.4000 (8 labelled cells)" in d.reason
