"""Build the demo: a local "GEO" of real cells in many formats, its manifest and a config.

scanpy's bundled pbmc68k_reduced (700 real PBMCs, raw counts recovered) is split into 7 datasets of
100 cells, each written in a different format; one is published as a GEO series in GEO's folder
layout, the others as direct downloads. An eighth row points at a file that does not exist, to
show quarantine. The budget is small enough that batches must wait for each other.

``python -m atlasflow_testing.demo --root DIR --url http://127.0.0.1:PORT`` writes
``DIR/www`` (serve it), ``DIR/manifest.xlsx`` and ``DIR/atlasflow.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["DEMO_BUDGET_MB", "build_demo"]

# make demo's budget: one batch (its files plus its computed model artefacts, 15-19 MB: the
# checkpoint twice while a save swaps it, the scVI model, scoring pool and latent) fits next to what
# the previous batch leaves (its checkpoint and integration output: ~5 MB measured, at most ~10 MB
# estimated), but two batches (31 MB and more) never fit together, so each waits for the previous
# one's cleanup (tests/atlasflow/test_demo_config.py)
DEMO_BUDGET_MB = 30.0

FORMATS = ["h5ad", "10x_h5", "loom", "csv", "tsv_gz", "10x_mtx_tar", "h5ad"]


def budget_yaml(budget_mb: float) -> str:
    """The ``storage`` keys that split a budget of ``budget_mb`` MB between the areas (half data, 40%
    models, 5% each cache and outputs), as YAML lines indented under ``storage:``."""
    gb = budget_mb / 1000
    return (f"  max_storage_gb: {gb}\n  data_gb: {gb * 0.5}\n  models_gb: {gb * 0.4}\n"
            f"  cache_gb: {gb * 0.05}\n  outputs_gb: {gb * 0.05}")


def build_demo(root: Path, url: str, *, n_datasets: int = 7, cells: int = 100, batch_size: int = 3,
               budget_mb: float = 15.0, integration_epochs: int = 5, missing_row: bool = True,
               missing_at: int | None = None, keep_checkpoints: int = 1,
               checkpoint_gb: float | None = 0.008) -> dict[str, Any]:
    """Write ``root/www`` (to serve at ``url``), ``root/manifest.xlsx`` and ``root/atlasflow.yaml``.

    ``missing_at`` puts the 404 row at that manifest position (default: last);
    ``keep_checkpoints`` is the cleanup policy's ``storage.keep_checkpoints``; ``checkpoint_gb`` is
    ``storage.checkpoint_gb``: the tests pin each batch's model-artefact reservation to 8 MB, so their
    budgets stay small and fixed; ``None`` reserves what :func:`atlasflow.model.sizing.model_artifacts`
    computes (``make demo``, with :data:`DEMO_BUDGET_MB`).
    """
    import openpyxl

    from atlasflow_testing.geo_server import geo_series_dir
    from atlasflow_testing.realdata import pbmc_counts, resample, write_format

    pbmc = pbmc_counts()
    www = root / "www"
    rows = []
    for i in range(n_datasets):
        resampled = (i + 1) * cells > pbmc.n_obs
        # past the 700 real cells, a dataset is Poisson-resampled from them (and says so in its notes)
        part = resample(pbmc, cells, seed=i) if resampled else pbmc[i * cells: (i + 1) * cells].copy()
        fmt = FORMATS[i % len(FORMATS)]
        ds = f"pbmc_{i + 1}"
        if i == 2:  # one dataset published as a GEO series
            accession = "GSE900001"
            folder = geo_series_dir(www / "geo", accession)
            path = write_format(part, fmt, folder, stem=accession)
            rows.append([accession, accession, "geo", "control", "blood", "human", "", path.stat().st_size, "", ""])
            continue
        path = write_format(part, fmt, www / "files", stem=ds)
        rows.append([ds, f"{url}/files/{path.name}", "direct", "control", "blood", "human", "",
                     path.stat().st_size, "bulk_labels" if fmt == "h5ad" else "",
                     "Poisson-resampled from pbmc68k_reduced" if resampled else ""])
    if missing_row:
        gone = ["pbmc_gone", f"{url}/files/pbmc_gone.h5ad", "direct", "control", "blood", "human", "", 200_000, "",
                "a dataset the server no longer has: quarantined, the batch goes on"]
        rows.insert(len(rows) if missing_at is None else missing_at, gone)
    book = openpyxl.Workbook()
    ws = book.active
    ws.title = "datasets"
    ws.append(["dataset_id", "download_url", "type", "disease_status", "tissue_type", "species", "format",
               "expected_bytes", "cell_type_key", "notes"])
    for r in rows:
        ws.append(r)
    root.mkdir(parents=True, exist_ok=True)
    book.save(root / "manifest.xlsx")
    artefacts = (f"checkpoint_gb: {checkpoint_gb}  # a fixed model-artefact reservation per batch"
                 if checkpoint_gb is not None else
                 "# checkpoint_gb unset: each batch reserves its model artefacts as computed from the model")
    (root / "atlasflow.yaml").write_text(f"""# demo configuration: a tiny budget so batches have to wait for each other
storage:
  base_dir: base
{budget_yaml(budget_mb)}
  min_free_gb: 1
  {artefacts}
  keep_checkpoints: {keep_checkpoints}
  admission_poke_s: 2
  admission_max_wait_s: 8
manifest:
  path: manifest.xlsx
plan:
  batch_size: {batch_size}
  schedule: null  # the demo triggers its run itself
download:
  geo_base_url: {url}/geo
  retries: 1
  backoff_s: 0.2
qc:
  min_genes: 50
genes:
  vocab_path: builtin:pbmc68k  # the demo's 765 genes; real atlases use the default human vocabulary
integration:
  max_epochs: {integration_epochs}
training:
  epochs: 2
  checkpoint_every_steps: 5
  val_fraction: 0.34
  replay_cells: 200  # the demo's batches hold a few hundred cells
retrain:
  schedule: null  # atlas_retrain runs on the model Asset the ingest run publishes, not weekly
""")
    return {"root": str(root), "datasets": len(rows), "www": str(www)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--url", required=True, help="base URL the demo server will answer on")
    args = parser.parse_args(argv)
    info = build_demo(args.root, args.url, budget_mb=DEMO_BUDGET_MB, checkpoint_gb=None)
    sys.stdout.write(f"demo data: {info['datasets']} manifest rows under {info['root']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
