"""GEO _RAW.tar: streamed extraction of the count-matrix members vs downloading the tar, then extracting.

A series is published on the local GEO stand-in (in its own process, as a real host would be) with
a ``GSE…_RAW.tar`` of at least 500 MB and GEO's ``filelist.txt``: per-sample Cell Ranger HDF5
matrices of **Poisson-resampled real cells** (scanpy's bundled pbmc68k_reduced, resampled with
:func:`atlasflow_testing.realdata.resample`; the counts are real cells' with Poisson noise, not
real samples) plus per-sample images (random bytes standing in for the t-SNE/UMAP PNGs and other
non-matrix files GEO tars carry).

Two ways to get the matrices, alternating order over ``--rounds`` rounds, dirty pages flushed
(``os.sync``) before each:

- **streamed** (atlasflow): :func:`atlasflow.acquire.geo_tar.stream_raw_tar` with the members the GEO
  rules choose from ``filelist.txt``: the tar is read once from the socket and only the matrices
  are written;
- **naive**: :func:`atlasflow.acquire.http.download` of the whole tar, then :mod:`tarfile`
  extraction of the matrix members, then the tar deleted.

Peak disk of the destination folder is sampled every 10 ms (:class:`atlasflow_testing.disk.PeakDiskSampler`).
Goals: streamed peak ≤ the matrix members' size + 5 %; naive peak ≥ tar + members (what it must
hold at its worst); streamed no slower. Results: ``benchmarks/results/geo_raw_tar.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRATCH = HERE / "scratch" / "geo_raw_tar"
ACCESSION = "GSE990001"


def build_series(root: Path, *, samples: int, cells: int, image_mb: int) -> dict:
    """Publish the series under ``root`` (reused when its recipe matches); returns its figures."""
    from atlasflow.acquire.fetch import geo_suppl_path
    from atlasflow_testing.geo_corpus import write_raw_tar
    from atlasflow_testing.realdata import pbmc_counts, resample, write_format

    recipe = {"samples": samples, "cells": cells, "image_mb": image_mb, "version": 1}
    suppl = root / geo_suppl_path(ACCESSION)
    meta_path = root / "recipe.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("recipe") == recipe:
        return json.loads(meta_path.read_text())
    shutil.rmtree(root, ignore_errors=True)
    suppl.mkdir(parents=True)
    pbmc = pbmc_counts()
    members = []
    for i in range(samples):
        gsm = f"GSM99000{i + 1:02d}"
        part = resample(pbmc, cells, seed=i)  # Poisson-resampled real cells (labelled so in the JSON)
        h5 = write_format(part, "10x_h5", suppl, stem="tmp")
        members.append(h5.rename(suppl / f"{gsm}_filtered_feature_bc_matrix.h5"))
        img = suppl / f"{gsm}_umap.png"
        with img.open("wb") as fh:
            fh.write(b"\x89PNG\r\n\x1a\n")
            for _ in range(image_mb):
                fh.write(os.urandom(1 << 20))
        members.append(img)
    matrix_bytes = sum(m.stat().st_size for m in members if m.name.endswith(".h5"))
    tar = write_raw_tar(suppl, ACCESSION, members)
    meta = {"recipe": recipe, "tar_bytes": tar.stat().st_size, "matrix_bytes": matrix_bytes,
            "cells": samples * cells, "suppl": str(suppl)}
    meta_path.write_text(json.dumps(meta))
    return meta


def main(argv: list[str] | None = None) -> dict:
    from atlasflow.acquire.geo import select_geo
    from atlasflow.acquire.geo_tar import stream_raw_tar
    from atlasflow.acquire.http import download
    from atlasflow_testing.disk import PeakDiskSampler
    from atlasflow_testing.geo_server import serve_in_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--cells", type=int, default=24_000, help="cells per sample")
    parser.add_argument("--image-mb", type=int, default=12, help="non-matrix bytes per sample (MB)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    www = SCRATCH / "www"
    t0 = time.perf_counter()
    series = build_series(www, samples=args.samples, cells=args.cells, image_mb=args.image_mb)
    build_s = time.perf_counter() - t0
    suppl = Path(series["suppl"])
    rel = suppl.relative_to(www).as_posix()
    streamed: list[dict] = []
    naive: list[dict] = []
    with serve_in_process(www, port_file=SCRATCH / "port") as url:
        base = f"{url}/{rel}/"
        sel = select_geo(ACCESSION, sorted(p.name for p in suppl.iterdir()),
                         filelist=(suppl / "filelist.txt").read_text())
        assert sel.tar and sel.expected_bytes == series["matrix_bytes"], sel.to_dict()
        wanted = {c.name: c for c in sel.members}

        def run_streamed(i: int) -> None:
            dest = SCRATCH / f"streamed{i}"
            shutil.rmtree(dest, ignore_errors=True)
            os.sync()
            with PeakDiskSampler([SCRATCH / f".streamed{i}.extracting", dest], every_s=0.01) as disk:
                t = time.perf_counter()
                got = stream_raw_tar(base + sel.tar, dest, wanted=wanted, max_bytes=sel.expected_bytes,
                                     tar_bytes=sel.tar_size)
                seconds = time.perf_counter() - t
            assert sum(f.bytes for f in got.files) == series["matrix_bytes"]
            streamed.append({"seconds": round(seconds, 2), "peak_bytes": disk.peak})
            shutil.rmtree(dest)

        def run_naive(i: int) -> None:
            dest = SCRATCH / f"naive{i}"
            shutil.rmtree(dest, ignore_errors=True)
            os.sync()
            with PeakDiskSampler([dest], every_s=0.01) as disk:
                t = time.perf_counter()
                fetched = download(base + sel.tar, dest)
                with tarfile.open(fetched.path) as tar:
                    tar.extractall(dest / "extracted", members=[tar.getmember(n) for n in wanted], filter="data")
                Path(fetched.path).unlink()
                seconds = time.perf_counter() - t
            naive.append({"seconds": round(seconds, 2), "peak_bytes": disk.peak})
            shutil.rmtree(dest)

        for i in range(args.rounds):
            for step in ([run_streamed, run_naive] if i % 2 == 0 else [run_naive, run_streamed]):
                step(i)

    def spread(rows: list[dict], key: str) -> dict:
        values = [r[key] for r in rows]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    members = series["matrix_bytes"]
    tar_bytes = series["tar_bytes"]
    s_peak, n_peak = spread(streamed, "peak_bytes"), spread(naive, "peak_bytes")
    s_time, n_time = spread(streamed, "seconds"), spread(naive, "seconds")
    result = {
        "benchmark": "geo_raw_tar",
        "data": (f"{args.samples} samples x {args.cells} Poisson-resampled real cells (pbmc68k_reduced) as Cell Ranger "
                 f"HDF5, plus {args.image_mb} MB of random-byte images per sample, in one uncompressed _RAW.tar"),
        "tar_bytes": tar_bytes, "matrix_member_bytes": members, "cells": series["cells"], "rounds": args.rounds,
        "build_seconds": round(build_s, 1),
        "streamed": {"runs": streamed, "peak_bytes": s_peak, "seconds": s_time},
        "naive": {"runs": naive, "peak_bytes": n_peak, "seconds": n_time},
        "streamed_peak_over_members": round(s_peak["max"] / members, 4),
        "naive_peak_over_tar_plus_members": round(n_peak["min"] / (tar_bytes + members), 4),
        "time_ratio_streamed_over_naive": round(s_time["median"] / n_time["median"], 3),
        "tar_at_least_500_mb": tar_bytes >= 500e6,
        "goals": {"streamed_peak_le_members_plus_5pct": s_peak["max"] <= members * 1.05,
                  "naive_peak_ge_tar_plus_members": n_peak["min"] >= (tar_bytes + members) * 0.99,
                  "streamed_no_slower": s_time["median"] <= n_time["median"]},
        "note": "server in its own process on 127.0.0.1; peak sampled every 10 ms over the destination folder; "
                "naive = atlasflow's downloader for the tar, tarfile for the members, then the tar deleted",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "geo_raw_tar.json").write_text(json.dumps(result, indent=1) + "\n")
    mb = 1e6
    sys.stdout.write(f"geo_raw_tar: tar {tar_bytes / mb:.0f} MB, matrices {members / mb:.0f} MB; peak streamed "
                     f"{s_peak['max'] / mb:.0f} MB vs naive {n_peak['min'] / mb:.0f} MB; time streamed "
                     f"{s_time['median']:.1f} s vs naive {n_time['median']:.1f} s\n")
    return result


if __name__ == "__main__":
    main()
