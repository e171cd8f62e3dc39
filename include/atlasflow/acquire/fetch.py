"""Fetch one manifest dataset into ``data/raw/<dataset_id>/``: direct URLs, GEO series, SRA runs."""

from __future__ import annotations

import html.parser
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from atlasflow.acquire.cellxgene import fetch_cellxgene
from atlasflow.acquire.geo import (
    GeoCandidate,
    GeoSelection,
    GeoSkip,
    classify,
    select_candidates,
    select_geo,
    sniff_table,
    text_prefix,
)
from atlasflow.acquire.http import (
    FetchedFile,
    FetchError,
    HttpPolicy,
    TransientFetchError,
    download,
    open_url,
    safe_name,
)
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
    "geo_expected_bytes",
    "geo_metadata_url",
    "geo_samples",
    "parse_soft_organisms",
    "parse_soft_samples",
    "pick_geo_files",
    "plan_geo",
]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class FetchResult:
    dataset_id: str
    dest_dir: str
    files: tuple[FetchedFile, ...]
    seconds: float
    source: str
    skipped: tuple[str, ...] = field(default_factory=tuple)
    # GEO: why each skipped file was skipped, the samples (sample -> its files, relative to dest_dir),
    # and the organism GEO gives each sample (when the manifest has no species)
    skip_reasons: tuple[GeoSkip, ...] = field(default_factory=tuple)
    samples: dict[str, list[str]] | None = None
    species: dict[str, str] | None = None
    cellxgene: Mapping[str, Any] | None = None  # what the Curation API said (type cellxgene only)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset_id": self.dataset_id, "dest_dir": self.dest_dir, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "source": self.source,
                "files": [f.to_dict() for f in self.files], "skipped": list(self.skipped),
                "skip_reasons": [s.to_dict() for s in self.skip_reasons],
                **({"samples": self.samples} if self.samples is not None else {}),
                **({"species": self.species} if self.species is not None else {}),
                **({"cellxgene": dict(self.cellxgene)} if self.cellxgene is not None else {})}


def geo_suppl_path(accession: str) -> str:
    """GEO's supplementary-files folder, relative to its root: ``series/GSE123nnn/GSE123456/suppl``."""
    m = re.fullmatch(r"(GSE|GSM)([0-9]+)", accession)
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


def _get_text(url: str, timeout_s: float, *, limit: int = 4 << 20, missing: str | None = None) -> str | None:
    """A small text resource (listing, filelist.txt, SOFT); None on a 404 when ``missing`` is None.

    gzip bodies are decompressed; at most ``limit`` bytes of text are read (bounded).
    """
    try:
        with open_url(urllib.request.Request(url, headers={"User-Agent": "atlasflow/0.1"}),
                                    timeout=timeout_s) as resp:
            raw = resp.read(limit)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            if missing is None:
                return None
            raise FetchError(missing) from exc
        if exc.code >= 500 or exc.code == 429:
            raise TransientFetchError(f"{url}: HTTP {exc.code}") from exc
        raise FetchError(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransientFetchError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    return text_prefix(raw, url, limit=limit * 8)


def _list_geo(url: str, timeout_s: float) -> list[str]:
    text = _get_text(url, timeout_s, missing=f"GEO has no supplementary folder at {url} (HTTP 404)")
    parser = _Links()
    parser.feed(text or "")
    return parser.hrefs


def pick_geo_files(names: list[str]) -> tuple[list[str], list[str]]:
    """(files to fetch, names skipped) from a supplementary folder's listing, by the GEO rules alone
    (no ``filelist.txt``; see :func:`atlasflow.acquire.geo.select_geo`)."""
    sel = select_geo("", names)
    return [c.name for c in sel.files] + ([sel.tar] if sel.tar else []), [s.name for s in sel.skipped]


def geo_expected_bytes(accession: str, hrefs: list[str], *, filelist: str | None = None,
                       sizes: dict[str, int] | None = None) -> int | None:
    """Bytes the GEO rules will put on disk for an accession; None when a chosen file's size is unknown.

    Pure: ``hrefs`` is the supplementary folder's listing, ``filelist`` the text of its
    ``filelist.txt`` (sizes of the ``_RAW.tar`` members), ``sizes`` what the caller knows of the
    other files (a HEAD's Content-Length). The members of a ``_RAW.tar`` count, never the tar itself:
    it is streamed, not stored.
    """
    try:
        return select_geo(accession, hrefs, filelist=filelist, sizes=sizes).expected_bytes
    except ValueError:
        return None


def plan_geo(accession: str, config: DownloadConfig) -> GeoSelection:
    """List an accession's supplementary folder (and read its ``filelist.txt``) and apply the GEO rules.

    Raises
    ------
    FetchError
        No such folder, or two names that clean to one file name; :class:`TransientFetchError` for
        network trouble worth a retry.
    """
    listing = geo_listing_url(accession, config.geo_base_url)
    hrefs = _list_geo(listing, config.read_timeout_s)
    filelist = None
    if any(h.endswith("_RAW.tar") for h in hrefs) and "filelist.txt" in hrefs:
        filelist = _get_text(listing + "filelist.txt", config.read_timeout_s)
    try:
        return select_geo(accession, hrefs, filelist=filelist)
    except ValueError as exc:
        raise FetchError(f"{accession}: {exc}") from exc


def geo_metadata_url(accession: str, config: DownloadConfig) -> str:
    """Where GEO's sample records for an accession are: the series' family SOFT, or the sample's own."""
    if accession.startswith("GSE"):
        folder = geo_suppl_path(accession).rsplit("/", 1)[0]
        return f"{config.geo_base_url.rstrip('/')}/{folder}/soft/{accession}_family.soft.gz"
    return f"{config.geo_query_url}?acc={accession}&targ=self&form=text&view=brief"


def parse_soft_samples(text: str) -> dict[str, dict[str, Any]]:
    """GSM id → ``{"organism", "title", "supplementary"}`` from SOFT text (``^SAMPLE = GSM…`` blocks).

    ``organism``: the first channel's ``!Sample_organism_ch1``, else its ``!Sample_taxid_ch1``;
    ``supplementary``: the sample's ``!Sample_supplementary_file_N`` values other than ``NONE``.
    """
    out: dict[str, dict[str, Any]] = {}
    sample: dict[str, Any] | None = None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key == "^SAMPLE":
            sample = out.setdefault(value, {"organism": None, "taxid": None, "title": "", "supplementary": []})
        elif key.startswith("^"):
            sample = None
        elif sample is None or not value:
            continue
        elif key == "!Sample_organism_ch1":
            sample["organism"] = sample["organism"] or value
        elif key == "!Sample_taxid_ch1" and value.isdigit():
            sample["taxid"] = sample["taxid"] or value
        elif key == "!Sample_title":
            sample["title"] = value
        elif key.startswith("!Sample_supplementary_file") and value.upper() != "NONE":
            sample["supplementary"].append(value)
    for info in out.values():
        # the name reads better in a reason than the taxid; both normalise to the same species
        info["organism"] = info["organism"] or info.pop("taxid")
        info.pop("taxid", None)
    return out


def parse_soft_organisms(text: str) -> dict[str, str]:
    """GSM id → organism (name, else taxid) from SOFT text; samples that name neither are left out."""
    return {gsm: info["organism"] for gsm, info in parse_soft_samples(text).items() if info["organism"]}


def geo_samples(accession: str, config: DownloadConfig) -> dict[str, dict[str, Any]]:
    """GEO's records of an accession's samples (:func:`parse_soft_samples`).

    Raises
    ------
    FetchError
        GEO has no record of it; :class:`TransientFetchError` for network trouble.
    """
    url = geo_metadata_url(accession, config)
    text = _get_text(url, config.read_timeout_s, limit=8 << 20, missing=f"GEO has no record of {accession} at {url}")
    return parse_soft_samples(text or "")


def _geo_organisms(accession: str, config: DownloadConfig) -> dict[str, str] | None:
    url = geo_metadata_url(accession, config)
    try:
        text = _get_text(url, config.read_timeout_s, limit=8 << 20)
    except FetchError as exc:  # metadata is a help, not a need: the genes still decide
        log.warning("%s: GEO's sample records are unreachable (%s); species from the genes alone", accession, exc)
        return None
    return parse_soft_organisms(text) if text else None


def fetch_dataset(dataset: Dataset, dest_dir: Path, *, config: DownloadConfig, max_bytes: int | None = None,
                  accept_species: Callable[[str], str | None] | None = None) -> FetchResult:
    """Fetch ``dataset`` into ``dest_dir`` (``data/raw/<dataset_id>``); idempotent.

    ``accept_species``: for GEO rows without a manifest ``species``, GEO's organism of each sample
    is passed to it; it returns None to accept, else why not (the sample is skipped, and a series
    with no sample left is refused). For a CELLxGENE row without one, the organism the Curation API
    lists is passed to it before the download (a refused one is not fetched).

    Raises
    ------
    FetchError
        Permanent failures (quarantine the dataset); :class:`TransientFetchError` for ones worth a
        later retry of the task.
    """
    t0 = time.monotonic()
    dest_dir.mkdir(parents=True, exist_ok=True)
    kw = {"attempts": config.attempts, "backoff_s": config.backoff_s, "timeout_s": config.read_timeout_s}
    source: str = dataset.type
    cellxgene: dict[str, Any] | None = None
    if dataset.type == "geo" and not dataset.is_reads:
        result = _fetch_geo(dataset, dest_dir, config=config, max_bytes=max_bytes, accept_species=accept_species,
                            t0=t0, **kw)
    else:
        if dataset.is_reads:
            from atlasflow.acquire.reads import fetch_reads

            files, source = fetch_reads(dataset, dest_dir, config=config, max_bytes=max_bytes, **kw)
        elif dataset.type == "direct":
            files = [download(dataset.download_url, dest_dir, max_bytes=max_bytes, sha256=dataset.sha256,
                              md5=dataset.md5, policy=HttpPolicy.from_config(config), **kw)]
        elif dataset.type == "cellxgene":
            files, cellxgene = fetch_cellxgene(dataset, dest_dir, config=config, max_bytes=max_bytes,
                                               accept_species=accept_species, **kw)
        else:  # every sra row is a reads row, handled above
            raise FetchError(f"{dataset.dataset_id}: unknown dataset type {dataset.type!r}")
        result = FetchResult(dataset.dataset_id, str(dest_dir), tuple(files), time.monotonic() - t0, source,
                             cellxgene=cellxgene)
    write_json_atomic(dest_dir / "fetch.json", result.to_dict())
    return result


def _fetch_geo(dataset: Dataset, dest_dir: Path, *, config: DownloadConfig, max_bytes: int | None,
               accept_species: Callable[[str], str | None] | None, t0: float, attempts: int, backoff_s: float,
               timeout_s: float) -> FetchResult:
    """GEO rules 1-5 (:mod:`atlasflow.acquire.geo`): choose, sniff, download, stream the ``_RAW.tar``."""
    accession = dataset.download_url
    sel = plan_geo(accession, config)
    listing = geo_listing_url(accession, config.geo_base_url)
    skipped: list[GeoSkip] = list(sel.skipped)
    organisms: dict[str, str] | None = None
    refused: set[str] = set()
    if not (dataset.species or "").strip():
        organisms = _geo_organisms(accession, config)
        if organisms and accept_species is not None:
            for gsm, organism in organisms.items():
                if (why := accept_species(organism)) is not None:
                    refused.add(gsm)
                    log.info("%s: sample %s is %s: %s", dataset.dataset_id, gsm, organism, why)
        if organisms and refused and refused >= set(organisms):
            # no sample of the accession is of an accepted species: refuse before a byte is fetched
            first = sorted(refused)[0]
            raise FetchError(f"{dataset.dataset_id}: not human: GEO's records give {first} the organism "
                             f"{organisms[first]!r} ({len(refused)} of {len(organisms)} samples refused; "
                             f"{geo_metadata_url(accession, config)}); {accept_species(organisms[first])}")  # type: ignore[misc]

    def species_skip(c: GeoCandidate) -> GeoSkip | None:
        sample = accession if accession.startswith("GSM") else c.sample
        if sample in refused and organisms is not None:
            return GeoSkip(c.name, f"sample {sample} is {organisms[sample]} per GEO's records; "
                                   f"{accept_species(organisms[sample]) if accept_species else ''}".rstrip("; "))
        return None

    files: list[FetchedFile] = []
    samples: dict[str, list[str]] = {}

    def budget() -> int | None:
        return None if max_bytes is None else max_bytes - sum(f.bytes for f in files)

    for cand in sel.files:
        if (why := species_skip(cand)) is not None:
            skipped.append(why)
            continue
        url = listing + quote(cand.name)
        if cand.kind == "table" and (reason := _sniff_remote(url, cand.name, timeout_s)) is not None:
            skipped.append(GeoSkip(cand.name, reason))
            continue
        # a trio goes into its own folder (one sample, one 10x source); other files stay flat
        sub = safe_name(cand.sample) if cand.kind == "10x_mtx" else ""
        got = download(url, dest_dir / sub if sub else dest_dir, name=safe_name(cand.name), max_bytes=budget(),
                       attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s,
                       policy=HttpPolicy.from_config(config))
        rel = f"{sub}/{got.name}" if sub else got.name
        files.append(FetchedFile(rel, got.path, got.bytes, got.sha256, got.url, got.resumed_from, got.redirected_to))
        entry = samples.setdefault(_sample_key(accession, cand.sample), [])
        if not (sub and sub in entry):
            entry.append(sub or got.name)
    if sel.tar is not None:
        from atlasflow.acquire.geo_tar import stream_raw_tar

        wanted = None
        if not sel.tar_unlisted:
            wanted = {}
            for c in sel.members:
                if (why := species_skip(c)) is not None:
                    skipped.append(GeoSkip(f"{sel.tar}/{c.name}", why.reason))
                else:
                    wanted[c.name] = c
        tar_dir = dest_dir / safe_name(sel.tar.rsplit(".", 1)[0])
        if wanted != {}:
            got_tar = stream_raw_tar(listing + quote(sel.tar), tar_dir, wanted=wanted, max_bytes=budget(),
                                     tar_bytes=sel.tar_size, attempts=attempts, backoff_s=backoff_s,
                                     timeout_s=timeout_s)
            skipped.extend(got_tar.skipped)
            members = list(got_tar.files)
            if wanted is None:  # no filelist.txt: rule 3 and the species now, over what streamed
                members = _prune_unlisted(members, skipped, species_skip)
            for f in members:
                files.append(f)
                sample_dir = f.name.split("/")[1]
                entry = samples.setdefault(_sample_key(accession, sample_dir), [])
                folder = f"{tar_dir.name}/{sample_dir}"
                kind = classify(f.url.split("/", 1)[1])
                item = folder if isinstance(kind, GeoCandidate) and kind.kind == "10x_mtx" else f.name
                if item not in entry:
                    entry.append(item)
    if not files:
        why = "; ".join(f"{s.name}: {s.reason}" for s in skipped) or "nothing listed"
        raise FetchError(f"{dataset.dataset_id}: no count-matrix files in {listing} (skipped: {why})")
    for s in skipped:
        log.info("%s: skipped %s: %s", dataset.dataset_id, s.name, s.reason)
    kept_species = None
    if organisms:
        kept = {s: organisms[s] for s in samples if s in organisms}
        if not kept and len(set(organisms.values())) == 1:
            # series-level files (no GSM prefix): every sample of the series is of one organism
            kept = {accession: next(iter(organisms.values()))}
        kept_species = kept or None
    return FetchResult(dataset.dataset_id, str(dest_dir), tuple(files), time.monotonic() - t0, "geo",
                       tuple(s.name for s in skipped), tuple(skipped), samples, kept_species)


def _sample_key(accession: str, sample: str) -> str:
    """A GSM row is one sample (its own id), whatever its files are called."""
    return accession if accession.startswith("GSM") else sample


def _prune_unlisted(members: list[FetchedFile], skipped: list[GeoSkip],
                    species_skip: Callable[[GeoCandidate], GeoSkip | None]) -> list[FetchedFile]:
    """Members streamed without a filelist.txt: apply GEO rule 3 and the species, delete the losers."""
    by_name: dict[str, FetchedFile] = {}
    cands: list[GeoCandidate] = []
    for f in members:
        name = f.url.split("/", 1)[1]
        got = classify(name)
        assert isinstance(got, GeoCandidate)
        cands.append(got)
        by_name[name] = f
    keep, lost = select_candidates(cands)
    out = []
    for c in keep:
        if (why := species_skip(c)) is not None:
            lost.append(why)
        else:
            out.append(by_name[c.name])
    for s in lost:
        Path(by_name[s.name].path).unlink(missing_ok=True)
        skipped.append(GeoSkip(by_name[s.name].url, s.reason))
    return out


def _sniff_remote(url: str, name: str, timeout_s: float, *, head_bytes: int = 1 << 20) -> str | None:
    """GEO rule 5 on a listed table, from its first ``head_bytes`` (a ranged GET) before it is fetched whole."""
    req = urllib.request.Request(url, headers={"User-Agent": "atlasflow/0.1", "Range": f"bytes=0-{head_bytes - 1}"})
    try:
        with open_url(req, timeout=timeout_s) as resp:
            head = resp.read(head_bytes)  # a server that ignores Range: read the start, hang up
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise TransientFetchError(f"{url}: HTTP {exc.code}") from exc
        raise FetchError(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransientFetchError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    return sniff_table(text_prefix(head, name))
