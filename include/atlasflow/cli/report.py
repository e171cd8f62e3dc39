"""``atlasflow report``: write the run report and run_metrics.json from a base_dir."""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from atlasflow.core.config import load_config
from atlasflow.ops.report import write_run_report

__all__ = ["register"]


def _run(args: argparse.Namespace, out: TextIO) -> int:
    config = load_config(args.config)
    config = dataclasses.replace(config, storage=dataclasses.replace(config.storage, base_dir=args.run_dir))
    if not (Path(args.run_dir) / "state").is_dir():
        raise ValueError(f"{args.run_dir} is not a run dir: it has no state/ folder (pass storage.base_dir)")
    run_id = args.run_id or "cli-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    written = write_run_report(config, run_id, out=Path(args.out) if args.out else None)
    if args.json:
        out.write(json.dumps(written) + "\n")
    else:
        out.write(f"report {written['html']}\nmetrics {written['metrics']}\n")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="write the run report (HTML with inline plots) and run_metrics.json")
    p.add_argument("run_dir", help="the run's storage.base_dir (holds state/, data/, models/)")
    p.add_argument("--out", help="HTML file to write (run_metrics.json goes next to it); default "
                                 "RUN_DIR/reports/<run-id>/report.html, which also updates reports/latest.json")
    p.add_argument("--run-id", help="name of the report (default cli-<UTC time>)")
    p.add_argument("--config", help="config file, for the budget when the ledger has no samples yet")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=_run)
