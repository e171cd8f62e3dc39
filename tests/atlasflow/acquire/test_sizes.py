"""Download sizes asked of the sources before admission: HEAD / ranged GET, GEO listings and filelist.txt,
ENA's fastq_bytes; cached in state/sizes.json; untrusted answers leave the size unknown, never crash."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from atlasflow.acquire.sizes import MAX_BYTES, dataset_size, known_sizes, probe_dataset, record_arrival
from atlasflow.core.config import AtlasConfig, load_config
from atlasflow.intake.manifest import Dataset
from atlasflow_testing.geo_server import GeoServer, geo_series_dir
from atlasflow_testing.reads import publish_ena

FILELIST = """#Archive/File\tName\tTime\tSize\tType
Archive\tGSE9_RAW.tar\t01/02/2020 10:00:00\t5000000\tTAR
File\tGSM1_matrix.mtx.gz\t01/02/2020 10:00:00\t1000000\tMTX
File\tGSM1_barcodes.tsv.gz\t01/02/2020 10:00:00\t1000\tTSV
File\tGSM1_features.tsv.gz\t01/02/2020 10:00:00\t2000\tTSV
File\tGSM5_tsne.png\t01/02/2020 10:00:00\t10\tPNG
"""


def config_for(tmp_path, url: str, **over) -> AtlasConfig:
    return load_config(overrides={"storage.base_dir": str(tmp_path / "base"), "download.geo_base_url": url,
                                  "download.ena_base_url": f"{url}/ena/portal/api", "download.ena_fastq_base_url": url,
                                  "download.size_probe_timeout_s": 2, "storage.unknown_size_gb": 7, **over})


def direct(url: str, name: str = "d") -> Dataset:
    return Dataset(name, url, "direct", 2, format="h5ad")


@pytest.fixture
def www(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.h5ad").write_bytes(b"x" * 12345)
    (root / "b.h5ad").write_bytes(b"y" * 999)
    return root


def test_direct_sizes_come_from_head_or_a_ranged_get(www, tmp_path):
    faults = {"/b.h5ad": {"fail": 405, "fail_times": 1}}  # a server without HEAD: the first request fails
    with GeoServer(www, faults=faults) as server:
        cfg = config_for(tmp_path, server.url).download
        a = probe_dataset(direct(f"{server.url}/a.h5ad"), cfg)
        b = probe_dataset(direct(f"{server.url}/b.h5ad"), cfg)
        assert (a.bytes, a.source, a.error) == (12345, "head", None)
        assert (b.bytes, b.source) == (999, "range")
        assert server.hits("/b.h5ad") == 2
        missing = probe_dataset(direct(f"{server.url}/nope.h5ad"), cfg)
        assert missing.bytes is None and "HTTP 404" in missing.error
    with GeoServer(www, faults={"/a.h5ad": {"no_length": True}}) as server:
        a = probe_dataset(direct(f"{server.url}/a.h5ad"), config_for(tmp_path, server.url).download)
        assert (a.bytes, a.source) == (12345, "range")  # HEAD named no length: Content-Range did


class _Liar(BaseHTTPRequestHandler):
    """Answers every request with a length no dataset has, and a Content-Range that is not one."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_HEAD(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(MAX_BYTES * 10))
        self.end_headers()

    def do_GET(self):  # noqa: N802
        self.send_response(206)
        self.send_header("Content-Range", "bytes 0-0/-12; rm -rf")
        self.send_header("Content-Length", "1")
        self.end_headers()
        self.wfile.write(b"x")


def test_untrusted_answers_leave_the_size_unknown(tmp_path):
    liar = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    try:
        cfg = config_for(tmp_path, "http://127.0.0.1:1", **{"download.size_probe_timeout_s": 0.5}).download
        lie = probe_dataset(direct(f"http://127.0.0.1:{liar.server_port}/x.h5ad"), cfg)
        assert lie.bytes is None and "named no total size" in lie.error
        t0 = time.monotonic()
        hang = probe_dataset(direct(f"http://127.0.0.1:{silent.getsockname()[1]}/x.h5ad"), cfg)
        assert hang.bytes is None and "timed out" in hang.error and time.monotonic() - t0 < 5
        # nothing listens on port 1; an ftp URL is not asked at all
        assert probe_dataset(direct("http://127.0.0.1:1/x.h5ad"), cfg).bytes is None
        assert "not asked" in probe_dataset(direct("ftp://h.org/x.h5ad"), cfg).error
    finally:
        liar.shutdown()
        silent.close()


def test_geo_sizes_use_filelist_members_and_heads_of_plain_files(tmp_path):
    www = tmp_path / "www"
    series = geo_series_dir(www, "GSE9")
    series.mkdir(parents=True)
    (series / "GSE9_RAW.tar").write_bytes(b"t" * 100)  # its real size does not matter: members are counted
    (series / "filelist.txt").write_text(FILELIST)
    plain = geo_series_dir(www, "GSE10")
    plain.mkdir(parents=True)
    (plain / "GSE10_counts.h5ad").write_bytes(b"h" * 4321)
    (plain / "GSE10_tsne.png").write_bytes(b"p" * 100)
    with GeoServer(www) as server:
        cfg = config_for(tmp_path, server.url).download
        tar = probe_dataset(Dataset("g9", "GSE9", "geo", 2), cfg)
        assert (tar.bytes, tar.source) == (1_000_000 + 1000 + 2000, "geo")  # the trio, never the tar or the png
        h5 = probe_dataset(Dataset("g10", "GSE10", "geo", 3), cfg)
        assert (h5.bytes, h5.source) == (4321, "geo")
        assert server.hits("/" + str((plain / "GSE10_tsne.png").relative_to(www))) == 0
        assert probe_dataset(Dataset("g11", "GSE11", "geo", 4), cfg).bytes is None  # no such folder


def test_ena_fastq_bytes_size_reads_rows(tmp_path):
    fq = tmp_path / "r.fastq.gz"
    fq.write_bytes(b"q" * 777)
    publish_ena(tmp_path / "www", "SRR5550000", [fq, fq])
    with GeoServer(tmp_path / "www") as server:
        found = probe_dataset(Dataset("s", "SRR5550000", "sra", 2), config_for(tmp_path, server.url).download)
        assert (found.bytes, found.source) == (2 * 777, "ena")
        assert server.hits("/vol1/fastq/SRR5550000/SRR5550000_1.fastq.gz") == 0  # the listing's sizes only


def test_sizes_are_cached_by_row_and_fingerprint(www, tmp_path):
    with GeoServer(www) as server:
        config = config_for(tmp_path, server.url)
        rows = [direct(f"{server.url}/a.h5ad", "a"), Dataset("m", f"{server.url}/b.h5ad", "direct", 3,
                                                                  format="h5ad", expected_bytes=5)]
        assert known_sizes(config, rows, probe=False) == {}  # nothing asked yet, no network
        first = known_sizes(config, rows, probe=True)
        assert list(first) == ["a"] and first["a"].bytes == 12345  # the manifest's expected_bytes wins
        assert server.hits("/a.h5ad") == 1 and server.hits("/b.h5ad") == 0
        assert known_sizes(config, rows, probe=True)["a"].bytes == 12345 and server.hits("/a.h5ad") == 1
        saved = json.loads((config.state_dir / "sizes.json").read_text())
        assert saved["a"]["bytes"] == 12345 and saved["a"]["fingerprint"] == rows[0].fingerprint()
        # the row now names another file: asked again
        moved = direct(f"{server.url}/b.h5ad", "a")
        assert known_sizes(config, [moved], probe=True)["a"].bytes == 999
        assert dataset_size(config, moved) == (999, "head") and dataset_size(config, rows[1]) == (5, "manifest")
        assert dataset_size(config, direct("http://x.org/y.h5ad", "z")) == (7 * 10**9, "default")
        off = config_for(tmp_path / "off", server.url, **{"download.size_probe": False})
        assert known_sizes(off, [rows[0]], probe=True) == {}
        # what arrived is compared and kept for the next plan
        check = record_arrival(config, moved, 1200)
        assert check == {"expected": 999, "source": "head", "arrived": 1200, "ratio": round(1200 / 999, 4)}
        assert json.loads((config.state_dir / "sizes.json").read_text())["a"]["arrived"] == 1200


def test_cellxgene_rows_take_the_curation_apis_filesize(tmp_path):
    from atlasflow_testing.cellxgene_server import CellxgeneServer, PublishedDataset

    root = tmp_path / "cxg"
    (root / "assets").mkdir(parents=True)
    (root / "assets" / "x.h5ad").write_bytes(b"c" * 5555)
    d = PublishedDataset(root / "assets" / "x.h5ad", cell_count=1)
    with CellxgeneServer(root) as server:
        server.publish("0" * 8 + "-0000-4000-8000-" + "0" * 12, [d])
        cfg = config_for(tmp_path, "http://127.0.0.1:1", **{"download.cellxgene_api_url": server.api_url}).download
        found = probe_dataset(Dataset("c", d.dataset_id, "cellxgene", 2), cfg)
        assert (found.bytes, found.source) == (5555, "cellxgene")
        assert probe_dataset(Dataset("u", "1" * 8 + "-1111-4111-8111-" + "1" * 12, "cellxgene", 3), cfg).bytes is None


class _Redirector(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_HEAD(self):  # noqa: N802
        self.send_response(302)
        self.send_header("Location", "http://internal.example/secret.h5ad")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD


def test_redirects_follow_the_download_policy_and_urls_are_redacted(tmp_path):
    hop = ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=hop.serve_forever, daemon=True).start()
    try:
        cfg = config_for(tmp_path, "http://127.0.0.1:1").download
        found = probe_dataset(direct(f"http://127.0.0.1:{hop.server_port}/x.h5ad?token=s3cret"), cfg)
        assert found.bytes is None and "download.redirect_hosts does not allow" in found.error
        assert "s3cret" not in found.error
    finally:
        hop.shutdown()
