"""Resumable, verified, size-capped downloads of one URL (http, https, ftp, file).

The file is streamed to ``NAME.part``; an interrupted transfer resumes with an HTTP ``Range``
request guarded by ``If-Range`` (the server's ETag or Last-Modified, kept with the URL in
``NAME.part.json``), so a file that changed on the server, or a part left by another URL, starts
over instead of being spliced; without such a validator a part is resumed only when a checksum
will prove the result (else the file is fetched whole again); the finished file is checked (size announced by the server, sha256/md5 when given) and
renamed into place, with a ``NAME.done.json`` sidecar so a re-run skips it. Transient failures
(connection resets, timeouts, short reads, 5xx, 429) are retried with exponential backoff; 4xx
answers are final. ``attempts`` counts failures in a row without progress: a transfer that keeps
moving forward through a flaky link is not given up. No byte beyond ``max_bytes`` is ever
written, whatever the server claims.

A ``Retry-After`` answer is clamped to 1 s .. :attr:`HttpPolicy.max_retry_after_s`; a value that is
not a delay (negative, ``nan``, garbage, a date in the past) means "retry with the usual backoff".
Redirects to another host are followed only to the hosts :class:`HttpPolicy` allows (GEO/ENA/DDBJ
and the configured mirrors by default), logged and reported in :attr:`FetchedFile.redirected_to`.
URLs are shown redacted (no query string: presigned links carry their tokens there).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from atlasflow.core.redact import redact_text, redact_url

if TYPE_CHECKING:
    from atlasflow.core.config import DownloadConfig

__all__ = ["FetchError", "FetchedFile", "HttpPolicy", "TransientFetchError", "ascii_url", "download", "open_url",
           "retry_after_s", "safe_name"]

log = logging.getLogger(__name__)
# 256 KB: 4 MB writes stalled in kernel writeback throttling (512 MB took 0.6-1.7 s, erratic;
# 256 KB: 0.57-0.78 s on the same disk); see benchmarks/download_throughput.py
CHUNK = 256 << 10
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class FetchError(Exception):
    """A download that will not succeed by retrying (404, checksum mismatch, over the size cap).

    The message never holds a URL's query string (:func:`~atlasflow.core.redact.redact_text`).
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(str(message)))


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
    redirected_to: str | None = None  # where another host served it from (redacted), when it did

    def to_dict(self) -> dict[str, Any]:
        """For records (done.json, fetch.json): the URL redacted."""
        return {**asdict(self), "url": redact_url(self.url)}


# hosts a download may be redirected to by default: GEO/SRA (NCBI), ENA (EBI), DDBJ, CELLxGENE, subdomains too
DEFAULT_REDIRECT_HOSTS = ("ncbi.nlm.nih.gov", "ebi.ac.uk", "ddbj.nig.ac.jp", "cellxgene.cziscience.com")


@dataclass(frozen=True)
class HttpPolicy:
    """How much of a server's word a download takes.

    ``max_retry_after_s`` bounds a ``Retry-After`` wait; ``redirect_hosts`` are the hosts (and their
    subdomains) a redirect may lead to from another host (``"*"``: any); the same host is always fine.
    """

    max_retry_after_s: float = 300.0
    redirect_hosts: tuple[str, ...] = DEFAULT_REDIRECT_HOSTS

    @classmethod
    def from_config(cls, config: DownloadConfig) -> HttpPolicy:
        """``download.max_retry_after_s`` and ``download.redirect_hosts`` plus the configured GEO/ENA hosts."""
        hosts = [h.strip().lower() for h in config.redirect_hosts.split(",") if h.strip()]
        for url in (config.geo_base_url, config.geo_query_url, config.ena_base_url, config.ena_fastq_base_url):
            if url and (host := urlsplit(url).hostname):
                hosts.append(host.lower())
        return cls(max_retry_after_s=config.max_retry_after_s, redirect_hosts=tuple(dict.fromkeys(hosts)))

    def allows_redirect(self, origin: str, target: str) -> bool:
        """Whether a redirect from ``origin``'s host to ``target``'s may be followed."""
        a, b = (urlsplit(origin).hostname or "").lower(), (urlsplit(target).hostname or "").lower()
        if a == b or "*" in self.redirect_hosts:
            return True
        return any(b == h or b.endswith("." + h) for h in self.redirect_hosts)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only where the policy allows; remembers cross-host ones for the record."""

    def __init__(self, origin: str, policy: HttpPolicy) -> None:
        self.origin, self.policy, self.crossed = origin, policy, []  # type: list[str]

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if not self.policy.allows_redirect(self.origin, newurl):
            raise FetchError(f"{redact_url(self.origin)}: redirected (HTTP {code}) to another host, "
                             f"{redact_url(newurl)}, which download.redirect_hosts does not allow")
        if (urlsplit(newurl).hostname or "") != (urlsplit(self.origin).hostname or ""):
            log.warning("%s: redirected to another host: %s", redact_url(self.origin), redact_url(newurl))
            self.crossed.append(redact_url(newurl))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(req: urllib.request.Request | str, *, timeout: float, policy: HttpPolicy | None = None,
             crossed: list[str] | None = None) -> Any:
    """``urlopen`` with the redirect policy applied; cross-host redirects followed are appended to ``crossed``.

    A URL with non-ASCII characters is sent as its ASCII form (:func:`ascii_url`).

    Raises
    ------
    FetchError
        A redirect to a host the policy does not allow (before any request goes there), or a URL
        that has no ASCII form.
    """
    if isinstance(req, urllib.request.Request):
        if not req.full_url.isascii():
            req.full_url = ascii_url(req.full_url)
        url = req.full_url
    else:
        req = url = ascii_url(req)
    handler = _Redirects(url, policy or HttpPolicy())
    resp = urllib.request.build_opener(handler).open(req, timeout=timeout)
    if crossed is not None:
        crossed.extend(handler.crossed)
    return resp


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


def ascii_url(url: str) -> str:
    """``url`` as an ASCII URI: an internationalised host in IDNA (punycode), other characters of the
    path and query percent-encoded. (http.client cannot send anything else: it raised a
    UnicodeEncodeError past the quarantine path.)

    Raises
    ------
    FetchError
        A host name that is not a valid internationalised name.
    """
    if url.isascii():
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ascii_host = host.encode("idna").decode("ascii") if host else ""
    except UnicodeError as exc:
        raise FetchError(f"{redact_url(url)}: the host name {host!r} is not a valid internationalised name") from exc
    netloc = ascii_host
    if parts.port is not None:
        netloc += f":{parts.port}"
    if "@" in parts.netloc:
        netloc = quote(parts.netloc.rsplit("@", 1)[0], safe=":%") + "@" + netloc
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe="/%:@!$&'()*+,;=-._~"),
                       quote(parts.query, safe="=&%+/:?@!$'()*,;-._~"), quote(parts.fragment, safe="%")))


def retry_after_s(value: str | None, *, max_s: float, now: float | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for, clamped to 1 s .. ``max_s``.

    Seconds (RFC 9110 says a non-negative integer; a decimal is taken too) or an HTTP date. None
    (use the usual backoff) for anything else: absent, negative, ``nan``/``inf``, garbage, a date
    that cannot be parsed. A date in the past means "now", so 1 s.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        delay = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:
            return None
        delay = when.timestamp() - (time.time() if now is None else now)
    else:
        if not math.isfinite(delay) or delay < 0:
            return None
    return min(max(delay, 1.0), max_s)


def _retry_after(exc: urllib.error.HTTPError, policy: HttpPolicy) -> float | None:
    value = exc.headers.get("Retry-After") if exc.headers else None
    return retry_after_s(value, max_s=policy.max_retry_after_s)


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
    policy: HttpPolicy | None = None,
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
    policy
        ``Retry-After`` bound and the redirect policy (:class:`HttpPolicy`; its defaults when None).

    Raises
    ------
    FetchError
        For permanent failures; :class:`TransientFetchError` when retries ran out on a transient one.
    """
    policy = policy or HttpPolicy()
    shown = redact_url(url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fname = safe_name(name or urlsplit(url).path or "download")
    final = dest_dir / fname
    part = dest_dir / f"{fname}.part"
    owner = dest_dir / f"{fname}.part.json"
    done = dest_dir / f"{fname}.done.json"
    if final.exists() and done.exists():
        meta = _read_json(done)
        if (meta.get("url_sha256") == _url_key(url) and meta.get("bytes") == final.stat().st_size
                and (not sha256 or meta.get("sha256") == sha256)):
            log.info("%s already downloaded (%d bytes); skipping", final, meta["bytes"])
            known = {k: v for k, v in meta.items() if k in FetchedFile.__dataclass_fields__}
            return FetchedFile(**{**known, "url": url})
    if part.exists() and owner.exists() and _read_json(owner).get("url_sha256") != _url_key(url):
        log.warning("%s: discarding %s, left by a download of another URL", shown, part)
        part.unlink()
        owner.unlink()
    scheme = urlsplit(url).scheme.lower()
    if part.exists() and not (sha256 or md5) and not _read_json(owner).get("validator"):
        # nothing would tell a changed file from the one we hold the start of (see _stream)
        log.info("%s: no ETag/Last-Modified and no checksum: not resuming %s", shown, part)
        part.unlink()
        owner.unlink(missing_ok=True)
    t0 = time.monotonic()
    resumed_from = part.stat().st_size if part.exists() else 0
    last: Exception | None = None
    algos = ("sha256", "md5") if md5 else ("sha256",)
    hashers: dict[str, Any] = {}
    crossed: list[str] = []
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
                _stream(url, part, max_bytes, timeout_s, hashers, owner, policy=policy, crossed=crossed,
                        verifiable=bool(sha256 or md5))
            break
        except TransientFetchError as exc:
            last = exc
            progressed = (part.stat().st_size if part.exists() else 0) > held
            failures = 1 if progressed else failures + 1
            if failures >= attempts and not progressed:
                raise TransientFetchError(
                    f"{shown}: gave up after {attempt} attempts ({failures} in a row without progress): {last}"
                ) from last
            delay = backoff_s * 2 ** (failures - 1)
            if isinstance(exc.__cause__, urllib.error.HTTPError):
                delay = _retry_after(exc.__cause__, policy) or delay
            log.warning("%s: attempt %d failed (%s); %d bytes held; retrying in %.1f s", shown, attempt, exc,
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
        raise FetchError(f"{shown}: sha256 mismatch: expected {sha256}, got {digest}; the file was deleted")
    if md5 and (got := (hashers["md5"].hexdigest() if hashers else _hash(part, "md5"))) != md5:
        part.unlink(missing_ok=True)
        owner.unlink(missing_ok=True)
        raise FetchError(f"{shown}: md5 mismatch: expected {md5}, got {got}; the file was deleted")
    os.replace(part, final)
    owner.unlink(missing_ok=True)
    fetched = FetchedFile(fname, str(final), final.stat().st_size, digest, url, resumed_from,
                          crossed[-1] if crossed else None)
    done.write_text(json.dumps({**fetched.to_dict(), "url_sha256": _url_key(url)}))
    log.info("downloaded %s: %d bytes in %.1f s%s", shown, fetched.bytes, time.monotonic() - t0,
             f" (resumed at {resumed_from})" if resumed_from else "")
    return fetched


def _url_key(url: str) -> str:
    """Which URL a part or done file belongs to, without storing the URL's tokens."""
    return hashlib.sha256(url.encode()).hexdigest()


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
    url: str, part: Path, max_bytes: int | None, timeout_s: float, hashers: dict[str, Any], owner: Path, *,
    policy: HttpPolicy, crossed: list[str], verifiable: bool,
) -> None:
    shown = redact_url(url)
    have = part.stat().st_size if part.exists() else 0
    held_validator = _read_json(owner).get("validator") if have else None
    if have and not held_validator and not verifiable:
        # nothing would tell a changed file from the one we hold the start of: splicing the two
        # would pass every check, so the whole file is fetched again
        log.info("%s: no ETag/Last-Modified and no checksum: not resuming the %d bytes held", shown, have)
        part.unlink(missing_ok=True)
        have = 0
        for name in list(hashers):
            hashers[name] = hashlib.new(name)
    req = urllib.request.Request(url, headers={"User-Agent": "atlasflow/0.1"})
    if have and urlsplit(url).scheme in ("http", "https"):
        req.add_header("Range", f"bytes={have}-")
        if held_validator:
            # the server sends the rest only if the file is still the one we hold the start of
            req.add_header("If-Range", held_validator)
    try:
        resp = open_url(req, timeout=timeout_s, policy=policy, crossed=crossed)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # "range not satisfiable": fine only if the server's own total equals what we hold
            total = re.match(r"bytes \*/([0-9]+)", exc.headers.get("Content-Range", "") if exc.headers else "")
            if total and int(total.group(1)) == have:
                log.warning("%s: the server's total is %d bytes, which we already hold (its earlier "
                            "Content-Length was wrong)", url, have)
                return
            part.unlink(missing_ok=True)
            raise TransientFetchError(f"server refused to resume at byte {have}; starting over") from exc
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise TransientFetchError(f"HTTP {exc.code} {exc.reason}") from exc
        raise FetchError(f"{shown}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise TransientFetchError(f"{getattr(exc, 'reason', exc)}") from exc
    except ValueError as exc:  # a URL no retry can send (UnicodeError included): quarantine, never crash
        raise FetchError(f"{shown}: cannot be requested ({type(exc).__name__}: {exc})") from exc
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
                log.info("%s: the server sent the whole file (no range support, or it changed); starting over", shown)
            have, mode = 0, "wb"
            for name in list(hashers):
                hashers[name] = hashlib.new(name)
        owner.write_text(json.dumps({"url": shown, "url_sha256": _url_key(url), "validator": validator}))
        length = resp.headers.get("Content-Length")
        expected_total = have + int(length) if length and length.isdigit() else None
        if max_bytes is not None and expected_total is not None and expected_total > max_bytes:
            raise FetchError(f"{shown}: the server announces {expected_total} bytes, more than the "
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
                        raise FetchError(f"{shown}: more than the {max_bytes} bytes reserved arrived; "
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
    m = re.match(r"bytes ([0-9]+)-", value or "")
    return int(m.group(1)) if m else -1


def _copy_local(url: str, part: Path, max_bytes: int | None) -> None:
    src = Path(unquote(urlsplit(url).path))
    if not src.is_file():
        raise FetchError(f"{redact_url(url)}: no such file")
    if max_bytes is not None and src.stat().st_size > max_bytes:
        raise FetchError(f"{redact_url(url)}: {src.stat().st_size} bytes, more than the {max_bytes} reserved")
    shutil.copyfile(src, part)
