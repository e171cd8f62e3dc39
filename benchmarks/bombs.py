"""Disk and memory bombs (issue 16 point 4): what a refusal costs in bytes written, peak memory and time.

Cases, each in its own fresh subprocess (so ``ru_maxrss`` is that case's alone):

- ``tar_bomb``: a ~612 KB .tar.gz that extracts to 629 MB of zeros (the review's figures), opened
  with a 10 MB cap (a dataset whose manifest says 612 KB reserves about that much): bytes written
  before the refusal, seconds, peak RSS. ``tar_bomb_uncapped`` extracts it whole for comparison.
- ``fastq_bomb_line`` / ``fastq_bomb_records``: 48 KB-class .fastq.gz bombs (one endless line; 12 M tiny
  records) through ``check_fastq``: peak RSS (the review measured 1.1 GB before the fix).
- ``csv_gz_bomb`` / ``rds_bomb``: a gzip CSV / RDS that inflates to 256 MB (~1000x), opened with the
  default ``readers.*`` bounds (at most 200x the compressed size, 10 GB): the text goes to memory, so
  the disk reservation no longer bounds it.

Run: ``make bench BENCH=bombs`` or ``.venv/bin/python benchmarks/bombs.py``; JSON in
benchmarks/results/bombs.json.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TAR_TOTAL = 629 * 10**6
TAR_CAP = 10 * 10**6


# the single-file gzip bombs: (file name, what it inflates to; built only when the case runs)
_GZ_BOMBS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "fastq_bomb_line": ("s_R1.fastq.gz", lambda: b"@r1\n" + b"A" * (48 * 2**20)),
    "fastq_bomb_records": ("s_R1.fastq.gz", lambda: b"@\nA\n+\nI\n" * (12 * 2**20)),
    "csv_gz_bomb": ("b.csv.gz", lambda: b"gene,c1\n" + b"0" * (256 * 2**20)),
    "rds_bomb": ("b.rds", lambda: b"X\n" + bytes(256 * 2**20)),
}


def _build(case: str, folder: Path) -> Path:
    if case.startswith("tar_bomb"):
        path = folder / "bomb.tar.gz"
        members, size = 10, TAR_TOTAL // 10
        with tarfile.open(path, "w:gz", compresslevel=9) as tar:
            for i in range(members):
                info = tarfile.TarInfo(f"filtered_feature_bc_matrix/part{i}.bin")
                info.size = size
                tar.addfile(info, io.BytesIO(bytes(size)))
        return path
    if case in _GZ_BOMBS:
        name, body = _GZ_BOMBS[case]
        path = folder / name
        path.write_bytes(gzip.compress(body(), compresslevel=9))
        return path
    raise ValueError(case)


def _hwm_mb() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which a child inherits from the
    parent that built the bomb in memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _run_case(case: str, path: Path) -> dict:
    """In a fresh process: the refusal (or extraction) and its costs."""
    from atlasflow.acquire.quant import QuantError, check_fastq
    from atlasflow.readers.formats import FormatError, open_counts, safe_extract

    cache = path.parent / "cache"
    base_rss = _hwm_mb()  # after the imports
    t0 = time.perf_counter()
    outcome = "accepted"
    try:
        if case == "tar_bomb_uncapped":
            safe_extract(path, cache / "out")
        elif case == "tar_bomb":
            open_counts(path, cache=cache, max_bytes=TAR_CAP)
        elif case.startswith("fastq"):
            check_fastq(path)
        else:
            open_counts(path, cache=cache)  # the default in-memory bounds (readers.*)
    except (FormatError, QuantError) as exc:
        outcome = f"refused: {exc}"
    seconds = time.perf_counter() - t0
    peak = _hwm_mb()
    return {"case": case, "input_bytes": path.stat().st_size, "outcome": outcome[:300], "seconds": round(seconds, 3),
            "peak_rss_mb": round(peak, 1), "rss_growth_mb": round(peak - base_rss, 1),
            "bytes_left_on_disk": _tree_bytes(cache) if cache.exists() else 0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tar_bomb,tar_bomb_uncapped,fastq_bomb_line,fastq_bomb_records,"
                                            "csv_gz_bomb,rds_bomb")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_run_case(args.one, args.path)))
        return {}
    rows = []
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix="atlasflow-bomb-") as tmp:
            path = _build(case, Path(tmp))
            done = subprocess.run([sys.executable, __file__, "--one", case, "--path", str(path)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row))
    result = {"benchmark": "bombs", "tar_total_bytes": TAR_TOTAL, "tar_cap_bytes": TAR_CAP, "cases": rows,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bombs.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
