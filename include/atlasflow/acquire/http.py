"""Resumable, verified, size-capped downloads of one URL (http, https, ftp, file).

The file is streamed to ``NAME.part``; an interrupted transfer resumes with an HTTP ``Range``
request guarded by ``If-Range`` (the server's ETag or Last-Modified, kept with the URL in
``NAME.part.json``), so a file that changed on the server, or a part left by another URL, starts
over instead of being spliced; the finished file is checked (size announced by the server, sha256/md5 when given) and
renamed into place, with a ``NAME.done.json`` sidecar so a re-run skips it. Transient failures
(connection resets, timeouts, short reads, 5xx, 429) are retried with exponential backoff; 4xx
answers are final. ``attempts`` counts failures in a row without progress: a transfer that keeps
moving forward through a flaky link is not given up. No byte beyond ``max_bytes`` is ever
written, whatever the server claims.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["FetchError", "FetchedFile", "TransientFetchError", "download", "safe_name"]

log = logging.getLogger(__name__)
# 256 KB: 4 MB writes stalled in kernel writeback throttling (512 MB took 0.6-1.7 s, erratic;
# 256 KB: 0.57-0.78 s on the same disk); see benchmarks/download_throughput.py
CHUNK = 256 << 10
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class FetchError(Exception):
    """A download that will not succeed by retrying (404, checksum mismatch, over the size cap)."""


class TransientFetchError(FetchError):
    """A download that failed for a reason worth retrying later (the task's own retries)."""


@dataclass(frozen=True)
class FetchedFile:
    name: str
    path: str
    bytes: int
    sha256: str
    url: str
    resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def safe_name(name: str) -> str:
    """A file name from a URL or a server listing, made safe to join to our folder."""
    base = unquote(name).replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")
    if not cleaned:
        raise FetchError(f"cannot derive a safe file name from {name!r}")
    return cleaned[:200]


def _hash(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def download(
    url: str,
    dest_dir: Path,
    *,
    name: str | None = None,
    max_bytes: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    attempts: int = 4,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> FetchedFile:
    """Download ``url`` into ``dest_dir``.

    Parameters
    ----------
    url
        http(s)/ftp URL, or a ``file://`` URL already checked against the allowed root.
    dest_dir
        Target folder (created).
    name
        File name; by default the URL's last path segment, sanitised.
    max_bytes
        Hard cap (from the batch's reservation): a larger announced size fails at once, and a
        stream that runs past it is cut off and deleted.
    sha256, md5
        Expected checksums; a mismatch deletes the file and raises :class:`FetchError`.
    attempts, backoff_s, timeout_s
        In-task retries for transient errors, doubling the delay each time.

    Raises
    ------
    FetchError
        For permanent failures; :class:`TransientFetchError` when retries ran out on a transient one.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    fname = safe_name(name or urlsplit(url).path or "download")
    final = dest_dir / fname
    part = dest_dir / f"{fname}.part"
    owner = dest_dir / f"{fname}.part.json"
    done = dest_dir / f"{fname}.done.json"
    if final.exists() and done.exists():
        meta = _read_json(done)
        if (meta.get("url") == url and meta.get("bytes") == final.stat().st_size
                and (not sha256 or meta.get("sha256") == sha256)):
            log.info("%s already downloaded (%d bytes); skipping", final, meta["bytes"])
            return FetchedFile(**meta)
    if part.exists() and owner.exists() and _read_json(owner).get("url") != url:
        log.warning("%s: discarding %s, left by a download of another URL", url, part)
        part.unlink()
        owner.unlink()
    scheme = urlsplit(url).scheme.lower()
    t0 = time.monotonic()
    resumed_from = part.stat().st_size if part.exists() else 0
    last: Exception | None = None
    algos = ("sha256", "md5") if md5 else ("sha256",)
    hashers: dict[str, Any] = {}
    attempt = failures = 0
    while True:
        attempt += 1
        held = part.stat().st_size if part.exists() else 0
        try:
            if scheme == "file":
                _copy_local(url, part, max_bytes)
                hashers = {}
            else:
                # hash while streaming (no second pass over the file); a resumed transfer first
                # hashes the bytes it already holds
                hashers = {a: hashlib.new(a) for a in algos}
                if part.exists():
                    with part.open("rb") as fh:
                        while block := fh.read(CHUNK):
                            for h in hashers.values():
                                h.update(block)
                _stream(url, part, max_bytes, timeout_s, hashers, owner)
            break
        except TransientFetchError as exc:
            last = exc
            progressed = (part.stat().st_size if part.exists() else 0) > held
            failures = 1 if progressed else failures + 1
            if failures >= attempts and not progressed:
                raise TransientFetchError(
                    f"{url}: gave up after {attempt} attempts ({failures} in a row without progress): {last}"
                ) from last
            delay = backoff_s * 2 ** (failures - 1)
            if isinstance(exc.__cause__, urllib.error.HTTPError):
                delay = _retry_after(exc.__cause__) or delay
            log.warning("%s: attempt %d failed (%s); %d bytes held; retrying in %.1f s", url, attempt, exc,
                        part.stat().st_size if part.exists() else 0, delay)
            time.sleep(delay)
        except FetchError:
            part.unlink(missing_ok=True)
            owner.unlink(missing_ok=True)
            raise
    digest = hashers["sha256"].hexdigest() if hashers else _hash(part, "sha256")
    if sha256 and digest != sha256:
        part.unlink(missing_ok=True)
        owner.unlink(missing_ok=True)
        raise FetchError(f"{url}: sha256 mismatch: expected {sha256}, got {digest}; the file was deleted")
    if md5 and (got := (hashers["md5"].hexdigest() if hashers else _hash(part, "md5"))) != md5:
        part.unlink(missing_ok=True)
        owner.unlink(missing_ok=True)
        raise FetchError(f"{url}: md5 mismatch: expected {md5}, got {got}; the file was deleted")
    os.replace(part, final)
    owner.unlink(missing_ok=True)
    fetched = FetchedFile(fname, str(final), final.stat().st_size, digest, url, resumed_from)
    done.write_text(json.dumps(fetched.to_dict()))
    log.info("downloaded %s: %d bytes in %.1f s%s", url, fetched.bytes, time.monotonic() - t0,
             f" (resumed at {resumed_from})" if resumed_from else "")
    return fetched


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _validator(headers: Any) -> str | None:
    """What ``If-Range`` may quote: a strong ETag, else Last-Modified (weak ETags cannot guard ranges)."""
    etag = headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")


def _stream(
    url: str, part: Path, max_bytes: int | None, timeout_s: float, hashers: dict[str, Any], owner: Path
) -> None:
    have = part.stat().st_size if part.exists() else 0
    held_validator = _read_json(owner).get("validator") if have else None
    req = urllib.request.Request(url, headers={"User-Agent": "atlasflow/0.1"})
    if have and urlsplit(url).scheme in ("http", "https"):
        req.add_header("Range", f"bytes={have}-")
        if held_validator:
            # the server sends the rest only if the file is still the one we hold the start of
            req.add_header("If-Range", held_validator)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # "range not satisfiable": fine only if the server's own total equals what we hold
            total = re.match(r"bytes \*/(\d+)", exc.headers.get("Content-Range", "") if exc.headers else "")
            if total and int(total.group(1)) == have:
                log.warning("%s: the server's total is %d bytes, which we already hold (its earlier "
                            "Content-Length was wrong)", url, have)
                return
            part.unlink(missing_ok=True)
            raise TransientFetchError(f"server refused to resume at byte {have}; starting over") from exc
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise TransientFetchError(f"HTTP {exc.code} {exc.reason}") from exc
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise TransientFetchError(f"{getattr(exc, 'reason', exc)}") from exc
    with resp:
        status = getattr(resp, "status", 200)
        validator = _validator(resp.headers)
        if status == 206:
            start = _range_start(resp.headers.get("Content-Range"))
            if start != have or (held_validator and validator and validator != held_validator):
                part.unlink(missing_ok=True)  # cannot be continued: the next attempt starts over
                raise TransientFetchError(f"server resumed at byte {start} of a file "
                                          f"{'that changed' if start == have else 'we hold ' + str(have) + ' bytes of'}")
            mode = "ab"
        else:
            if have:
                log.info("%s: the server sent the whole file (no range support, or it changed); starting over", url)
            have, mode = 0, "wb"
            for name in list(hashers):
                hashers[name] = hashlib.new(name)
        owner.write_text(json.dumps({"url": url, "validator": validator}))
        length = resp.headers.get("Content-Length")
        expected_total = have + int(length) if length and length.isdigit() else None
        if max_bytes is not None and expected_total is not None and expected_total > max_bytes:
            raise FetchError(f"{url}: the server announces {expected_total} bytes, more than the "
                             f"{max_bytes} reserved for this dataset")
        written = have
        buf = memoryview(bytearray(CHUNK))
        with part.open(mode) as fh:
            try:
                while n := resp.readinto(buf):
                    written += n
                    if max_bytes is not None and written > max_bytes:
                        fh.close()
                        part.unlink(missing_ok=True)
                        raise FetchError(f"{url}: more than the {max_bytes} bytes reserved arrived; "
                                         "the partial file was deleted")
                    block = buf[:n]
                    fh.write(block)
                    for h in hashers.values():
                        h.update(block)
            except (OSError, ValueError, http.client.HTTPException) as exc:  # reset / timeout / IncompleteRead
                raise TransientFetchError(f"connection broke after {written} bytes: {exc}") from exc
        if expected_total is not None and written < expected_total:
            raise TransientFetchError(f"short read: {written} of {expected_total} bytes")


def _range_start(value: str | None) -> int:
    m = re.match(r"bytes (\d+)-", value or "")
    return int(m.group(1)) if m else -1


def _copy_local(url: str, part: Path, max_bytes: int | None) -> None:
    src = Path(unquote(urlsplit(url).path))
    if not src.is_file():
        raise FetchError(f"{url}: no such file")
    if max_bytes is not None and src.stat().st_size > max_bytes:
        raise FetchError(f"{url}: {src.stat().st_size} bytes, more than the {max_bytes} reserved")
    shutil.copyfile(src, part)
