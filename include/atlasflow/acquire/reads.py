"""Raw reads for a dataset: an SRA/ENA accession resolved to FASTQ files, or FASTQ URLs.

Two resolvers (``download.sra_resolver``):

- ``sra-tools``: ``prefetch`` (when installed and configured) then ``fasterq-dump``, each run
  from an argument list (the accession never meets a shell); the FASTQ files are gzipped.
- ``ena``: ENA's Portal API ``filereport`` lists the run's FASTQ files with sizes and MD5s; each
  is streamed with :func:`atlasflow.acquire.http.download` (resumable, MD5-verified, size-capped).
  The API's base URL and the FASTQ host are configurable, so tests serve both from 127.0.0.1.

``auto`` takes sra-tools when ``fasterq-dump`` (``download.sra_command``) is installed, else ENA.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import shlex
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from atlasflow.acquire.http import (
    FetchedFile,
    FetchError,
    HttpPolicy,
    TransientFetchError,
    _hash,
    download,
    open_url,
    safe_name,
)
from atlasflow.core.config import DownloadConfig
from atlasflow.intake.manifest import SRA_RE, Dataset

__all__ = ["EnaFile", "ena_filereport_url", "ena_files", "fetch_reads", "resolver_for"]

log = logging.getLogger(__name__)
ENA_FIELDS = "run_accession,fastq_ftp,fastq_bytes,fastq_md5"


@dataclass(frozen=True)
class EnaFile:
    run: str
    url: str
    bytes: int | None
    md5: str | None


def resolver_for(config: DownloadConfig) -> str:
    """``sra-tools`` or ``ena``: what ``download.sra_resolver`` means on this machine."""
    if config.sra_resolver != "auto":
        return config.sra_resolver
    program = (shlex.split(config.sra_command) or [""])[0]
    return "sra-tools" if program and shutil.which(program) else "ena"


def ena_filereport_url(accession: str, base_url: str) -> str:
    query = urllib.parse.urlencode({"accession": accession, "result": "read_run", "fields": ENA_FIELDS,
                                    "format": "tsv"})
    return f"{base_url.rstrip('/')}/filereport?{query}"


def _fastq_url(entry: str, mirror: str | None) -> str:
    """ENA lists ``ftp.sra.ebi.ac.uk/vol1/fastq/…`` without a scheme; fetch it over https, or from a mirror."""
    parts = urllib.parse.urlsplit(entry if "://" in entry else f"https://{entry}")
    if mirror:
        return f"{mirror.rstrip('/')}{parts.path}"
    return urllib.parse.urlunsplit(parts)


def ena_files(accession: str, config: DownloadConfig) -> list[EnaFile]:
    """The FASTQ files ENA lists for a run, experiment, study or project accession.

    Raises
    ------
    FetchError
        Unknown accession, or runs without FASTQ files; :class:`TransientFetchError` for 5xx/429
        and network errors.
    """
    if not SRA_RE.match(accession):  # the manifest checked it; a library caller may not have
        raise FetchError(f"{accession!r} is not an SRA/ENA accession")
    url = ena_filereport_url(accession, config.ena_base_url)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "atlasflow/0.1"})
        with open_url(req, timeout=config.read_timeout_s) as resp:
            text = resp.read(16 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        if exc.code in (429,) or exc.code >= 500:
            raise TransientFetchError(f"ENA filereport for {accession}: HTTP {exc.code}") from exc
        raise FetchError(f"ENA has no runs for {accession} (HTTP {exc.code} from {url})") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransientFetchError(f"ENA filereport for {accession}: {getattr(exc, 'reason', exc)}") from exc
    if not text.startswith("run_accession"):  # ENA answers an unknown accession with an empty body
        raise FetchError(f"ENA has no runs for {accession} (no filereport table from {url})")
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    if not rows:
        raise FetchError(f"ENA lists no runs for {accession} ({url})")
    files: list[EnaFile] = []
    for row in rows:
        links = [x for x in (row.get("fastq_ftp") or "").split(";") if x]
        sizes = (row.get("fastq_bytes") or "").split(";")
        md5s = (row.get("fastq_md5") or "").split(";")
        for i, link in enumerate(links):
            size = sizes[i] if i < len(sizes) else ""
            md5 = md5s[i] if i < len(md5s) else ""
            files.append(EnaFile(row.get("run_accession") or accession, _fastq_url(link, config.ena_fastq_base_url),
                                 int(size) if size.isdigit() else None, md5.lower() or None))
    if not files:
        raise FetchError(f"ENA lists no FASTQ files for {accession} (runs: "
                         f"{', '.join(r.get('run_accession') or '?' for r in rows)}); submitted BAM only?")
    return files


def _run(argv: list[str], what: str, timeout_s: float) -> None:
    log.info("running %s", argv)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise TransientFetchError(f"{what} timed out after {timeout_s:g} s") from exc
    if done.returncode != 0:
        raise FetchError(f"{what} exited {done.returncode}: {done.stderr.strip()[-500:]}")


def _gzip_in_place(path: Path) -> Path:
    """fasterq-dump writes plain FASTQ; keep it gzipped (a third of the disk) as ENA serves it."""
    target = path.with_name(path.name + ".gz")
    with path.open("rb") as src, gzip.open(target, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    path.unlink()
    return target


def _sra_tools(dataset: Dataset, dest: Path, config: DownloadConfig) -> list[FetchedFile]:
    template = shlex.split(config.sra_command)
    if not template:
        raise FetchError("download.sra_command is empty")
    exe = shutil.which(template[0])
    if exe is None:
        raise FetchError(f"{dataset.dataset_id}: SRA download needs {template[0]!r}, which is not installed "
                         "(install sra-tools, set download.sra_command, or download.sra_resolver: ena)")
    accession = dataset.download_url
    prefetch = shlex.split(config.sra_prefetch_command)
    if prefetch and (pexe := shutil.which(prefetch[0])) is not None:
        store = dest / "sra"
        store.mkdir(parents=True, exist_ok=True)
        # placeholders are filled per argument after splitting: the accession never meets a shell
        _run([pexe] + [a.format(accession=accession, outdir=str(store)) for a in prefetch[1:]], prefetch[0],
             config.timeout_s)
        local = store / accession
        accession = str(local) if local.exists() else accession
    elif prefetch:
        log.info("%s is not installed; %s fetches %s itself", prefetch[0], template[0], accession)
    _run([exe] + [a.format(accession=accession, outdir=str(dest)) for a in template[1:]], template[0],
         config.timeout_s)
    shutil.rmtree(dest / "sra", ignore_errors=True)  # the .sra copy is not needed once dumped
    out = []
    for p in sorted(dest.iterdir()):
        if not p.is_file() or p.name.endswith((".part", ".json")):
            continue
        if p.name.endswith((".fastq", ".fq")):
            p = _gzip_in_place(p)
        out.append(FetchedFile(p.name, str(p), p.stat().st_size, _hash(p, "sha256"), f"sra:{dataset.download_url}"))
    if not out:
        raise FetchError(f"{template[0]} wrote no files for {dataset.download_url}")
    return out


def fetch_reads(dataset: Dataset, dest: Path, *, config: DownloadConfig, max_bytes: int | None = None,
                attempts: int = 4, backoff_s: float = 2.0, timeout_s: float = 60.0) -> tuple[list[FetchedFile], str]:
    """Download a reads dataset's FASTQ files into ``dest``; returns ``(files, source)``.

    ``max_bytes`` caps all files together (the reservation); ENA's listed sizes are checked
    against it before any byte is fetched.
    """
    kw = {"attempts": attempts, "backoff_s": backoff_s, "timeout_s": timeout_s, "policy": HttpPolicy.from_config(config)}
    files: list[FetchedFile] = []
    if dataset.type == "direct":
        urls = dataset.urls()
        # a checksum in the manifest belongs to a one-file row; R1;R2 rows are checked by the FASTQ checks
        sums = {"sha256": dataset.sha256, "md5": dataset.md5} if len(urls) == 1 else {}
        for url in urls:
            budget = None if max_bytes is None else max_bytes - sum(f.bytes for f in files)
            files.append(download(url, dest, max_bytes=budget, **sums, **kw))
        return files, "direct"
    if resolver_for(config) == "sra-tools":
        return _sra_tools(dataset, dest, config), "sra-tools"
    listed = ena_files(dataset.download_url, config)
    total = sum(f.bytes or 0 for f in listed)
    if max_bytes is not None and total > max_bytes:
        raise FetchError(f"{dataset.dataset_id}: ENA lists {total} bytes of FASTQ for {dataset.download_url}, more "
                         f"than the {max_bytes} reserved (set expected_bytes in the manifest)")
    for f in listed:
        budget = None if max_bytes is None else max_bytes - sum(x.bytes for x in files)
        name = safe_name(urllib.parse.urlsplit(f.url).path)
        files.append(download(f.url, dest, name=name, max_bytes=budget, md5=f.md5, **kw))
    return files, "ena"
