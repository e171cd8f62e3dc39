"""Fetch one manifest dataset into ``data/raw/<dataset_id>/``: direct URLs, GEO series, SRA runs."""

from __future__ import annotations

import html.parser
import logging
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlasflow.acquire.http import FetchedFile, FetchError, TransientFetchError, download, safe_name
from atlasflow.core.config import DownloadConfig
from atlasflow.core.fsutil import write_json_atomic
from atlasflow.intake.manifest import Dataset

__all__ = [
    "FetchError",
    "FetchResult",
    "FetchedFile",
    "TransientFetchError",
    "fetch_dataset",
    "geo_listing_url",
    "geo_suppl_path",
    "pick_geo_files",
]

log = logging.getLogger(__name__)

# Supplementary files that hold expression matrices, and names that never do (images, reads, archives
# of per-sample raw data whose contents we cannot know in advance).
GEO_MATRIX = re.compile(
    r"(\.h5ad|\.h5|\.loom|matrix\.mtx(\.gz)?|barcodes\.tsv(\.gz)?|(features|genes)\.tsv(\.gz)?|"
    r"\.(csv|tsv|txt)(\.gz)?|\.rds)$",
    re.IGNORECASE,
)
GEO_SKIP = re.compile(r"(_RAW\.tar$|\.(png|jpe?g|tiff?|pdf|bam|bai|bw|bigwig|bed(\.gz)?|fastq(\.gz)?)$|filelist\.txt$)",
                      re.IGNORECASE)


@dataclass(frozen=True)
class FetchResult:
    dataset_id: str
    dest_dir: str
    files: tuple[FetchedFile, ...]
    seconds: float
    source: str
    skipped: tuple[str, ...] = field(default_factory=tuple)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset_id": self.dataset_id, "dest_dir": self.dest_dir, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "source": self.source,
                "files": [f.to_dict() for f in self.files], "skipped": list(self.skipped)}


def geo_suppl_path(accession: str) -> str:
    """GEO's supplementary-files folder, relative to its root: ``series/GSE123nnn/GSE123456/suppl``."""
    m = re.fullmatch(r"(GSE|GSM)(\d+)", accession)
    if not m:
        raise FetchError(f"{accession!r} is not a GEO series or sample accession")
    prefix, digits = m.groups()
    stub = prefix + (digits[:-3] + "nnn" if len(digits) > 3 else "nnn")
    kind = "series" if prefix == "GSE" else "samples"
    return f"{kind}/{stub}/{accession}/suppl"


def geo_listing_url(accession: str, base_url: str) -> str:
    return f"{base_url.rstrip('/')}/{geo_suppl_path(accession)}/"


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def pick_geo_files(names: list[str]) -> tuple[list[str], list[str]]:
    """(matrix files to fetch, names skipped) from a supplementary folder's listing."""
    keep, skip = [], []
    for name in names:
        if name.endswith("/") or name.startswith(("?", "/", "..")) or "://" in name:
            continue  # sort links, parent folder, absolute links: not files of this folder
        (skip if GEO_SKIP.search(name) or not GEO_MATRIX.search(name) else keep).append(name)
    return keep, skip


def _list_geo(url: str, timeout_s: float) -> list[str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "atlasflow/0.1"}),
                                    timeout=timeout_s) as resp:
            text = resp.read(4 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FetchError(f"GEO has no supplementary folder at {url} (HTTP 404)") from exc
        if exc.code >= 500 or exc.code == 429:
            raise TransientFetchError(f"{url}: HTTP {exc.code}") from exc
        raise FetchError(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransientFetchError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    parser = _Links()
    parser.feed(text)
    return parser.hrefs


def fetch_dataset(dataset: Dataset, dest_dir: Path, *, config: DownloadConfig, max_bytes: int | None = None) -> FetchResult:
    """Fetch ``dataset`` into ``dest_dir`` (``data/raw/<dataset_id>``); idempotent.

    Raises
    ------
    FetchError
        Permanent failures (quarantine the dataset); :class:`TransientFetchError` for ones worth a
        later retry of the task.
    """
    t0 = time.monotonic()
    dest_dir.mkdir(parents=True, exist_ok=True)
    kw = {"attempts": config.attempts, "backoff_s": config.backoff_s, "timeout_s": config.read_timeout_s}
    skipped: list[str] = []
    source: str = dataset.type
    if dataset.is_reads:
        from atlasflow.acquire.reads import fetch_reads

        files, source = fetch_reads(dataset, dest_dir, config=config, max_bytes=max_bytes, **kw)
    elif dataset.type == "direct":
        files = [download(dataset.download_url, dest_dir, max_bytes=max_bytes, sha256=dataset.sha256,
                          md5=dataset.md5, **kw)]
    elif dataset.type == "geo":
        listing = geo_listing_url(dataset.download_url, config.geo_base_url)
        names, skipped = pick_geo_files(_list_geo(listing, config.read_timeout_s))
        if not names:
            raise FetchError(f"{dataset.dataset_id}: no count-matrix files in {listing} "
                             f"(skipped: {', '.join(skipped) or 'nothing listed'})")
        files = []
        for name in names:
            budget = None if max_bytes is None else max_bytes - sum(f.bytes for f in files)
            files.append(download(listing + name, dest_dir, name=safe_name(name), max_bytes=budget, **kw))
        if skipped:
            log.info("%s: skipped %s", dataset.dataset_id, ", ".join(skipped))
    else:  # every sra row is a reads row, handled above
        raise FetchError(f"{dataset.dataset_id}: unknown dataset type {dataset.type!r}")
    result = FetchResult(dataset.dataset_id, str(dest_dir), tuple(files), time.monotonic() - t0,
                         source, tuple(skipped))
    write_json_atomic(dest_dir / "fetch.json", result.to_dict())
    return result
