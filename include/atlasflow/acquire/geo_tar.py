"""Stream a GEO ``_RAW.tar`` once over HTTP and keep only its count-matrix members.

The tar is never written to disk: members stream through :mod:`tarfile`'s sequential mode, and only
the members chosen from ``filelist.txt`` (:func:`atlasflow.acquire.geo.select_geo`) are written, so
the disk a series needs is its matrices' size, not the tar's plus theirs. Safety:

- a member is written under a name cleaned from the allow-list (never its path in the tar), inside
  ``<dest>/<sample>/``; absolute paths, ``..``, links and devices are never written (tar slip);
- each member may hold at most the size ``filelist.txt`` gave it, and all of them together at most
  ``max_bytes`` (the dataset's reservation); the stream itself at most the tar's listed size;
- a delimited-table member is sniffed from its first block (GEO rule 5) and dropped if it is
  metadata.

Kill-safe: members land in ``.<dest>.extracting/``, which every attempt starts empty; the folder is
renamed to ``dest`` (with ``.done.json``) only when the whole tar has streamed, so a re-run either
finds the finished folder or starts over from a clean one.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from atlasflow.acquire.geo import GeoCandidate, GeoSkip, classify, sniff_table, text_prefix
from atlasflow.acquire.http import CHUNK, FetchedFile, FetchError, TransientFetchError, open_url, safe_name
from atlasflow.core.redact import redact_url

__all__ = ["TarExtraction", "stream_raw_tar"]

log = logging.getLogger(__name__)
SNIFF_BYTES = 4 << 20  # the first block of a table member that is sniffed before a byte is written


@dataclass(frozen=True)
class TarExtraction:
    """The members written (paths under ``dest``), their samples, what was dropped, bytes streamed."""

    files: tuple[FetchedFile, ...]
    samples: Mapping[str, tuple[str, ...]]  # sample -> kinds of its files' formats
    skipped: tuple[GeoSkip, ...]
    streamed_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"files": [f.to_dict() for f in self.files], "samples": {k: list(v) for k, v in self.samples.items()},
                "skipped": [s.to_dict() for s in self.skipped], "streamed_bytes": self.streamed_bytes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TarExtraction:
        return cls(tuple(FetchedFile(**f) for f in data["files"]), {k: tuple(v) for k, v in data["samples"].items()},
                   tuple(GeoSkip(**s) for s in data["skipped"]), int(data["streamed_bytes"]))


class _Bounded:
    """A response wrapper that counts bytes and refuses more than ``limit`` (the tar's listed size)."""

    def __init__(self, resp: Any, limit: int | None, url: str) -> None:
        self.resp, self.limit, self.url, self.read_bytes = resp, limit, url, 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.resp.read(n if n is not None and n >= 0 else CHUNK)
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
            raise TransientFetchError(f"{self.url}: connection broke after {self.read_bytes} bytes: {exc}") from exc
        self.read_bytes += len(data)
        if self.limit is not None and self.read_bytes > self.limit:
            raise FetchError(f"{self.url}: more than the {self.limit} bytes filelist.txt gives the tar arrived")
        return data


def stream_raw_tar(url: str, dest: Path, *, wanted: Mapping[str, GeoCandidate] | None, max_bytes: int | None,
                   tar_bytes: int | None = None, attempts: int = 4, backoff_s: float = 2.0,
                   timeout_s: float = 60.0) -> TarExtraction:
    """Stream the tar at ``url`` and write the ``wanted`` members (by name) under ``dest/<sample>/``.

    Parameters
    ----------
    wanted
        Member name → candidate (kind, sample, size from ``filelist.txt``); None when the series has
        no ``filelist.txt``: members are then chosen by name as they stream (GEO rules 1-3).
    max_bytes
        The reservation: the members written may not exceed it together.
    tar_bytes
        The tar's size from ``filelist.txt``: the stream may not exceed it.

    Raises
    ------
    FetchError
        A member over its listed size or over the reservation, a listed member missing from the tar,
        a stream that is not a tar; :class:`TransientFetchError` when the connection kept failing.
    """
    done = dest / ".done.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        if meta.get("url") == url:
            log.info("%s already extracted into %s", redact_url(url), dest)
            return TarExtraction.from_dict(meta)
    work = dest.with_name(f".{dest.name}.extracting")
    failures = 0
    while True:
        shutil.rmtree(work, ignore_errors=True)  # every attempt starts from a clean folder
        work.mkdir(parents=True)
        try:
            result = _stream_once(url, work, dest, wanted, max_bytes, tar_bytes, timeout_s)
            break
        except TransientFetchError as exc:
            failures += 1
            if failures >= attempts:
                shutil.rmtree(work, ignore_errors=True)
                raise TransientFetchError(f"{url}: gave up after {failures} attempts: {exc}") from exc
            delay = backoff_s * 2 ** (failures - 1)
            log.warning("%s: attempt %d failed (%s); streaming again in %.1f s", redact_url(url), failures, exc, delay)
            time.sleep(delay)
        except FetchError:
            shutil.rmtree(work, ignore_errors=True)
            raise
    (work / ".done.json").write_text(json.dumps({"url": url, **result.to_dict()}))
    if dest.exists():  # a folder without .done.json (a manual copy?): never merged with ours
        shutil.rmtree(dest)
    os.replace(work, dest)
    return result


def _open(url: str, timeout_s: float) -> Any:
    try:
        return open_url(urllib.request.Request(url, headers={"User-Agent": "atlasflow/0.1"}),
                                      timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise TransientFetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise TransientFetchError(f"{url}: {getattr(exc, 'reason', exc)}") from exc


def _stream_once(url: str, work: Path, dest: Path, wanted: Mapping[str, GeoCandidate] | None, max_bytes: int | None,
                 tar_bytes: int | None, timeout_s: float) -> TarExtraction:
    tar_name = PurePosixPath(url).name
    resp = _open(url, timeout_s)
    files: list[FetchedFile] = []
    samples: dict[str, list[str]] = {}
    skipped: list[GeoSkip] = []
    written_total = 0
    with resp:
        length = resp.headers.get("Content-Length")
        if tar_bytes and length and length.isdigit() and int(length) > tar_bytes:
            raise FetchError(f"{url}: the server announces {length} bytes; filelist.txt gives the tar {tar_bytes}")
        reader = _Bounded(resp, tar_bytes, url)
        try:
            tar = tarfile.open(fileobj=reader, mode="r|*")  # type: ignore[call-overload]
        except tarfile.ReadError as exc:
            raise FetchError(f"{url}: not a readable tar stream ({exc})") from exc
        seen: set[str] = set()
        try:
            for member in tar:
                name = member.name
                where = f"{tar_name}/{name}"
                parts = PurePosixPath(name).parts
                if name.startswith(("/", "\\")) or ".." in parts or len(parts) != 1:
                    if wanted is None or name in wanted or PurePosixPath(name).name in (wanted or {}):
                        skipped.append(GeoSkip(where, "refused: a member path outside the extraction folder "
                                                      "(absolute, '..' or a sub-folder)"))
                    continue
                if wanted is not None:
                    cand = wanted.get(name)
                    if cand is None:
                        continue  # listed in filelist.txt as skipped, or not listed: not ours
                else:
                    got = classify(name)
                    if isinstance(got, GeoSkip) or got.kind == "raw_tar":
                        skipped.append(GeoSkip(where, got.reason if isinstance(got, GeoSkip) else "a tar in the tar"))
                        continue
                    cand = got
                if not member.isfile():
                    skipped.append(GeoSkip(where, "refused: not a regular file (links and devices are not extracted)"))
                    continue
                seen.add(name)
                if cand.size is not None and member.size > cand.size:
                    raise FetchError(f"{where}: {member.size} bytes in the tar, but filelist.txt gives it "
                                     f"{cand.size}; refusing to write more than was reserved")
                if max_bytes is not None and written_total + member.size > max_bytes:
                    raise FetchError(f"{where}: the count-matrix members exceed the {max_bytes} bytes reserved "
                                     "for this dataset")
                src = tar.extractfile(member)
                assert src is not None
                first = src.read(min(SNIFF_BYTES, member.size) if member.size else 0)
                if cand.kind == "table" and (why := sniff_table(text_prefix(first, name))):
                    skipped.append(GeoSkip(where, why))
                    continue  # the rest of the member is read past by the next iteration
                sample_dir = safe_name(cand.sample) if cand.sample else "series"
                out = work / sample_dir / safe_name(name)
                out.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                n = 0
                with out.open("wb") as fh:
                    block = first
                    while block:
                        n += len(block)
                        if n > member.size:  # tarfile stops at the member's end; belt and braces
                            raise FetchError(f"{where}: more bytes than its tar header says")
                        fh.write(block)
                        digest.update(block)
                        block = src.read(CHUNK)
                if n < member.size:
                    raise TransientFetchError(f"{where}: the stream ended after {n} of {member.size} bytes")
                written_total += n
                rel = f"{dest.name}/{sample_dir}/{out.name}"
                files.append(FetchedFile(rel, str(dest / sample_dir / out.name), n, digest.hexdigest(), where))
                samples.setdefault(cand.sample or "series", []).append(cand.kind)
        except tarfile.ReadError as exc:
            # a cut stream ends mid-header ("unexpected end of data"); anything else is not a tar
            if "unexpected end" in str(exc) or "empty file" in str(exc):
                raise TransientFetchError(f"{url}: the stream ended early after {reader.read_bytes} bytes ({exc})") \
                    from exc
            raise FetchError(f"{url}: not a readable tar stream ({exc})") from exc
        except (tarfile.TarError, EOFError) as exc:
            raise TransientFetchError(f"{url}: the stream broke after {reader.read_bytes} bytes ({exc})") from exc
        if tar_bytes and reader.read_bytes < tar_bytes:
            # tar's end-of-archive blocks may be shorter than what GEO lists: read what is left
            while reader.read(CHUNK):
                pass
            if reader.read_bytes < tar_bytes:
                raise TransientFetchError(f"{url}: short read: {reader.read_bytes} of {tar_bytes} bytes")
    if wanted is not None and (missing := sorted(set(wanted) - seen)):
        raise FetchError(f"{url}: filelist.txt lists {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}, "
                         "which the tar does not hold")
    log.info("%s: %d members (%d bytes) extracted while streaming %d bytes", redact_url(url), len(files), written_total,
             reader.read_bytes)
    return TarExtraction(tuple(files), {k: tuple(v) for k, v in samples.items()}, tuple(skipped), reader.read_bytes)
