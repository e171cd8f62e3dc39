"""``atlasflow dataset run ID``: one manifest row through download → (quant) → process, without Airflow.

Prints one JSON line: ``status`` (``processed`` or ``quarantined``; ``not_admitted`` when the budget
has no room), ``stage``, ``reason``, ``cells_before``, ``cells_after`` and the bytes (reserved,
downloaded, processed). Exit 0 for processed or quarantined (the answer a user asked for), 1 when
not admitted or the dataset is busy, 2 for an unknown row, an invalid manifest or config.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["register"]


def _cmd_run(args: Any, out: Any) -> int:
    from atlasflow.core.config import ConfigError, load_config
    from atlasflow.intake.manifest import read_manifest

    config = load_config(args.config)
    path = args.manifest or config.manifest.path
    if not path:
        raise ConfigError(["no manifest: pass --manifest FILE or set manifest.path in the config"])
    manifest = read_manifest(path, sheet=config.manifest.sheet, allowed_file_root=config.manifest.allowed_file_root)
    dataset = manifest.by_id().get(args.dataset_id)
    if dataset is None:
        known = ", ".join(d.dataset_id for d in manifest.datasets[:20])
        sys.stderr.write(f"error: no row {args.dataset_id!r} in {manifest.source} (dataset ids: {known}"
                         f"{', …' if len(manifest) > 20 else ''})\n")
        return 2
    from atlasflow.steps.trial import TrialBusy, run_dataset  # pulls the pipeline: only for this command

    try:
        result = run_dataset(config, dataset, keep=args.keep, wait_s=args.wait_s)
    except TrialBusy as exc:
        result = {"dataset_id": dataset.dataset_id, "status": "busy", "stage": None, "reason": str(exc)}
    out.write(json.dumps(result, default=str) + "\n")
    return 0 if result["status"] in ("processed", "quarantined") else 1


def register(sub: Any) -> None:
    """``atlasflow dataset run``."""
    d = sub.add_parser("dataset", help="work with one manifest row")
    dsub = d.add_subparsers(dest="dataset_command", required=True)
    run = dsub.add_parser("run", help="download → (quant) → process one row as the DAG would, and print one JSON "
                                      "line (processed or quarantined, why, cells before/after, bytes)")
    run.add_argument("dataset_id", metavar="ID", help="the row's dataset_id")
    run.add_argument("--config", help="config file (default $ATLASFLOW_CONFIG); its base_dir's budget is used")
    run.add_argument("--manifest", help="manifest file (default manifest.path from the config)")
    run.add_argument("--keep", action="store_true",
                     help="keep the processed h5ad (data/processed/trial_<ID>/), counted against the budget")
    run.add_argument("--wait-s", type=float, default=0.0,
                     help="wait this long for the budget to admit the row (default: answer at once)")
    run.set_defaults(func=_cmd_run)
