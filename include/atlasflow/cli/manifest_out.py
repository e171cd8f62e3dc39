"""Manifest rows out of the ``manifest from-…`` commands: as CSV/TSV text, or written to a file that must
pass ``atlasflow manifest check`` before it replaces anything."""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atlasflow.intake.manifest import ManifestError, read_manifest

__all__ = ["manifest_table", "write_manifest_file"]


def manifest_table(rows: Sequence[dict[str, Any]], *, columns: Sequence[str], delimiter: str = ",") -> str:
    """The rows as delimited text with a header of ``columns``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), delimiter=delimiter, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_manifest_file(rows: Sequence[dict[str, Any]], *, columns: Sequence[str], path: Path) -> bool:
    """Write the rows to ``path`` (``.csv`` or ``.tsv``, by its suffix) under a temporary name, check it
    reads as a manifest, then rename it into place.

    Returns
    -------
    bool
        False, after saying why on stderr, when the suffix is neither ``.csv`` nor ``.tsv``.

    Raises
    ------
    ManifestError
        When the rows do not make a valid manifest (the temporary file is removed, ``path`` untouched).
    """
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        sys.stderr.write(f"error: --out {path}: write a .csv or .tsv manifest\n")
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    tmp.write_text(manifest_table(rows, columns=columns, delimiter="\t" if suffix == ".tsv" else ","),
                   encoding="utf-8")
    try:
        if rows:
            read_manifest(tmp)  # what we write must pass `atlasflow manifest check`
    except ManifestError:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    return True
