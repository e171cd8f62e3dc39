"""A manifest the way a first-time user writes one: ``dataset_id, download_url, type, disease_status,
tissue_type`` and nothing else (no format, no sizes, no technology), over real cells on a local server.

:func:`build_seed_setup` writes under ``root``: ``www/`` (serve it at ``url``) with a direct h5ad, a
GEO series holding a 10x HDF5, and nothing at a third row's URL (a 404); ``manifest.csv`` in that
format; ``atlasflow.yaml`` pointing the GEO resolver at the server. Sizes must be learnt from the
server (HEAD, the GEO listing) since the manifest names none.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["SEED_COLUMNS", "build_seed_setup", "served_seed"]

SEED_COLUMNS = ["dataset_id", "download_url", "type", "disease_status", "tissue_type"]


def build_seed_setup(root: Path, url: str, *, cells: int = 60, budget_mb: float = 60.0,
                     unknown_size_gb: float = 0.02) -> dict[str, Any]:
    """Write the served files, the seed-format manifest and a config; returns ids, cells and file sizes.

    ``unknown_size_gb`` (20 MB by default) is what a row of unknown size reserves: larger than any
    file here, so a test can tell a probed size from the default.
    """
    from atlasflow_testing.demo import budget_yaml
    from atlasflow_testing.geo_server import geo_series_dir
    from atlasflow_testing.realdata import pbmc_counts, write_format

    pbmc = pbmc_counts()
    www = root / "www"
    h5ad = write_format(pbmc[:cells].copy(), "h5ad", www / "files", stem="seed_direct")
    geo = write_format(pbmc[cells:2 * cells].copy(), "10x_h5", geo_series_dir(www / "geo", "GSE900777"),
                       stem="GSE900777")
    rows = [["seed_direct", f"{url}/files/{h5ad.name}", "direct", "ALS", "spinal_cord"],
            ["seed_geo", "GSE900777", "geo", "control", "motor_cortex"],
            ["seed_gone", f"{url}/files/seed_gone.h5ad", "direct", "ALS", "spinal_cord"]]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SEED_COLUMNS)
        writer.writerows(rows)
    (root / "atlasflow.yaml").write_text(f"""# a seed-format manifest over the local stand-in server
storage:
  base_dir: base
{budget_yaml(budget_mb)}
  min_free_gb: 0
  checkpoint_gb: 0.001
  unknown_size_gb: {unknown_size_gb}
manifest:
  path: manifest.csv
plan:
  batch_size: 3
  schedule: null
download:
  geo_base_url: {url}/geo
  retries: 1
  attempts: 1
  backoff_s: 0.1
qc:
  min_genes: 50
genes:
  vocab_path: builtin:pbmc68k
integration:
  enabled: false
""")
    return {"ids": [r[0] for r in rows], "cells": {"seed_direct": cells, "seed_geo": cells},
            "bytes": {"seed_direct": h5ad.stat().st_size, "seed_geo": geo.stat().st_size}, "www": str(www)}


@contextlib.contextmanager
def served_seed(root: Path, **options: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """:func:`build_seed_setup` under ``root`` with its files served by a local
    :class:`~atlasflow_testing.geo_server.GeoServer` for a ``with`` block; yields ``(server, info)``
    (the config is ``root / "atlasflow.yaml"``)."""
    from atlasflow_testing.geo_server import GeoServer

    (root / "www").mkdir(parents=True, exist_ok=True)
    with GeoServer(root / "www") as server:
        yield server, build_seed_setup(root, server.url, **options)
