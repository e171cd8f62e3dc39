"""Which downloaded files of a dataset are read, and as which sample.

A GEO download's ``fetch.json`` names its samples (GSM id → files and 10x folders, chosen by the
GEO rules of :mod:`atlasflow.acquire.geo`) and the organism GEO gives them; every other download
is read from its folder as :func:`atlasflow.readers.formats.primary_files` finds it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from atlasflow.readers.formats import FormatError, primary_files

__all__ = ["DatasetFiles", "SourceSpec", "dataset_files", "disk_bytes"]

_GSM = re.compile(r"^GSM\d+$")


@dataclass(frozen=True)
class SourceSpec:
    """One file (or 10x folder) to open, and the sample its cells belong to (None: the dataset's own)."""

    path: Path
    sample: str | None = None


@dataclass(frozen=True)
class DatasetFiles:
    """The sources of one download and, for GEO rows, the organism GEO gives its samples (None: unknown)."""

    sources: tuple[SourceSpec, ...]
    organism: str | None = None


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def dataset_files(raw_dir: Path) -> DatasetFiles:
    """The sources to read from ``raw_dir`` (``data/raw/<dataset_id>``).

    Raises
    ------
    FormatError
        Nothing readable was downloaded, or ``fetch.json`` names a file that is not there.
    """
    info_path = raw_dir / "fetch.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    samples = info.get("samples")
    if not samples:
        return DatasetFiles(tuple(SourceSpec(p) for p in primary_files(raw_dir)))
    root = raw_dir.resolve()
    several = len(samples) > 1
    sources: list[SourceSpec] = []
    for sample, items in samples.items():
        # a GSM id always names its cells; a series-level file's stem only when there are several
        label = sample if _GSM.match(sample) or several else None
        for item in items:
            path = (raw_dir / item).resolve()
            if not path.is_relative_to(root):  # fetch.json is ours, but never trusted to leave the folder
                raise FormatError(f"{info_path}: {item!r} is outside {raw_dir}")
            if not path.exists():
                raise FormatError(f"{raw_dir.name}: {item} (sample {sample}) was not downloaded")
            sources.append(SourceSpec(path, label))
    organisms = sorted(set((info.get("species") or {}).values()))
    return DatasetFiles(tuple(sources), organisms[0] if len(organisms) == 1 else None)
