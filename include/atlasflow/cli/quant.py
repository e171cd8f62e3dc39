"""``atlasflow quant run|ref``: quantify a reads dataset (the quant task / SLURM job), build a reference."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from atlasflow.acquire.quant import build_reference
from atlasflow.core.fsutil import write_json_atomic

__all__ = ["register"]


def _cmd_run(args: Any, out: Any) -> int:
    from atlasflow.core.config import load_config
    from atlasflow.steps.ingest import (
        run_quant,  # torch-free, but pulls the whole pipeline: only for this command
    )

    result = run_quant(load_config(args.config), args.batch_id, args.dataset_id)
    result_path = os.environ.get("ATLASFLOW_RESULT_PATH")
    if result_path:  # set by the SLURM job script: the operator reads the result from there
        write_json_atomic(Path(result_path), result)
    out.write(json.dumps(result) + "\n")
    return 0  # a failed quantification is a result (quarantine), not a failed job


def _cmd_ref(args: Any, out: Any) -> int:
    paths = build_reference(Path(args.fasta), Path(args.gtf), Path(args.out))
    out.write(json.dumps(paths) + "\n")
    out.write(f"set in the config:\n  quant:\n    index: {paths['index']}\n    t2g: {paths['t2g']}\n")
    return 0


def register(sub: Any) -> None:
    """``atlasflow quant run|ref``."""
    q = sub.add_parser("quant", help="raw reads -> counts with kallisto|bustools (kb-python)")
    qsub = q.add_subparsers(dest="quant_command", required=True)
    run = qsub.add_parser("run", help="quantify one downloaded reads dataset (what the quant task / SLURM job runs)")
    run.add_argument("--config", help="config file (default $ATLASFLOW_CONFIG)")
    run.add_argument("--batch-id", required=True)
    run.add_argument("--dataset-id", required=True)
    run.set_defaults(func=_cmd_run)
    ref = qsub.add_parser("ref", help="build a kallisto index + t2g from genome FASTA + GTF (kb ref), once")
    ref.add_argument("--fasta", required=True, help="genome FASTA (.fa or .fa.gz)")
    ref.add_argument("--gtf", required=True, help="gene annotation GTF (.gtf or .gtf.gz)")
    ref.add_argument("--out", required=True, help="folder for index.idx, t2g.txt, cdna.fa")
    ref.set_defaults(func=_cmd_ref)
