"""``atlasflow train``: train one batch (what the local backend and the SLURM job both run)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, TextIO

from atlasflow.prep.genes import run_vocabulary

__all__ = ["register"]


def _train(args: argparse.Namespace, out: TextIO) -> int:
    from atlasflow.core.config import load_config
    from atlasflow.model.train import train_batch

    config = load_config(args.config)
    batch_dir = Path(args.batch_dir)
    if not batch_dir.is_dir():
        raise ValueError(f"--batch-dir {batch_dir} is not a folder")
    resume = Path(args.resume_from) if args.resume_from else None
    if resume is not None and not (resume / "model.pt").exists():
        raise ValueError(f"--resume-from {resume} is not a checkpoint folder (no model.pt)")
    pseudo = Path(args.pseudo_labels) if args.pseudo_labels else None
    if pseudo is None and config.retrain.train_on_pseudo_labels:
        from atlasflow.steps.retrain import retrain_set_path

        pseudo = retrain_set_path(config)  # the same file the pipeline names on its command line
    result = train_batch(config, run_vocabulary(config, args.vocab), batch_dir, Path(args.out), resume_from=resume,
                         pseudo_labels=pseudo)
    if int(os.environ.get("RANK", "0")) != 0:  # a DDP rank other than 0: the result is rank 0's to write
        return 0
    result_path = os.environ.get("ATLASFLOW_RESULT_PATH")
    if result_path:  # set by the SLURM job script: the operator reads the result from there
        from atlasflow.core.fsutil import write_json_atomic

        write_json_atomic(Path(result_path), result)
    out.write(json.dumps(result) + "\n")
    return 0


def _embed(args: argparse.Namespace, out: TextIO) -> int:
    from atlasflow.core.config import load_config
    from atlasflow.model.train import embed_file

    config = load_config(args.config)
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "model.pt").exists():
        raise ValueError(f"--checkpoint {checkpoint} is not a checkpoint folder (no model.pt)")
    result = embed_file(checkpoint, Path(args.input), Path(args.out), config=config,
                        vocab=run_vocabulary(config, args.vocab))
    out.write(json.dumps(result) + "\n")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train the model on one batch folder of processed h5ad files")
    p.add_argument("--config", help="config file (default $ATLASFLOW_CONFIG)")
    p.add_argument("--batch-dir", required=True, help="data/processed/<batch_id>")
    p.add_argument("--resume-from", help="the previous batch's checkpoint folder")
    p.add_argument("--out", required=True, help="checkpoint folder to write (models/checkpoints/<batch_id>)")
    p.add_argument("--vocab", help="vocabulary file (default: state/vocab.json, else genes.vocab_path)")
    p.add_argument("--pseudo-labels", help="retraining set whose labels train the cell-type head (default: "
                   "<base_dir>/outputs/retrain/retrain.csv when retrain.train_on_pseudo_labels is on, else none)")
    p.set_defaults(func=_train)
    e = sub.add_parser("embed", help="add cell (obsm X_atlas) and gene (varm X_atlas_gene) embeddings to a file")
    e.add_argument("--config", help="config file (default $ATLASFLOW_CONFIG); its model section must match")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--input", required=True, help="h5ad or any readable count file")
    e.add_argument("--out", required=True, help="h5ad to write")
    e.add_argument("--vocab", help="vocabulary file (default: as for train)")
    e.set_defaults(func=_embed)
