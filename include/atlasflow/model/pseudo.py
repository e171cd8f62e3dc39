"""Pseudo-labels from the retraining set as training labels of the cell-type head.

``outputs/retrain/retrain.csv`` (written by :func:`atlasflow.steps.retrain.build_retrain_set`) holds one
confident prediction per cell: ``cell_id, dataset_id, pseudo_label, confidence, ...``. With
``retrain.train_on_pseudo_labels`` on, ``atlasflow train`` gives those labels to the matching cells
of the batch it trains:

- a cell is matched by its dataset id (the processed file's stem) and its obs name, either as
  written in the processed file (``<dataset_id>:<barcode>``) or as the original barcode;
- a curated label (the processed file's obs ``cell_type``, any value other than an unlabelled
  marker) always wins: its cell is never pseudo-labelled, even when the curated value is not
  one of ``model.cell_types``;
- held-out datasets (this batch's validation datasets and every earlier batch's) never get
  one: they are what the retraining decision is measured on;
- a label that is not one of ``model.cell_types`` is skipped (the head cannot predict it).

Every row of the table is counted once, under ``cells`` (used) or under the reason it was not.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atlasflow.model.data import DatasetFile, _labels_at

__all__ = ["PseudoLabelUse", "PseudoLabels", "apply_pseudo_labels"]

log = logging.getLogger(__name__)

NOT_IN_BATCH = "dataset not trained in this batch"
HELD_OUT = "held-out (validation/canary) dataset"
NO_CELL = "cell not in the processed file"
UNKNOWN_LABEL = "label not in model.cell_types"
CURATED = "curated cell_type kept"


@dataclass(frozen=True)
class PseudoLabels:
    """The retraining set as ``{dataset_id: {cell_id: label}}``, with the file's hash."""

    path: str
    sha256: str
    rows: int
    by_dataset: Mapping[str, Mapping[str, str]]

    @classmethod
    def read(cls, path: Path) -> PseudoLabels:
        """Read ``retrain.csv``; a row without ``cell_id``, ``dataset_id`` or ``pseudo_label`` is an error.

        Raises
        ------
        ValueError
            When a column is missing or a cell has two different labels (the table is built with
            one label per cell, so either would mean it was edited by hand).
        """
        raw = path.read_bytes()
        by_dataset: dict[str, dict[str, str]] = {}
        rows = 0
        reader = csv.DictReader(raw.decode("utf-8").splitlines())
        missing = {"cell_id", "dataset_id", "pseudo_label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a retraining set, no column {', '.join(sorted(missing))}")
        for n, row in enumerate(reader, start=2):
            cell, ds, label = (str(row.get(k) or "").strip() for k in ("cell_id", "dataset_id", "pseudo_label"))
            if not (cell and ds and label):
                raise ValueError(f"{path}, line {n}: cell_id, dataset_id and pseudo_label are all required")
            cells = by_dataset.setdefault(ds, {})
            if cells.get(cell, label) != label:
                raise ValueError(f"{path}, line {n}: {ds}/{cell} has two labels ({cells[cell]!r}, {label!r})")
            cells[cell] = label
            rows += 1
        return cls(str(path), hashlib.sha256(raw).hexdigest(), rows, by_dataset)


@dataclass(frozen=True)
class PseudoLabelUse:
    """What one batch took from the retraining set: the cells labelled and why the other rows were not."""

    path: str
    sha256: str
    rows: int
    cells: int
    labels: dict[str, int]
    datasets: dict[str, int]
    skipped: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _obs_names(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(obs names, curated cell_type per cell with "" where unlabelled, or None without the column)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        obs = f["obs"]
        names = np.asarray(read_elem(obs[obs.attrs["_index"]])).astype(str)
        curated = None
        if "cell_type" in obs:
            curated = _labels_at(read_elem(obs["cell_type"]), np.arange(names.size))
    return names, curated


def apply_pseudo_labels(files: Sequence[DatasetFile], pseudo: PseudoLabels, cell_types: Sequence[str], *,
                        held_out: Iterable[str]) -> tuple[list[DatasetFile], PseudoLabelUse]:
    """``files`` (the batch's training files) with pseudo-labels added to their ``labels``; what was used.

    Only files with rows in the table are opened (their obs names and curated labels are read);
    the others are returned as they are.
    """
    if not cell_types:
        raise ValueError("pseudo-labels train the cell-type head, and model.cell_types is empty: list the labels there")
    index = {c: i for i, c in enumerate(cell_types)}
    excluded = set(held_out)
    skipped: Counter[str] = Counter()
    used_labels: Counter[str] = Counter()
    used_datasets: Counter[str] = Counter()
    out = []
    train_ids = {f.dataset_id for f in files}
    for ds, cells in pseudo.by_dataset.items():
        if ds in excluded:
            skipped[HELD_OUT] += len(cells)
        elif ds not in train_ids:
            skipped[NOT_IN_BATCH] += len(cells)
    for f in files:
        table = pseudo.by_dataset.get(f.dataset_id)
        if not table or f.dataset_id in excluded:
            out.append(f)
            continue
        names, curated = _obs_names(f.path)
        prefix = f"{f.dataset_id}:"
        labels = f.labels.copy()
        matched: set[str] = set()
        for i, name in enumerate(names):
            key = name
            if key not in table and name.startswith(prefix):
                key = name[len(prefix):]  # the feedback named the original barcode
            if key not in table:
                continue
            matched.add(key)
            label = table[key]
            if curated is not None and curated[i] != "":
                skipped[CURATED] += 1
            elif label not in index:
                skipped[UNKNOWN_LABEL] += 1
            else:
                labels[i] = index[label]
                used_labels[label] += 1
                used_datasets[f.dataset_id] += 1
        skipped[NO_CELL] += len(table) - len(matched)
        out.append(dataclasses.replace(f, labels=labels))
    use = PseudoLabelUse(pseudo.path, pseudo.sha256, pseudo.rows, sum(used_labels.values()),
                         dict(sorted(used_labels.items())), dict(sorted(used_datasets.items())), dict(sorted((+skipped).items())))
    log.info("pseudo-labels from %s (sha256 %s): %d cells labelled in %s; not used: %s", pseudo.path, pseudo.sha256[:12],
             use.cells, use.datasets or "no dataset", use.skipped or "none")
    return out, use
