"""Download throughput: atlasflow's downloader vs curl on the same file from a local server.

Serves a random file (default 512 MB) from the GEO stand-in server on 127.0.0.1 and downloads it
alternately with ``curl -o`` and ``atlasflow.acquire.http.download`` (checksum verification
included, as in production), 3 rounds each. Goal: ours ≥ 0.9× curl.

Fairness: the server runs in its own process, as a real host would (in a thread of this process
it would share the GIL with our downloader and not with curl); before every timed download the
previous one's dirty pages are flushed (``os.sync``) and the order alternates per round, so
neither client pays for the other's writeback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    from atlasflow.acquire.http import download
    from atlasflow_testing.geo_server import serve_in_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    curl = shutil.which("curl")
    with tempfile.TemporaryDirectory(prefix="atlasflow-bench-dl-") as tmp:
        root = Path(tmp) / "www"
        root.mkdir()
        with (root / "big.bin").open("wb") as fh:
            for _ in range(args.mb):
                fh.write(os.urandom(1 << 20))
        size = (root / "big.bin").stat().st_size
        ours, theirs = [], []
        with serve_in_process(root, port_file=Path(tmp) / "port") as base:
            url = f"{base}/big.bin"

            def run_curl(i: int) -> None:
                dest = Path(tmp) / f"curl{i}"
                os.sync()
                t0 = time.perf_counter()
                subprocess.run([curl, "-sS", "-o", str(dest), url], check=True)
                theirs.append(size / (time.perf_counter() - t0) / 1e6)
                dest.unlink()

            def run_ours(i: int) -> None:
                d = Path(tmp) / f"ours{i}"
                os.sync()
                t0 = time.perf_counter()
                download(url, d)
                ours.append(size / (time.perf_counter() - t0) / 1e6)
                shutil.rmtree(d)

            for i in range(args.rounds):
                order = [run_ours, run_curl] if i % 2 else [run_curl, run_ours]
                for step in order:
                    if step is run_curl and not curl:
                        continue
                    step(i)
    result = {"benchmark": "download_throughput", "bytes": size, "rounds": args.rounds,
              "ours_mb_s": [round(x, 1) for x in ours], "curl_mb_s": [round(x, 1) for x in theirs],
              "ours_median_mb_s": round(statistics.median(ours), 1),
              "curl_median_mb_s": round(statistics.median(theirs), 1) if theirs else None,
              "note": "ours hashes (sha256) while streaming; the server runs in its own process"}
    if theirs:
        result["ratio"] = round(statistics.median(ours) / statistics.median(theirs), 3)
        result["meets_goal"] = result["ratio"] >= 0.9
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "download_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(f"download_throughput: ours {result['ours_median_mb_s']} MB/s, curl {result['curl_median_mb_s']} MB/s, "
                     f"ratio {result.get('ratio')}\n")
    return result


if __name__ == "__main__":
    main()
