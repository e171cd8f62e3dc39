"""Streaming a GEO _RAW.tar: only the wanted members land, tar slip refused, bounded, kill-safe."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from atlasflow.acquire.geo import GeoCandidate
from atlasflow.acquire.geo_tar import stream_raw_tar
from atlasflow.acquire.http import FetchError
from atlasflow_testing.geo_server import GeoServer

ROOT = Path(__file__).resolve().parents[3]


def make_tar(path: Path, members: dict[str, bytes], *, links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def wanted(**sizes: int) -> dict[str, GeoCandidate]:
    return {n: GeoCandidate(n, "10x_h5", n.split("_")[0], s, in_tar=True) for n, s in sizes.items()}


TABLE = ("\t" + "\t".join(f"AAACCTGAGCGTAGC{i}-1" for i in range(12)) + "\n").encode() + b"".join(
    f"GENE{k}\t".encode() + b"\t".join(b"1" for _ in range(12)) + b"\n" for k in range(20))


def test_only_wanted_members_land_and_unsafe_ones_never_do(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    make_tar(www / "GSE1_RAW.tar", {"GSM1_filtered_feature_bc_matrix.h5": b"a" * 5000, "GSM1_tsne.png": b"p" * 9000,
                                    "../GSM2_escape.h5": b"e" * 10, "/tmp/GSM3_abs.h5": b"x" * 10,
                                    "GSM4_notes.txt": b"free text, not a table\n",
                                    "GSM5_counts.tsv": TABLE},
             links={"GSM6_link.h5": "/etc/passwd"})
    dest = tmp_path / "raw" / "GSE1_RAW"
    with GeoServer(www) as server:
        got = stream_raw_tar(f"{server.url}/GSE1_RAW.tar", dest, wanted=None, max_bytes=100_000, backoff_s=0.01)
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and p.name != ".done.json")
    assert files == ["GSM1/GSM1_filtered_feature_bc_matrix.h5", "GSM5/GSM5_counts.tsv"]
    why = {s.name: s.reason for s in got.skipped}
    assert "not count data" in why["GSE1_RAW.tar/GSM1_tsne.png"]
    assert why["GSE1_RAW.tar/../GSM2_escape.h5"].startswith("refused") and why["GSE1_RAW.tar//tmp/GSM3_abs.h5"]
    assert "not a regular file" in why["GSE1_RAW.tar/GSM6_link.h5"]
    assert "no data rows" in why["GSE1_RAW.tar/GSM4_notes.txt"]
    assert not (tmp_path / "raw" / "GSM2_escape.h5").exists() and not Path("/tmp/GSM3_abs.h5").exists()
    assert {f.name for f in got.files} == {"GSE1_RAW/GSM1/GSM1_filtered_feature_bc_matrix.h5",
                                           "GSE1_RAW/GSM5/GSM5_counts.tsv"}
    assert not list(tmp_path.rglob("*.tar")) or list(tmp_path.rglob("*.tar")) == [www / "GSE1_RAW.tar"]


def test_members_are_capped_by_filelist_sizes_and_the_reservation(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    make_tar(www / "GSE1_RAW.tar", {"GSM1_a.h5": b"a" * 5000, "GSM2_b.h5": b"b" * 5000})
    with GeoServer(www) as server:
        url = f"{server.url}/GSE1_RAW.tar"
        with pytest.raises(FetchError, match="GSM1_a.h5: 5000 bytes in the tar, but filelist.txt gives it 4000"):
            stream_raw_tar(url, tmp_path / "a", wanted=wanted(**{"GSM1_a.h5": 4000}),
                           max_bytes=None)
        with pytest.raises(FetchError, match="exceed the 8000 bytes reserved"):
            stream_raw_tar(url, tmp_path / "b", wanted=wanted(**{"GSM1_a.h5": 5000, "GSM2_b.h5": 5000}),
                           max_bytes=8000)
        with pytest.raises(FetchError, match="lists GSM9_c.h5, which the tar does not hold"):
            stream_raw_tar(url, tmp_path / "c", wanted=wanted(**{"GSM9_c.h5": 10}), max_bytes=None)
        with pytest.raises(FetchError, match="announces 20480 bytes; filelist.txt gives the tar 1000"):
            stream_raw_tar(url, tmp_path / "d", wanted=wanted(**{"GSM1_a.h5": 5000}), max_bytes=None, tar_bytes=1000)
        server.faults["/GSE1_RAW.tar"] = {"no_length": True}  # a server that does not say: the stream is cut
        with pytest.raises(FetchError, match="more than the 1000 bytes filelist.txt gives the tar"):
            stream_raw_tar(url, tmp_path / "d", wanted=wanted(**{"GSM1_a.h5": 5000}), max_bytes=None, tar_bytes=1000)
    # a refused stream leaves nothing: no extraction folder, no member
    assert not [p for p in tmp_path.iterdir() if p.name != "www"]


def test_a_broken_stream_restarts_from_a_clean_folder(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    make_tar(www / "GSE1_RAW.tar", {"GSM1_a.h5": os.urandom(300_000), "GSM2_b.h5": os.urandom(300_000)})
    with GeoServer(www, faults={"/GSE1_RAW.tar": {"drop_after": 400_000, "drop_times": 1}}) as server:
        got = stream_raw_tar(f"{server.url}/GSE1_RAW.tar", tmp_path / "raw" / "GSE1_RAW",
                             wanted=wanted(**{"GSM1_a.h5": 300_000, "GSM2_b.h5": 300_000}), max_bytes=None,
                             backoff_s=0.01)
        assert server.hits("/GSE1_RAW.tar") == 2
    assert sorted(f.bytes for f in got.files) == [300_000, 300_000]
    with tarfile.open(www / "GSE1_RAW.tar") as tar:
        assert (tmp_path / "raw/GSE1_RAW/GSM2/GSM2_b.h5").read_bytes() == tar.extractfile("GSM2_b.h5").read()
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["GSE1_RAW"]


def test_a_killed_extraction_leaves_no_half_folder_in_place_and_a_rerun_finishes(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    make_tar(www / "GSE1_RAW.tar", {"GSM1_a.h5": os.urandom(200_000), "GSM2_b.h5": os.urandom(200_000)})
    release = tmp_path / "release"
    dest = tmp_path / "raw" / "GSE1_RAW"
    # the server holds the tar's last 150 kB (inside GSM2's member) until released: the extraction is
    # certainly in flight, GSM1 written, GSM2 not, when the task is killed
    faults = {"/GSE1_RAW.tar": {"hold_until": str(release), "hold_every_s": 0.2, "hold_bytes": 150_000}}
    with GeoServer(www, faults=faults) as server:
        url = f"{server.url}/GSE1_RAW.tar"
        code = ("import sys; from pathlib import Path; from atlasflow.acquire.geo_tar import stream_raw_tar; "
                "from atlasflow.acquire.geo import GeoCandidate as C; "
                "w = {n: C(n, '10x_h5', n[:4], 200_000, True) for n in ('GSM1_a.h5', 'GSM2_b.h5')}; "
                "stream_raw_tar(sys.argv[1], Path(sys.argv[2]), wanted=w, max_bytes=None)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("include", "testing"))}
        child = subprocess.Popen([sys.executable, "-c", code, url, str(dest)], env=env)
        work = dest.with_name(".GSE1_RAW.extracting")
        deadline = time.monotonic() + 60
        first = work / "GSM1" / "GSM1_a.h5"
        while not (first.exists() and first.stat().st_size == 200_000) and time.monotonic() < deadline:
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert first.is_file() and not dest.exists()  # the half-done work stays apart, never in place
        release.touch()
        w = {n: GeoCandidate(n, "10x_h5", n[:4], 200_000, True) for n in ("GSM1_a.h5", "GSM2_b.h5")}
        got = stream_raw_tar(url, dest, wanted=w, max_bytes=None)
        hits = server.hits("/GSE1_RAW.tar")
        again = stream_raw_tar(url, dest, wanted=w, max_bytes=None)  # finds the finished folder
        assert server.hits("/GSE1_RAW.tar") == hits and again == got
    assert not work.exists() and sorted(p.name for p in dest.rglob("*.h5")) == ["GSM1_a.h5", "GSM2_b.h5"]
    assert len(got.files) == 2
