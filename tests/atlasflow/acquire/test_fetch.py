from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from atlasflow.acquire.fetch import (
    FetchError,
    TransientFetchError,
    fetch_dataset,
    geo_listing_url,
    pick_geo_files,
)
from atlasflow.acquire.http import download, safe_name
from atlasflow.core.config import DownloadConfig
from atlasflow.intake.manifest import Dataset
from atlasflow_testing.geo_server import GeoServer, geo_series_dir

SIZE = 300_000
FAST = {"attempts": 4, "backoff_s": 0.01, "timeout_s": 10}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_plain_download_is_verified_and_renamed(served):
    server, data, dest = served
    f = download(f"{server.url}/files/data.h5ad", dest, sha256=sha(data), md5=hashlib.md5(data).hexdigest(), **FAST)
    assert Path(f.path).read_bytes() == data and f.sha256 == sha(data) and f.bytes == SIZE
    assert sorted(p.name for p in dest.iterdir()) == ["data.h5ad", "data.h5ad.done.json"]
    # a re-run finds it done and does not ask the server again
    hits = server.hits("/files/data.h5ad")
    download(f"{server.url}/files/data.h5ad", dest, sha256=sha(data), **FAST)
    assert server.hits("/files/data.h5ad") == hits


def test_dropped_connection_resumes_with_range(served):
    server, data, dest = served
    server.faults["/files/data.h5ad"] = {"drop_after": 100_000, "drop_times": 1}
    f = download(f"{server.url}/files/data.h5ad", dest, sha256=sha(data), **FAST)
    assert Path(f.path).read_bytes() == data and server.hits("/files/data.h5ad") == 2


def test_interrupted_task_resumes_from_part_file(served):
    server, data, dest = served
    dest.mkdir(parents=True)
    (dest / "data.h5ad.part").write_bytes(data[:120_000])  # what a killed task left behind
    f = download(f"{server.url}/files/data.h5ad", dest, sha256=sha(data), **FAST)
    assert f.resumed_from == 120_000 and Path(f.path).read_bytes() == data


def test_503_twice_then_success(served):
    server, data, dest = served
    server.faults["/files/data.h5ad"] = {"fail": 503, "fail_times": 2}
    f = download(f"{server.url}/files/data.h5ad", dest, **FAST)
    assert f.bytes == SIZE and server.hits("/files/data.h5ad") == 3


def test_persistent_503_is_transient_after_attempts(served):
    server, _, dest = served
    server.faults["/files/data.h5ad"] = {"fail": 503, "fail_times": 99}
    with pytest.raises(TransientFetchError, match="gave up after 4 attempts"):
        download(f"{server.url}/files/data.h5ad", dest, **FAST)


def test_404_is_final_without_retries(served):
    server, _, dest = served
    with pytest.raises(FetchError, match="HTTP 404") as info:
        download(f"{server.url}/files/missing.h5ad", dest, **FAST)
    assert not isinstance(info.value, TransientFetchError) and server.hits("/files/missing.h5ad") == 1


def test_server_announcing_more_than_it_has(served):
    """The short read is retried with Range; the server's Content-Range total settles the size."""
    server, data, dest = served
    server.faults["/files/data.h5ad"] = {"lie_length": 50_000}
    f = download(f"{server.url}/files/data.h5ad", dest, sha256=sha(data), **FAST)
    assert Path(f.path).read_bytes() == data and server.hits("/files/data.h5ad") == 2


def test_server_announcing_less_than_it_has_is_caught_by_the_checksum(served):
    server, data, dest = served
    server.faults["/files/data.h5ad"] = {"lie_length": -1000}
    with pytest.raises(FetchError, match="sha256 mismatch"):
        download(f"{server.url}/files/data.h5ad", dest, sha256=sha(data), **FAST)


def test_size_cap_refuses_announced_and_streamed_excess(served):
    server, _, dest = served
    with pytest.raises(FetchError, match="more than the 1000 reserved"):
        download(f"{server.url}/files/data.h5ad", dest, max_bytes=1000, **FAST)
    server.faults["/files/data.h5ad"] = {"no_length": True}
    with pytest.raises(FetchError, match="more than the 1000 bytes reserved arrived"):
        download(f"{server.url}/files/data.h5ad", dest, max_bytes=1000, **FAST)
    assert not any(dest.iterdir())


def test_checksum_mismatch_deletes_the_file(served):
    server, _, dest = served
    with pytest.raises(FetchError, match="sha256 mismatch"):
        download(f"{server.url}/files/data.h5ad", dest, sha256="0" * 64, **FAST)
    with pytest.raises(FetchError, match="md5 mismatch"):
        download(f"{server.url}/files/data.h5ad", dest, md5="0" * 32, **FAST)
    assert not any(dest.iterdir())


@pytest.mark.parametrize(("raw", "safe"), [("a b.h5", "a_b.h5"), ("../../etc/passwd", "passwd"), ("..%2F..%2Fx", "x"),
                                           ("/abs/file.csv", "file.csv"), ("..", None)])
def test_safe_names(raw, safe):
    if safe is None:
        with pytest.raises(FetchError):
            safe_name(raw)
    else:
        assert safe_name(raw) == safe


def test_geo_layout_and_file_choice():
    assert geo_listing_url("GSE174332", "https://h/geo/") == "https://h/geo/series/GSE174nnn/GSE174332/suppl/"
    assert geo_listing_url("GSE12", "https://h/geo") == "https://h/geo/series/GSEnnn/GSE12/suppl/"
    assert geo_listing_url("GSM5", "https://h/geo") == "https://h/geo/samples/GSMnnn/GSM5/suppl/"
    keep, skip = pick_geo_files(["../", "?C=M", "GSE1_RAW.tar", "GSE1_counts.csv.gz", "GSE1_matrix.mtx.gz",
                                 "GSE1_barcodes.tsv.gz", "GSE1_features.tsv.gz", "img.png", "filelist.txt", "x.h5ad",
                                 "reads.fastq.gz", "notes.docx"])
    # GEO rule 3: the trio is preferred over the table and the h5ad holding the same series' cells
    assert keep == ["GSE1_matrix.mtx.gz", "GSE1_barcodes.tsv.gz", "GSE1_features.tsv.gz"]
    assert skip == ["img.png", "filelist.txt", "reads.fastq.gz", "notes.docx", "GSE1_RAW.tar", "GSE1_counts.csv.gz",
                    "x.h5ad"]


def test_fetch_geo_series_from_a_geo_like_server(tmp_path):
    root = tmp_path / "geo"
    suppl = geo_series_dir(root, "GSE123456")
    suppl.mkdir(parents=True)
    (suppl / "GSE123456_counts.h5ad").write_bytes(b"x" * 1000)
    (suppl / "GSE123456_RAW.tar").write_bytes(b"y" * 5000)
    (suppl / "overview.png").write_bytes(b"z" * 10)
    ds = Dataset("GSE123456", "GSE123456", "geo", 2)
    with GeoServer(root) as server:
        config = DownloadConfig(geo_base_url=server.url, backoff_s=0.01)
        result = fetch_dataset(ds, tmp_path / "raw" / "GSE123456", config=config, max_bytes=10_000)
        assert [f.name for f in result.files] == ["GSE123456_counts.h5ad"] and result.bytes == 1000
        assert set(result.skipped) == {"GSE123456_RAW.tar", "overview.png"}
        assert json.loads((tmp_path / "raw/GSE123456/fetch.json").read_text())["bytes"] == 1000
        with pytest.raises(FetchError, match="no supplementary folder"):
            fetch_dataset(Dataset("GSE9", "GSE9", "geo", 3), tmp_path / "raw" / "GSE9", config=config)


def test_fetch_direct_dataset(served):
    server, data, dest = served
    ds = Dataset("d1", f"{server.url}/files/data.h5ad", "direct", 2, format="h5ad", sha256=sha(data))
    result = fetch_dataset(ds, dest, config=DownloadConfig(backoff_s=0.01))
    assert result.bytes == SIZE and result.source == "direct"


def test_sra_runs_the_configured_tool_without_a_shell(tmp_path):
    tool = tmp_path / "fake-dump"
    tool.write_text("#!/bin/sh\n# writes one file named after its last argument, to prove no shell parsed it\n"
                    'printf reads > "$2/$(basename "$3").fastq"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    ds = Dataset("s1", "SRR123", "sra", 2)
    config = DownloadConfig(sra_command=f"{tool} --outdir {{outdir}} {{accession}}")
    result = fetch_dataset(ds, tmp_path / "raw", config=config)
    assert [f.name for f in result.files] == ["SRR123.fastq.gz"]  # gzipped, as ENA serves reads
    assert gzip.decompress(Path(result.files[0].path).read_bytes()) == b"reads"
    missing = DownloadConfig(sra_command="definitely-not-installed-dump {accession}", sra_resolver="sra-tools")
    with pytest.raises(FetchError, match="needs 'definitely-not-installed-dump', which is not installed"):
        fetch_dataset(ds, tmp_path / "raw2", config=missing)


def test_server_module_refuses_a_busy_port(tmp_path):
    with GeoServer(tmp_path) as server:
        result = subprocess.run([sys.executable, "-m", "atlasflow_testing.geo_server", "--root", str(tmp_path),
                                 "--port", str(server.port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot listen" in result.stderr


# ---- resume safety: never splice two files, never give up on a transfer that keeps moving --------


def test_a_file_changed_on_the_server_is_not_spliced_on_resume(served):
    server, data, dest = served
    # the host drops the transfer after 100 kB, then goes down: the task gives up holding the part
    server.faults["/files/data.h5ad"] = {"drop_after": 100_000, "drop_times": 1, "fail": 503, "fail_from": 2}
    with pytest.raises(TransientFetchError, match="2 in a row without progress"):
        download(f"{server.url}/files/data.h5ad", dest, attempts=2, backoff_s=0.01, timeout_s=10)
    assert (dest / "data.h5ad.part").stat().st_size == 100_000
    newer = os.urandom(SIZE + 5000)  # the submitter replaced the file; no checksum in the manifest
    (dest.parent / "www" / "files" / "data.h5ad").write_bytes(newer)
    server.faults.clear()
    f = download(f"{server.url}/files/data.h5ad", dest, **FAST)
    assert Path(f.path).read_bytes() == newer  # If-Range made the server send the whole new file
    assert sorted(p.name for p in dest.iterdir()) == ["data.h5ad", "data.h5ad.done.json"]


def test_a_part_left_by_another_url_is_discarded(served):
    server, data, dest = served
    other = os.urandom(SIZE)
    (dest.parent / "www" / "files" / "v2").mkdir()
    (dest.parent / "www" / "files" / "v2" / "data.h5ad").write_bytes(other)
    # the host drops the transfer after 100 kB, then goes down: the task gives up holding the part
    server.faults["/files/data.h5ad"] = {"drop_after": 100_000, "drop_times": 1, "fail": 503, "fail_from": 2}
    with pytest.raises(TransientFetchError, match="2 in a row without progress"):
        download(f"{server.url}/files/data.h5ad", dest, attempts=2, backoff_s=0.01, timeout_s=10)
    # the manifest row now points at another URL with the same file name
    server.faults.clear()
    f = download(f"{server.url}/files/v2/data.h5ad", dest, **FAST)
    assert Path(f.path).read_bytes() == other and f.resumed_from == 0
    # and a finished file from the first URL is not taken for the second
    g = download(f"{server.url}/files/data.h5ad", dest, **FAST)
    assert Path(g.path).read_bytes() == data


def test_a_transfer_that_keeps_progressing_is_not_given_up(served):
    server, data, dest = served
    # every response is cut after 40 kB: 8 attempts to finish, more than the 4 allowed in a row
    server.faults["/files/data.h5ad"] = {"drop_after": 40_000, "drop_times": 99}
    f = download(f"{server.url}/files/data.h5ad", dest, sha256=sha(data), **FAST)
    assert Path(f.path).read_bytes() == data and server.hits("/files/data.h5ad") == 8


def test_a_held_transfer_trickles_until_its_path_exists(served):
    import threading
    import time

    server, data, dest = served
    gate = dest.parent / "gate"
    # the hold outlasts the 1 s read timeout: trickling one byte every 0.2 s keeps the client reading
    server.faults["/files/data.h5ad"] = {"hold_until": str(gate), "hold_bytes": 100, "hold_every_s": 0.2}
    opened = threading.Timer(2.5, gate.touch)
    opened.start()
    t0 = time.monotonic()
    f = download(f"{server.url}/files/data.h5ad", dest, sha256=sha(data), **{**FAST, "timeout_s": 1})
    opened.join()
    assert Path(f.path).read_bytes() == data
    assert time.monotonic() - t0 >= 2.5
    while not server.transfers():  # the server logs a transfer just after its last byte has gone
        time.sleep(0.05)
    (transfer,) = server.transfers()  # one transfer, never retried, that lasted until the gate opened
    assert transfer["bytes"] == SIZE and transfer["end"] - transfer["start"] >= 2.4
