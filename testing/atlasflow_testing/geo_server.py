"""A local HTTP server standing in for GEO and other download hosts (demo, tests, benchmarks).

Serves a folder on 127.0.0.1 with byte ranges and HTML folder listings (as GEO's HTTPS mirror
does), and can misbehave on purpose, per path, to exercise the downloader:

- ``fail``: answer the first N requests (``fail_times``) with a status (e.g. 503 twice), or every
  request from the N-th on (``fail_from``: a host that goes down mid-transfer),
- ``retry_after``: with ``fail``, the ``Retry-After`` header value sent with the failure (any text),
- ``redirect``: answer 302 to this URL (another host's, or the same one's),
- ``no_validator``: send neither ETag nor Last-Modified (a server resume cannot be guarded against),
- ``drop_after``: send only this many body bytes on the first N requests, then hang up,
- ``lie_length``: announce this many bytes more than the file has,
- ``no_length``: send no Content-Length,
- ``rate``: bytes per second (bandwidth throttle); ``rate=`` on the server throttles every file,
- ``hold_until``: a path on this machine; the file's last ``hold_bytes`` (default 1024) trickle out
  one byte every ``hold_every_s`` (default 2 s, so the client's read timeout never fires) until that
  path exists or ``hold_max_s`` (default 600) have passed: a slow mirror whose transfer is certain to
  be in flight when something else happens (tests use it to pin down an overlap).

A folder holding ``<ACCESSION>.tsv`` answers ``GET folder?accession=<ACCESSION>&…`` with that file:
ENA's Portal API ``filereport`` stand-in (see :func:`atlasflow_testing.reads.publish_ena`).
A folder holding ``<ACC>.soft`` answers ``GET folder?acc=<ACC>&…``: GEO's ``acc.cgi`` SOFT records
(see :mod:`atlasflow_testing.geo_corpus`).

Every body transfer is recorded (path, start, end, bytes): tests and benchmarks read how many
downloads ran at once from ``transfers()`` or from the ``--transfer-log`` JSON-lines file.

Files carry an ETag and Last-Modified, and ``If-Range`` is honoured as real servers do.

Run it: ``python -m atlasflow_testing.geo_server --root DIR [--port P] [--pid-file F] [--faults JSON]``.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from atlasflow_testing.threads import ServedInThread, listen

__all__ = ["GeoServer", "geo_series_dir", "max_concurrent"]


def geo_series_dir(root: Path, accession: str) -> Path:
    """Where a series' supplementary files go under ``root`` (GEO's ``series/GSEnnn/GSE…/suppl``)."""
    from atlasflow.acquire.fetch import geo_suppl_path

    return root / geo_suppl_path(accession)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet; the tests read counters instead
        pass

    def _fault(self, path: str) -> tuple[dict[str, Any], int]:
        with self.server.lock:
            self.server.hits[path] += 1
            fault = self.server.faults.get(path, {})
            if self.server.rate and "rate" not in fault:
                fault = {**fault, "rate": self.server.rate}
            return fault, self.server.hits[path]

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        rel = unquote(urlsplit(self.path).path)
        fault, hit = self._fault(rel)
        failing = hit >= fault["fail_from"] if "fail_from" in fault else hit <= fault.get("fail_times", 1)
        if fault.get("fail") and failing:
            if "retry_after" in fault:
                self.send_response(int(fault["fail"]))
                self.send_header("Retry-After", str(fault["retry_after"]))
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(int(fault["fail"]))
            return
        if fault.get("redirect"):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", str(fault["redirect"]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        target = (self.server.root / rel.lstrip("/")).resolve()
        if not target.is_relative_to(self.server.root) or not target.exists():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        query = parse_qs(urlsplit(self.path).query)
        accession = query.get("accession", [""])[0] or query.get("acc", [""])[0]
        if target.is_dir() and accession:  # an API answer keyed by ?accession= (ENA) or ?acc= (GEO's acc.cgi)
            keyed = target / f"{accession}.{'tsv' if 'accession' in query else 'soft'}"
            if not re.fullmatch(r"[A-Za-z0-9]{1,32}", accession) or not keyed.is_file():
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            target = keyed
        if target.is_dir():
            self._listing(target, rel, head)
            return
        st = target.stat()
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        modified = formatdate(st.st_mtime, usegmt=True)
        start = 0
        rng = self.headers.get("Range")
        # If-Range: the rest of the file only if it is still the file the client holds the start of
        fresh = self.headers.get("If-Range") in (None, etag, modified)
        if rng and rng.startswith("bytes=") and not fault.get("no_range") and fresh:
            start = int(rng[6:].split("-", 1)[0] or 0)
            if start >= size:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(HTTPStatus.OK)
        body_len = size - start
        if not fault.get("no_length"):
            self.send_header("Content-Length", str(body_len + int(fault.get("lie_length", 0))))
        self.send_header("Accept-Ranges", "bytes")
        if not fault.get("no_validator"):
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
        self.send_header("Content-Type", "application/octet-stream")
        if fault.get("no_length"):
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        limit = body_len
        if fault.get("drop_after") is not None and hit <= fault.get("drop_times", 1):
            limit = min(limit, int(fault["drop_after"]))
        rate = fault.get("rate")
        sent = 0
        t0 = time.monotonic()
        try:
            with target.open("rb") as fh:
                fh.seek(start)
                step = min(64 * 1024, max(1024, int(rate / 8))) if rate else 64 * 1024
                hold_at = max(0, limit - int(fault.get("hold_bytes", 1024))) if fault.get("hold_until") else limit
                while sent < limit:
                    if sent >= hold_at and not self._released(fault, t0):
                        block = fh.read(1)
                        time.sleep(float(fault.get("hold_every_s", 2.0)))
                    else:
                        block = fh.read(min(step, (hold_at if sent < hold_at else limit) - sent))
                    if not block:
                        break
                    if rate:
                        # pace before writing, so the transfer ends with its last byte (no trailing sleep)
                        ahead = sent / rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                    try:
                        self.wfile.write(block)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    sent += len(block)
        finally:
            self.server.record(rel, t0, time.monotonic(), sent)
        if sent < body_len + int(fault.get("lie_length", 0)) or fault.get("no_length"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _released(fault: dict[str, Any], t0: float) -> bool:
        return Path(fault["hold_until"]).exists() or time.monotonic() - t0 > float(fault.get("hold_max_s", 600))

    def _listing(self, folder: Path, rel: str, head: bool) -> None:
        base = rel if rel.endswith("/") else rel + "/"
        items = "".join(
            f'<a href="{quote(p.name)}{"/" if p.is_dir() else ""}">{html.escape(p.name)}</a>\n'
            for p in sorted(folder.iterdir())
        )
        body = f"<html><head><title>Index of {html.escape(base)}</title></head><body><pre>\n" \
               f'<a href="../">Parent Directory</a>\n{items}</pre></body></html>\n'
        data = body.encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False  # a busy port must be reported, not shared

    def __init__(self, root: Path, port: int, faults: dict[str, dict[str, Any]], *, rate: float | None = None,
                 transfer_log: Path | None = None) -> None:
        self.root = root.resolve()
        self.faults = faults
        self.rate = rate
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.transfers: list[dict[str, Any]] = []
        self.transfer_log = transfer_log
        super().__init__(("127.0.0.1", port), _Handler)

    def record(self, path: str, start: float, end: float, nbytes: int) -> None:
        # wall-clock times, so they line up with Airflow's task start/end dates
        now, mono = time.time(), time.monotonic()
        row = {"path": path, "start": now - (mono - start), "end": now - (mono - end), "bytes": nbytes}
        with self.lock:
            self.transfers.append(row)
            if self.transfer_log is not None:
                with self.transfer_log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")


def max_concurrent(transfers: list[dict[str, Any]]) -> int:
    """The most transfers that were under way at the same instant."""
    events = sorted([(t["start"], 1) for t in transfers] + [(t["end"], -1) for t in transfers],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


class GeoServer(ServedInThread):
    """Start/stop the server in a background thread (tests); ``url`` is its base URL."""

    def __init__(self, root: Path, *, port: int = 0, faults: dict[str, dict[str, Any]] | None = None,
                 rate: float | None = None) -> None:
        self._server = listen(lambda: _Server(root, port, faults or {}, rate=rate), port)
        self._serve_in_thread()

    @property
    def faults(self) -> dict[str, dict[str, Any]]:
        return self._server.faults

    def hits(self, path: str) -> int:
        return self._server.hits[path]

    def transfers(self) -> list[dict[str, Any]]:
        """Every body transfer so far: ``{"path", "start", "end", "bytes"}`` (epoch seconds)."""
        with self._server.lock:
            return list(self._server.transfers)


@contextlib.contextmanager
def serve_in_process(root: Path, *, port_file: Path, rate: float | None = None,
                     timeout_s: float = 60) -> Iterator[str]:
    """Run the server in its own process (benchmarks: its work stays off the measured process) on a
    free port for a ``with`` block; yields its base URL, then stops it by its PID.

    ``port_file`` is where the child writes its port; it is removed first so a stale one is never read.
    """
    port_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "atlasflow_testing.geo_server", "--root", str(root), "--port", "0",
            "--port-file", str(port_file)] + ([] if rate is None else ["--rate", str(rate)])
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the stand-in server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text().strip()}"
    finally:
        server.terminate()  # our own child, by its PID
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--pid-file", type=Path, help="write our PID here (the demo stops us by it)")
    parser.add_argument("--port-file", type=Path, help="write the port we listen on here")
    parser.add_argument("--faults", type=Path, help="JSON {path: {fault: value}}")
    parser.add_argument("--rate", type=float, help="throttle every transfer to this many bytes/s")
    parser.add_argument("--transfer-log", type=Path, help="append one JSON line per transfer here")
    args = parser.parse_args(argv)
    faults = json.loads(args.faults.read_text()) if args.faults else {}
    try:
        server = _Server(args.root, args.port, faults, rate=args.rate, transfer_log=args.transfer_log)
    except OSError as exc:
        sys.stderr.write(f"geo_server: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}\n")
        return 2
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")
    if args.port_file:
        args.port_file.write_text(f"{server.server_address[1]}\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
