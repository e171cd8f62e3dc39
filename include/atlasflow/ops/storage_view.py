"""The storage view of the Airflow UI, as plain data and as one HTML page.

The plugin in ``plugins/atlasflow_airflow/ui`` only wires these to routes; everything shown is
read from ``storage.base_dir`` (ledger, plan, state files, ``reports/latest.json``), so the page
works from any machine that mounts the base dir and needs no Airflow database.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from atlasflow.core.config import AtlasConfig

__all__ = ["batch_progress", "latest_report", "render_page", "storage_view"]


def latest_report(config: AtlasConfig) -> Path | None:
    """The newest run report's HTML file, only if it lies under ``<base_dir>/reports``.

    ``reports/latest.json`` is a file anybody with write access to the base dir could edit; the
    view serves what it names, so a path outside the reports folder is refused, not followed.
    """
    reports = (Path(config.storage.base_dir) / "reports").resolve()
    try:
        pointer = json.loads((reports / "latest.json").read_text())
        path = Path(str(pointer["html"])).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not path.is_relative_to(reports) or path.suffix != ".html" or not path.is_file():
        return None
    return path


def batch_progress(config: AtlasConfig) -> list[dict[str, Any]]:
    """Per batch: datasets planned / downloaded / processed / quarantined, reservation and training state."""
    from atlasflow.ops.report import collect_run

    data = collect_run(config)
    reserved = {r["batch_id"] for r in _reservations(config)}
    trained = {t.get("batch_id"): t for t in data["trained"]}
    rows: dict[str, dict[str, Any]] = {}
    for d in data["datasets"]:
        row = rows.setdefault(d["batch_id"], {"batch_id": d["batch_id"], "datasets": 0, "downloaded": 0,
                                              "processed": 0, "quarantined": 0, "cells": 0})
        row["datasets"] += 1
        row["downloaded"] += bool(d["downloaded"])
        row["processed"] += d["status"] == "processed"
        row["quarantined"] += d["status"] == "quarantined"
        row["cells"] += d["cells_after"] or 0
    for bid, row in rows.items():
        done = trained.get(bid)
        row["reserved"] = bid in reserved
        row["trained"] = done is not None
        row["checkpoint"] = (done or {}).get("checkpoint_dir")
        row["state"] = ("trained" if done else "processing" if row["processed"] + row["quarantined"] else
                        "downloading" if row["reserved"] else "waiting")
    return [rows[b] for b in sorted(rows)]


def _reservations(config: AtlasConfig) -> list[dict[str, Any]]:
    from atlasflow.ops.monitor import storage_report

    return storage_report(config)["reservations"]


def storage_view(config: AtlasConfig) -> dict[str, Any]:
    """What the page shows: :func:`~atlasflow.ops.monitor.storage_report` plus batches and the report link."""
    from atlasflow.ops.monitor import storage_report

    report = latest_report(config)
    return {**storage_report(config), "batches": batch_progress(config),
            "latest_report": str(report) if report else None}


def _mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:,.2f} MB" if abs(n) < 1e9 else f"{n / 1e9:,.2f} GB"


@functools.cache
def _templates() -> Any:
    from atlasflow.ops.templates import environment

    return environment(mb=_mb)


def render_page(view: dict[str, Any], *, report_href: str = "report") -> str:
    """The storage view as one HTML page.

    Parameters
    ----------
    view
        What :func:`storage_view` returns.
    report_href
        The link to the latest run report, shown only when ``view["latest_report"]`` is set.

    Returns
    -------
    str
        The page (``templates/storage.html.j2``): the shared stylesheet inlined, no script, no
        external asset, every value escaped.
    """
    return _templates().get_template("storage.html.j2").render(view=view, report_href=report_href)
