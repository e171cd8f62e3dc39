"""``atlasflow storage``: the budget, usage per area and reservations, once or every N seconds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any, TextIO

from atlasflow.core.config import load_config
from atlasflow.ops.monitor import render, storage_report

__all__ = ["register"]


def _run(args: argparse.Namespace, out: TextIO) -> int:
    config = load_config(args.config)
    if args.base_dir:
        config = dataclasses.replace(config, storage=dataclasses.replace(config.storage, base_dir=args.base_dir))
    shown = 0
    while True:
        report = storage_report(config)
        if args.json:
            out.write(json.dumps(report) + "\n")
        else:
            out.write(("\n" if shown else "") + time.strftime("%Y-%m-%d %H:%M:%S ") + render(report))
        out.flush()
        shown += 1
        if not args.watch or (args.count and shown >= args.count):
            return 0
        time.sleep(args.watch)


def register(sub: Any) -> None:
    p = sub.add_parser("storage", help="disk usage per area vs allocation, reservations, free disk, reclaimable bytes")
    p.add_argument("--config", help="config file (default $ATLASFLOW_CONFIG, else defaults)")
    p.add_argument("--base-dir", help="inspect this base dir instead of the configured one")
    p.add_argument("--json", action="store_true", help="one JSON object per refresh")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS (Ctrl-C to stop)")
    p.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    p.set_defaults(func=_run)
