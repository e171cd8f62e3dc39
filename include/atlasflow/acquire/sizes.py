"""How many bytes a dataset will download, learnt before its batch is admitted.

A manifest row's ``expected_bytes`` wins. Otherwise the size is asked of the source:

- ``direct`` rows: an HTTP ``HEAD`` (its ``Content-Length``); a server that refuses HEAD or sends
  no length gets a ranged ``GET bytes=0-0`` whose ``Content-Range: bytes 0-0/TOTAL`` names the
  size (the body is never read). ``file://`` URLs: the file's size. R1;R2 rows add their URLs up.
- ``geo`` rows: the GEO rules' selection (:func:`atlasflow.acquire.fetch.plan_geo`: the listing and
  ``filelist.txt``'s member sizes), a HEAD for each chosen file whose size the listing does not give;
  a ``_RAW.tar`` without ``filelist.txt`` counts the tar's size (its members are at most that).
- ``sra`` rows: ENA's filereport ``fastq_bytes``.
- ``cellxgene`` rows: the Curation API's ``filesize`` of the dataset's H5AD asset.

Rows are asked in parallel (:data:`PARALLEL` at a time), so a long manifest's plan is not the sum of
its slowest servers.

Servers are untrusted: every request has a timeout, a length must be a plain decimal number no
larger than :data:`MAX_BYTES`, at most :data:`MAX_REQUESTS` requests are made per dataset, and any
failure leaves the size unknown (``storage.unknown_size_gb`` is then assumed) instead of raising.
Results are cached in ``state/sizes.json`` by dataset id and row fingerprint, so admission retries and
``atlasflow plan`` do not ask again; an unknown size is asked again after :data:`RETRY_UNKNOWN_S`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from atlasflow.acquire.http import FetchError, HttpPolicy, open_url
from atlasflow.core.config import GB, AtlasConfig, DownloadConfig
from atlasflow.core.fsutil import write_json_atomic
from atlasflow.core.records import sizes_path
from atlasflow.core.redact import redact_url
from atlasflow.intake.manifest import Dataset

__all__ = ["MAX_BYTES", "SizeProbe", "dataset_size", "known_sizes", "probe_dataset", "probe_url", "record_arrival"]

log = logging.getLogger(__name__)
MAX_BYTES = 100 * 10**12  # 100 TB: a larger "length" is a broken or hostile server, not a dataset
MAX_REQUESTS = 200  # per dataset (a GEO folder of many files); beyond it the size stays unknown
RETRY_UNKNOWN_S = 3600.0
PARALLEL = 8  # rows asked at once
_DIGITS = re.compile(r"^[0-9]{1,20}$")
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:[0-9]+-[0-9]+|\*)/([0-9]{1,20})$", re.IGNORECASE)


@dataclass(frozen=True)
class SizeProbe:
    """One dataset's download size as learnt from its source (``bytes`` None: unknown, ``error`` says why)."""

    dataset_id: str
    fingerprint: str
    bytes: int | None
    source: str  # head, range, file, geo, ena, manifest, or "unknown"
    probed_at: float
    error: str | None = None
    arrived: int | None = None  # what the download really brought, once it ran

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Unknown(Exception):
    pass


def _length(value: str | None) -> int | None:
    """A validated byte count from a header value, or None."""
    if value is None or not _DIGITS.match(value.strip()):
        return None
    n = int(value.strip())
    return n if n <= MAX_BYTES else None


def probe_url(url: str, *, timeout_s: float, policy: HttpPolicy | None = None) -> tuple[int, str]:
    """``(bytes, how)`` for one URL: HEAD, else a ranged GET; raises ``_Unknown`` with the reason.

    Redirects follow the downloads' policy (:class:`~atlasflow.acquire.http.HttpPolicy`); URLs in
    reasons are redacted (no query string or user info), as they end up in ``state/sizes.json``.
    """
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        if not path.is_file():
            raise _Unknown(f"{path}: no such file")
        return path.stat().st_size, "file"
    if parts.scheme not in ("http", "https"):
        raise _Unknown(f"{parts.scheme}:// sizes are not asked")
    headers = {"User-Agent": "atlasflow/0.1"}
    why = "no Content-Length"
    try:
        with open_url(urllib.request.Request(url, method="HEAD", headers=headers), timeout=timeout_s,
                      policy=policy) as resp:
            encoded = (resp.headers.get("Content-Encoding") or "identity").lower() != "identity"
            if (n := _length(resp.headers.get("Content-Length"))) is not None and not encoded:
                return n, "head"
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise _Unknown(f"HTTP 404 for {shown}") from exc
        why = f"HEAD answered HTTP {exc.code}"  # 403/405/501: servers that refuse HEAD; try a ranged GET
    except FetchError as exc:  # a redirect the policy refuses
        raise _Unknown(str(exc)) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _Unknown(f"HEAD {shown}: {getattr(exc, 'reason', exc)}") from exc
    try:
        req = urllib.request.Request(url, headers={**headers, "Range": "bytes=0-0"})
        with open_url(req, timeout=timeout_s, policy=policy) as resp:  # the body is never read
            if resp.status == 206:
                m = _CONTENT_RANGE.match((resp.headers.get("Content-Range") or "").strip())
                if m and (n := _length(m.group(1))) is not None:
                    return n, "range"
            elif resp.status == 200 and (n := _length(resp.headers.get("Content-Length"))) is not None:
                return n, "range"  # the server ignored the range: its full length, unread
    except urllib.error.HTTPError as exc:
        raise _Unknown(f"{why}; ranged GET answered HTTP {exc.code}") from exc
    except FetchError as exc:
        raise _Unknown(str(exc)) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _Unknown(f"{why}; ranged GET {shown}: {getattr(exc, 'reason', exc)}") from exc
    raise _Unknown(f"{why}, and the ranged GET named no total size")


def _probe_geo(dataset: Dataset, config: DownloadConfig) -> int:
    from atlasflow.acquire.fetch import geo_listing_url, plan_geo

    try:
        selection = plan_geo(dataset.download_url, config)
    except FetchError as exc:
        raise _Unknown(str(exc)) from exc
    listing = geo_listing_url(dataset.download_url, config.geo_base_url)
    total = 0
    asked = 0
    for c in selection.files:
        if c.size is None:
            asked += 1
            if asked > MAX_REQUESTS:
                raise _Unknown(f"more than {MAX_REQUESTS} files without a listed size")
            total += probe_url(listing + c.name, timeout_s=config.size_probe_timeout_s,
                               policy=HttpPolicy.from_config(config))[0]
        else:
            total += c.size
    if selection.tar:
        if selection.members and not selection.tar_unlisted and all(m.size is not None for m in selection.members):
            total += sum(m.size or 0 for m in selection.members)  # extracted members only: the tar is streamed
        elif selection.tar_size is not None:
            total += selection.tar_size  # members are chosen while streaming: at most the tar
        else:
            total += probe_url(listing + selection.tar, timeout_s=config.size_probe_timeout_s,
                               policy=HttpPolicy.from_config(config))[0]
    if total > MAX_BYTES:
        raise _Unknown(f"sizes add up to {total} bytes, more than {MAX_BYTES}")
    return total


def _probe_ena(dataset: Dataset, config: DownloadConfig) -> int:
    from atlasflow.acquire.reads import ena_files

    try:
        files = ena_files(dataset.download_url, config)
    except FetchError as exc:
        raise _Unknown(str(exc)) from exc
    if any(f.bytes is None for f in files):
        raise _Unknown(f"ENA lists no fastq_bytes for {', '.join(redact_url(f.url) for f in files if f.bytes is None)}")
    total = sum(f.bytes or 0 for f in files)
    if total > MAX_BYTES:
        raise _Unknown(f"ENA's fastq_bytes add up to {total}, more than {MAX_BYTES}")
    return total


def _probe_cellxgene(dataset: Dataset, config: DownloadConfig) -> int:
    from atlasflow.acquire.cellxgene import resolve_dataset

    try:
        found = resolve_dataset(dataset.download_url, base_url=config.cellxgene_api_url,
                                timeout_s=config.size_probe_timeout_s)
    except FetchError as exc:
        raise _Unknown(str(exc)) from exc
    if found.filesize is None or not 0 <= found.filesize <= MAX_BYTES:
        raise _Unknown(f"CELLxGENE names no usable filesize for {dataset.download_url} ({found.filesize!r})")
    return found.filesize


def probe_dataset(dataset: Dataset, config: DownloadConfig) -> SizeProbe:
    """Ask the dataset's source for its size; never raises for a server's answer."""
    now = time.time()
    fp = dataset.fingerprint()
    try:
        if dataset.type == "geo":
            n, how = _probe_geo(dataset, config), "geo"
        elif dataset.type == "sra":
            n, how = _probe_ena(dataset, config), "ena"
        elif dataset.type == "cellxgene":
            n, how = _probe_cellxgene(dataset, config), "cellxgene"
        else:
            urls = dataset.urls()[:MAX_REQUESTS]
            policy = HttpPolicy.from_config(config)
            found = [probe_url(u, timeout_s=config.size_probe_timeout_s, policy=policy) for u in urls]
            n, how = sum(x[0] for x in found), found[0][1]
    except _Unknown as exc:
        log.info("%s: download size unknown: %s", dataset.dataset_id, exc)
        return SizeProbe(dataset.dataset_id, fp, None, "unknown", now, error=str(exc))
    except Exception as exc:  # a broken server must never stop admission: the size stays unknown
        log.warning("%s: asking the download size failed: %s: %s", dataset.dataset_id, type(exc).__name__, exc)
        return SizeProbe(dataset.dataset_id, fp, None, "unknown", now, error=f"{type(exc).__name__}: {exc}")
    return SizeProbe(dataset.dataset_id, fp, n, how, now)


def _load(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached(entry: Mapping[str, Any] | None, dataset: Dataset, now: float) -> SizeProbe | None:
    if not entry or entry.get("fingerprint") != dataset.fingerprint():
        return None  # a row whose URL (or type, format…) changed is asked again
    try:
        probe = SizeProbe(**{k: entry.get(k) for k in SizeProbe.__dataclass_fields__})
    except TypeError:
        return None
    if probe.bytes is None and now - float(probe.probed_at or 0) > RETRY_UNKNOWN_S:
        return None
    return probe


def known_sizes(config: AtlasConfig, datasets: Iterable[Dataset], *, probe: bool,
                cache_file: bool = True) -> dict[str, SizeProbe]:
    """Sizes of the rows without ``expected_bytes``: from ``state/sizes.json``, asked (and cached) with ``probe``.

    With ``probe`` False (or ``download.size_probe`` off) only the cache is read: no network. With
    ``cache_file`` False the state folder is neither read nor written (a plan without a config).
    """
    path = sizes_path(config.state_dir)
    cache = _load(path) if cache_file else {}
    now = time.time()
    out: dict[str, SizeProbe] = {}
    rows = [d for d in datasets if d.expected_bytes is None]
    hits = {d.dataset_id: _cached(cache.get(d.dataset_id), d, now) for d in rows}
    ask = [d for d in rows if hits[d.dataset_id] is None] if probe and config.download.size_probe else []
    if ask:
        with ThreadPoolExecutor(max_workers=min(PARALLEL, len(ask)), thread_name_prefix="size-probe") as pool:
            for d, found in zip(ask, pool.map(lambda d: probe_dataset(d, config.download), ask), strict=True):
                hits[d.dataset_id] = found
                cache[d.dataset_id] = found.to_dict()
    changed = bool(ask)
    for d in rows:
        found = hits[d.dataset_id]
        if found is not None and found.bytes is None and found.arrived:
            found = replace(found, bytes=found.arrived, source="arrived")  # an earlier download's own size
        if found is not None:
            out[d.dataset_id] = found
    if changed and cache_file:
        write_json_atomic(path, cache)
    return out


def dataset_size(config: AtlasConfig, dataset: Dataset) -> tuple[int, str]:
    """``(bytes, source)`` a dataset is reserved with: the manifest's, the cached probe's, else the default.

    The same rule admission (:func:`atlasflow.storage.batch_footprint` with :func:`known_sizes`) and the
    download's cap use, so a download may bring what its batch reserved for it. Never asks the network.
    """
    if dataset.expected_bytes is not None:
        return dataset.expected_bytes, "manifest"
    probe = known_sizes(config, [dataset], probe=False).get(dataset.dataset_id)
    if probe is not None and probe.bytes:
        return probe.bytes, probe.source
    return int(config.storage.unknown_size_gb * GB), "default"


def record_arrival(config: AtlasConfig, dataset: Dataset, arrived: int) -> dict[str, Any]:
    """Compare what arrived with the size the dataset was reserved with; remember it for the next plan.

    Returns ``{"expected", "source", "arrived", "ratio"}`` (the download result's ``size_check``).
    """
    expected, source = dataset_size(config, dataset)
    ratio = round(arrived / expected, 4) if expected else None
    if source != "default" and ratio is not None and not 0.8 <= ratio <= 1.05:
        log.warning("%s: %d bytes arrived, %s said %d (%.0f%%)", dataset.dataset_id, arrived, source, expected,
                    100 * ratio)
    if dataset.expected_bytes is None:
        path = sizes_path(config.state_dir)
        cache = _load(path)
        entry = cache.get(dataset.dataset_id)
        if entry and entry.get("fingerprint") == dataset.fingerprint():
            cache[dataset.dataset_id] = {**entry, "arrived": int(arrived)}
            write_json_atomic(path, cache)
    return {"expected": expected, "source": source, "arrived": int(arrived), "ratio": ratio}
