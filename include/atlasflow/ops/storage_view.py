"""The storage view of the Airflow UI, as plain data and as one HTML page.

The plugin in ``plugins/atlasflow_airflow/ui`` only wires these to routes; everything shown is
read from ``storage.base_dir`` (ledger, plan, state files, ``reports/latest.json``), so the page
works from any machine that mounts the base dir and needs no Airflow database.
"""

from __future__ import annotations

import html
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


def _bar(used: float, total: float) -> str:
    pct = 0.0 if total <= 0 else min(100.0, 100.0 * used / total)
    colour = "#c0392b" if used > total else "#2e86c1"
    return (f'<div class=bar title="{pct:.1f} %"><div style="width:{pct:.1f}%;background:{colour}"></div></div>'
            f"<span class=pct>{pct:.1f} %</span>")


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}.bar{display:inline-block;width:240px;height:.9em;background:#eee;vertical-align:middle}
.bar div{height:100%}.pct{margin-left:.5em}.key{font-weight:600}.none{color:#777}"""


def render_page(view: dict[str, Any], *, report_href: str = "report") -> str:
    """The storage view as one HTML page (no script, no external asset; every value escaped)."""
    e = html.escape
    budget, used, reserved = view["budget_bytes"], view["used_bytes"], view["reserved_outstanding_bytes"]
    parts = ["<!doctype html><html><head><meta charset=utf-8><title>atlasflow storage</title>",
             f"<style>{_CSS}</style></head><body><h1>atlasflow storage</h1>",
             f"<p>base dir <code>{e(view['base_dir'])}</code></p>",
             "<table id=budget><tr><th>budget</th><th>used on disk</th><th>reserved, not yet written</th>"
             "<th>headroom</th><th>free on the volume</th></tr>",
             f"<tr><td class=key>{_mb(budget)}</td><td>{_mb(used)} {_bar(used, budget)}</td>"
             f"<td>{_mb(reserved)}</td><td>{_mb(view['headroom_bytes'])}</td>"
             f"<td>{_mb(view['free_disk_bytes'])}</td></tr></table>",
             "<h2>Areas</h2><table id=areas><tr><th>area</th><th>used</th><th>allocated</th><th>use</th></tr>"]
    for name, a in view["areas"].items():
        parts.append(f"<tr><td>{e(name)}</td><td>{_mb(a['used'])}</td><td>{_mb(a['allocated'])}</td>"
                     f"<td>{_bar(a['used'], a['allocated'])}{' over allocation' if a['over'] else ''}</td></tr>")
    parts.append("</table><h2>Reservations</h2>")
    if view["reservations"]:
        parts.append("<table id=reservations><tr><th>batch</th><th>reserved</th><th>outstanding</th><th>owner</th>"
                     "<th>lease left</th></tr>")
        for r in view["reservations"]:
            parts.append(f"<tr><td>{e(r['batch_id'])}</td><td>{_mb(r['bytes'])}</td><td>{_mb(r['outstanding'])}</td>"
                         f"<td>{e(str(r['owner'] or '-'))}</td><td>{r['lease_left_s'] / 3600:.1f} h</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=none>No reservation: no batch is holding disk.</p>")
    parts.append("<h2>Batches</h2>")
    if view["batches"]:
        parts.append("<table id=batches><tr><th>batch</th><th>state</th><th>datasets</th><th>downloaded</th>"
                     "<th>processed</th><th>quarantined</th><th>cells</th><th>checkpoint</th></tr>")
        for b in view["batches"]:
            parts.append(f"<tr id=\"b-{e(b['batch_id'])}\"><td>{e(b['batch_id'])}</td><td>{e(b['state'])}</td>"
                         f"<td>{b['datasets']}</td><td>{b['downloaded']}</td><td>{b['processed']}</td>"
                         f"<td>{b['quarantined']}</td><td>{b['cells']}</td>"
                         f"<td><code>{e(b['checkpoint'] or '')}</code></td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=none>No plan yet: trigger atlas_ingest.</p>")
    parts.append(f'<h2>Run report</h2><p><a id=report href="{e(report_href)}" target=_blank>latest run report</a></p>'
                 if view["latest_report"] else "<h2>Run report</h2><p class=none>No report yet.</p>")
    rec = view["reclaimable_bytes"]
    parts.append("<p>cleanup could free: " + e(", ".join(f"{k.replace('_', ' ')} {_mb(v)}" for k, v in rec.items()))
                 + f"; freed so far {_mb(view['deleted_bytes_total'])}</p></body></html>")
    return "".join(parts)
