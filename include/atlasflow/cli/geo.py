"""``atlasflow manifest from-geo``: manifest rows for a GEO series, one dataset or one per sample."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from atlasflow.acquire.fetch import geo_samples
from atlasflow.acquire.http import FetchError, TransientFetchError
from atlasflow.cli.manifest_out import manifest_table, write_manifest_file
from atlasflow.core.config import load_config
from atlasflow.prep.genes import normalize_species

__all__ = ["COLUMNS", "register", "series_rows"]

EXIT_INVALID = 2
COLUMNS = ("dataset_id", "download_url", "type", "species", "tissue_type", "disease_status", "notes")
_GSE = re.compile(r"^GSE\d+$")


def register(msub: Any) -> None:
    """Add ``from-geo`` to the ``manifest`` command's subcommands."""
    p = msub.add_parser("from-geo", help="write manifest rows (type geo) for a GEO series: the series as one dataset, "
                                         "or --per-sample one dataset per GSM sample")
    p.add_argument("accession", help="the series, GSE…")
    p.add_argument("--per-sample", action="store_true",
                   help="one row per GSM sample (each read from the sample's own folder) instead of one for the series "
                        "(whose cells then carry their GSM id in obs['sample'] and obs['batch'])")
    p.add_argument("--organism", action="append", default=[],
                   help="keep samples of this organism (human, mouse, 'Homo sapiens', 9606, …); repeatable")
    p.add_argument("--tissue", default="", help="tissue_type for every row")
    p.add_argument("--disease", default="", help="disease_status for every row")
    p.add_argument("--out", type=Path, help="write the manifest here (.csv or .tsv); default: print it")
    p.add_argument("--config", help="config file (download.geo_base_url, download.read_timeout_s)")
    p.add_argument("--json", action="store_true", help="print the rows and what was left out as JSON")
    p.set_defaults(func=_cmd)


def series_rows(accession: str, samples: dict[str, dict[str, Any]], *, per_sample: bool, organisms: list[str],
                tissue: str = "", disease: str = "") -> tuple[list[dict[str, str]], list[str]]:
    """Manifest rows for a series from GEO's sample records, and the samples left out (with why)."""
    wanted = {normalize_species(o) for o in organisms}
    kept: dict[str, dict[str, Any]] = {}
    left_out: list[str] = []
    for gsm, info in samples.items():
        species = normalize_species(info.get("organism"))
        if wanted and species not in wanted:
            left_out.append(f"{gsm}: organism {info.get('organism') or 'unknown'}")
        elif per_sample and not info.get("supplementary"):
            left_out.append(f"{gsm}: no supplementary files (reads only, or data in the series files)")
        else:
            kept[gsm] = info
    base = {"type": "geo", "tissue_type": tissue, "disease_status": disease}
    if per_sample:
        rows = [{**base, "dataset_id": gsm, "download_url": gsm, "species": info.get("organism") or "",
                 "notes": f"{accession}: {info.get('title', '')}".rstrip(": ")} for gsm, info in kept.items()]
        return rows, left_out
    if not kept:
        return [], left_out
    species = {str(i.get("organism")) for i in kept.values() if i.get("organism")}
    note = f"{len(kept)} samples" + (f"; samples left out: {', '.join(s.split(':')[0] for s in left_out)}"
                                     if left_out else "")
    return [{**base, "dataset_id": accession, "download_url": accession,
             "species": species.pop() if len(species) == 1 else "", "notes": note}], left_out


def _cmd(args: Any, out: TextIO) -> int:
    if not _GSE.match(args.accession):
        sys.stderr.write(f"error: {args.accession!r} is not a GEO series accession (GSE…)\n")
        return EXIT_INVALID
    config = load_config(args.config)
    try:
        samples = geo_samples(args.accession, config.download)
    except TransientFetchError as exc:
        sys.stderr.write(f"error: GEO is unreachable or failing, try again later: {exc}\n")
        return 1
    except FetchError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_INVALID
    rows, left_out = series_rows(args.accession, samples, per_sample=args.per_sample, organisms=args.organism,
                                 tissue=args.tissue, disease=args.disease)
    if args.out is not None and not write_manifest_file(rows, columns=COLUMNS, path=args.out):
        return EXIT_INVALID
    if args.json:
        json.dump({"accession": args.accession, "rows": rows, "left_out": left_out}, out, indent=1)
        out.write("\n")
    elif args.out is None:
        out.write(manifest_table(rows, columns=COLUMNS))
    sys.stderr.write(f"{args.accession}: {len(samples)} samples in GEO's records; {len(rows)} manifest row(s)"
                     f"{' (one per sample)' if args.per_sample else ''}; {len(left_out)} sample(s) left out"
                     f"{': ' + '; '.join(left_out) if left_out else ''}"
                     f"{'; written to ' + str(args.out) if args.out else ''}\n")
    return 0
