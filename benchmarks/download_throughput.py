"""Download throughput: atlasflow's downloader vs curl on the same file from a local server.

Serves a random file (default 512 MB) from the GEO stand-in server on 127.0.0.1 and downloads it
alternately with ``curl -o`` and ``atlasflow.fetch.http.download`` (checksum verification
included, as in production), 3 rounds each. Goal: ours ≥ 0.9× curl.
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
    from atlasflow.fetch.http import download
    from atlasflow.testing.geo_server import GeoServer

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
        with GeoServer(root) as server:
            url = f"{server.url}/big.bin"
            for i in range(args.rounds):
                if curl:
                    dest = Path(tmp) / f"curl{i}"
                    t0 = time.perf_counter()
                    subprocess.run([curl, "-sS", "-o", str(dest), url], check=True)
                    theirs.append(size / (time.perf_counter() - t0) / 1e6)
                    dest.unlink()
                d = Path(tmp) / f"ours{i}"
                t0 = time.perf_counter()
                download(url, d)
                ours.append(size / (time.perf_counter() - t0) / 1e6)
                shutil.rmtree(d)
    result = {"benchmark": "download_throughput", "bytes": size, "rounds": args.rounds,
              "ours_mb_s": [round(x, 1) for x in ours], "curl_mb_s": [round(x, 1) for x in theirs],
              "ours_median_mb_s": round(statistics.median(ours), 1),
              "curl_median_mb_s": round(statistics.median(theirs), 1) if theirs else None,
              "note": "ours includes the sha256 pass over the finished file"}
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
