"""``atlasflow manifest from-cellxgene``: manifest rows for a CELLxGENE Discover collection."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from atlasflow.acquire.cellxgene import BATCH_KEY, LABEL_KEY, CellxgeneDataset, list_collection
from atlasflow.acquire.http import FetchError, TransientFetchError
from atlasflow.cli.manifest_out import manifest_table, write_manifest_file
from atlasflow.core.config import load_config
from atlasflow.prep.genes import normalize_species

__all__ = ["COLUMNS", "manifest_rows", "matches", "register"]

EXIT_INVALID = 2
COLUMNS = ("dataset_id", "download_url", "type", "format", "expected_bytes", "species", "tissue_type",
           "disease_status", "batch_key", "cell_type_key", "notes")


def register(msub: Any) -> None:
    """Add ``from-cellxgene`` to the ``manifest`` command's subcommands."""
    p = msub.add_parser("from-cellxgene", help="write manifest rows (type cellxgene) for a CELLxGENE Discover collection")
    p.add_argument("--collection", required=True, help="collection id (the UUID in the collection's Discover URL)")
    p.add_argument("--organism", action="append", default=[],
                   help="keep datasets of this organism (label such as 'Homo sapiens', human/mouse, or NCBITaxon id); "
                        "repeatable")
    p.add_argument("--assay", action="append", default=[],
                   help="keep datasets with this assay (label such as \"10x 3' v3\" or EFO id); repeatable")
    p.add_argument("--out", type=Path, help="write the manifest here (.csv or .tsv); default: print it")
    p.add_argument("--config", help="config file (download.cellxgene_api_url, download.read_timeout_s)")
    p.add_argument("--json", action="store_true", help="print the rows and what was left out as JSON")
    p.set_defaults(func=_cmd)


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().split())


def matches(found: CellxgeneDataset, *, organisms: Sequence[str] = (), assays: Sequence[str] = ()) -> bool:
    """Whether a dataset passes the filters: one of its organisms and one of its assays asked for (by
    label or ontology id, any case; organisms also by the manifest's aliases: human, 9606, …)."""
    def species(value: str) -> str:
        value = value.split(":", 1)[1] if value.upper().startswith("NCBITAXON:") else value
        return normalize_species(value) or ""

    if organisms:
        have = {species(v) for v in (*found.organism, *found.organism_ontology_term_id)} - {""}
        if not have & {species(o) for o in organisms}:
            return False
    if assays:
        have = {_norm(v) for v in (*found.assay, *found.assay_ontology_term_id)}
        if not have & {_norm(a) for a in assays}:
            return False
    return True


def manifest_rows(datasets: Sequence[CellxgeneDataset]) -> list[dict[str, Any]]:
    """One manifest row per dataset: its id as ``dataset_id`` and ``download_url``, its H5AD size as
    ``expected_bytes`` (the reservation), the schema's batch and label columns, and the organism,
    tissue and disease when the dataset has exactly one of each."""
    def one(values: Sequence[str]) -> str:
        return values[0] if len(values) == 1 else ""

    rows = []
    for d in datasets:
        notes = "; ".join(x for x in (d.title or "", ", ".join(d.assay), f"{d.cell_count} cells" if d.cell_count else "",
                                      f"version {d.dataset_version_id}" if d.dataset_version_id else "") if x)
        rows.append({"dataset_id": d.dataset_id, "download_url": d.dataset_id, "type": "cellxgene", "format": "h5ad",
                     "expected_bytes": "" if d.filesize is None else d.filesize, "species": one(d.organism),
                     "tissue_type": one(d.tissue), "disease_status": one(d.disease), "batch_key": BATCH_KEY,
                     "cell_type_key": LABEL_KEY, "notes": notes})
    return rows


def _cmd(args: Any, out: TextIO) -> int:
    config = load_config(args.config)
    try:
        name, found, left_out = list_collection(args.collection, base_url=config.download.cellxgene_api_url,
                                                timeout_s=config.download.read_timeout_s)
    except TransientFetchError as exc:
        sys.stderr.write(f"error: CELLxGENE is unreachable or failing, try again later: {exc}\n")
        return 1
    except FetchError as exc:  # the collection id, or the API's answer, is unusable
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_INVALID
    kept = [d for d in found if matches(d, organisms=args.organism, assays=args.assay)]
    filtered = len(found) - len(kept)
    rows = manifest_rows(kept)
    if args.out is not None and not write_manifest_file(rows, columns=COLUMNS, path=args.out):
        return EXIT_INVALID
    if args.json:
        json.dump({"collection_id": args.collection, "name": name, "rows": rows, "filtered_out": filtered,
                   "left_out": left_out}, out, indent=1)
        out.write("\n")
    elif args.out is None:
        out.write(manifest_table(rows, columns=COLUMNS))
    size = sum(int(r["expected_bytes"]) for r in rows if r["expected_bytes"] != "")
    sys.stderr.write(f"collection {args.collection} ({name or 'unnamed'}): {len(rows)} of {len(found) + len(left_out)} "
                     f"datasets as manifest rows ({size / 1e9:.2f} GB of H5AD); {filtered} left out by the filters, "
                     f"{len(left_out)} unusable{': ' if left_out else ''}{'; '.join(left_out)}"
                     f"{'; written to ' + str(args.out) if args.out else ''}\n")
    return 0
