"""``atlasflow storage``: per-area usage vs allocation, reservations, free disk, what cleanup could free."""

from __future__ import annotations

import time
from typing import Any

from atlasflow.core.config import GB, AtlasConfig

__all__ = ["render", "storage_report"]


def storage_report(config: AtlasConfig) -> dict[str, Any]:
    """Everything the monitor (and the Airflow UI view) shows, as plain data."""
    from atlasflow.storage.cleanup import Cleaner
    from atlasflow.storage.ledger import Ledger

    ledger = Ledger(config.storage)
    usage = ledger.usage()
    alloc = config.storage.area_bytes()
    reservations = []
    for r in ledger.reservations():
        reservations.append({"batch_id": r.batch_id, "bytes": r.bytes, "outstanding": ledger.outstanding(r),
                             "owner": r.owner, "age_s": round(time.time() - r.created, 1),
                             "lease_left_s": round(r.lease_expires - time.time(), 1),
                             # model_lane: holds it (bytes include the model artefacts), waits for it, or never trains
                             "model_lane": "held" if r.lane_held else "waiting" if r.lane_bytes else None,
                             "lane_bytes": r.lane_bytes})
    used = sum(usage.values())
    outstanding = sum(r["outstanding"] for r in reservations)
    budget = config.storage.max_storage_bytes
    return {
        "base_dir": str(ledger.layout.base_dir),
        "budget_bytes": budget,
        "used_bytes": used,
        "reserved_outstanding_bytes": outstanding,
        "headroom_bytes": budget - used - outstanding,
        "free_disk_bytes": ledger.layout.free_bytes(),
        "areas": {a: {"used": usage[a], "allocated": alloc[a], "over": usage[a] > alloc[a]} for a in usage},
        "reservations": reservations,
        "reclaimable_bytes": Cleaner(ledger).reclaimable(),
        "expansion": ledger.expansion_table(),
        "deleted_bytes_total": sum(d["bytes"] for d in ledger.deletions()),
    }


def _gb(n: int) -> str:
    return f"{n / GB:9.3f} GB"


def render(report: dict[str, Any]) -> str:
    lines = [f"storage under {report['base_dir']}"]
    lines.append(f"  budget {_gb(report['budget_bytes'])}   used {_gb(report['used_bytes'])}   reserved (not yet "
                 f"written) {_gb(report['reserved_outstanding_bytes'])}   headroom {_gb(report['headroom_bytes'])}")
    lines.append(f"  free on the volume {_gb(report['free_disk_bytes'])}")
    lines.append("  area        used          allocated     use")
    for name, a in report["areas"].items():
        pct = 100 * a["used"] / a["allocated"] if a["allocated"] else 0.0
        flag = "  OVER ALLOCATION" if a["over"] else ""
        lines.append(f"  {name:<8} {_gb(a['used'])}  {_gb(a['allocated'])}  {pct:5.1f}%{flag}")
    if report["reservations"]:
        lines.append("  reservations:")
        for r in report["reservations"]:
            lane = {"held": "  model lane", "waiting": f"  + {r['lane_bytes'] / GB:.3f} GB with the model lane"}
            lines.append(f"    {r['batch_id']:<12} {_gb(r['bytes'])} ({_gb(r['outstanding'])} outstanding)  "
                         f"{r['owner'] or '-'}  lease {r['lease_left_s'] / 3600:.1f} h left"
                         + lane.get(r["model_lane"], ""))
    else:
        lines.append("  reservations: none")
    rec = report["reclaimable_bytes"]
    lines.append("  cleanup could free: " + ", ".join(f"{k.replace('_', ' ')} {v / GB:.3f} GB" for k, v in rec.items()))
    return "\n".join(lines) + "\n"
