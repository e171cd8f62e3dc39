"""Resolving sra rows to FASTQ files: ENA's filereport (served locally) and sra-tools (a fake on PATH)."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from pathlib import Path

import pytest

from atlasflow.acquire.fetch import FetchError, fetch_dataset
from atlasflow.acquire.reads import ena_filereport_url, ena_files, resolver_for
from atlasflow.core.config import DownloadConfig
from atlasflow.intake.manifest import Dataset
from atlasflow_testing.geo_server import GeoServer
from atlasflow_testing.reads import ENA_HOST, publish_ena


@pytest.fixture
def ena(tmp_path):
    www = tmp_path / "www"
    reads = []
    for i in (1, 2):
        f = tmp_path / f"src_{i}.fastq.gz"
        f.write_bytes(gzip.compress(os.urandom(2000)))
        reads.append(f)
    api = publish_ena(www, "SRR1234567", reads)
    with GeoServer(www) as server:
        config = DownloadConfig(sra_resolver="ena", ena_base_url=server.url + api, ena_fastq_base_url=server.url,
                                backoff_s=0.01)
        yield server, config, reads, www


def test_filereport_lists_the_runs_fastq_with_sizes_and_md5(ena):
    server, config, reads, _ = ena
    files = ena_files("SRR1234567", config)
    assert [f.url for f in files] == [f"{server.url}/vol1/fastq/SRR1234567/SRR1234567_{i}.fastq.gz" for i in (1, 2)]
    assert [f.bytes for f in files] == [r.stat().st_size for r in reads]
    assert files[0].md5 == hashlib.md5(reads[0].read_bytes()).hexdigest()
    assert "accession=SRR1234567&result=read_run&fields=run_accession%2Cfastq_ftp" in ena_filereport_url(
        "SRR1234567", "https://www.ebi.ac.uk/ena/portal/api")
    # without a mirror the links are fetched over https from the host ENA names
    plain = ena_files("SRR1234567", DownloadConfig(ena_base_url=config.ena_base_url))
    assert plain[0].url == f"https://{ENA_HOST}/vol1/fastq/SRR1234567/SRR1234567_1.fastq.gz"


def test_sra_row_fetched_through_ena(ena, tmp_path):
    server, config, reads, _ = ena
    ds = Dataset("s", "SRR1234567", "sra", 2, technology="10xv3")
    result = fetch_dataset(ds, tmp_path / "raw", config=config)
    assert result.source == "ena" and [f.name for f in result.files] == ["SRR1234567_1.fastq.gz", "SRR1234567_2.fastq.gz"]
    assert [Path(f.path).read_bytes() for f in result.files] == [r.read_bytes() for r in reads]


def test_ena_md5_mismatch_and_reservation_are_enforced(ena, tmp_path):
    server, config, reads, www = ena
    ds = Dataset("s", "SRR1234567", "sra", 2, technology="10xv3")
    with pytest.raises(FetchError, match="more than the 100 reserved"):
        fetch_dataset(ds, tmp_path / "a", config=config, max_bytes=100)
    (www / "vol1" / "fastq" / "SRR1234567" / "SRR1234567_2.fastq.gz").write_bytes(b"corrupted on the mirror")
    with pytest.raises(FetchError, match="md5 mismatch"):
        fetch_dataset(ds, tmp_path / "b", config=config)


def test_unknown_accession_and_runs_without_fastq(ena):
    server, config, _, www = ena
    with pytest.raises(FetchError, match="ENA has no runs for SRR9 \\(HTTP 404"):
        ena_files("SRR9", config)
    (www / "ena/portal/api/filereport" / "SRR7.tsv").write_text("run_accession\tfastq_ftp\tfastq_bytes\tfastq_md5\n"
                                                                "SRR7\t\t\t\n")
    with pytest.raises(FetchError, match="ENA lists no FASTQ files for SRR7 \\(runs: SRR7\\)"):
        ena_files("SRR7", config)
    with pytest.raises(FetchError, match="not an SRA/ENA accession"):
        ena_files("SRR1; rm -rf /", config)


def test_direct_fastq_urls_are_each_downloaded(ena, tmp_path):
    server, config, reads, _ = ena
    base = f"{server.url}/vol1/fastq/SRR1234567"
    ds = Dataset("d", f"{base}/SRR1234567_1.fastq.gz;{base}/SRR1234567_2.fastq.gz", "direct", 2, format="fastq",
                 technology="10xv3")
    result = fetch_dataset(ds, tmp_path / "raw", config=config)
    assert result.source == "direct" and len(result.files) == 2


def _fake(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_sra_tools_prefetch_then_dump_without_a_shell(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.log"
    # prefetch writes <outdir>/<acc>/<acc>.sra; fasterq-dump gets that folder and writes two FASTQs
    _fake(bin_dir / "prefetch", f'echo "prefetch $*" >> {log}\nmkdir -p "$3/$4" && echo sra > "$3/$4/$4.sra"\n')
    _fake(bin_dir / "fasterq-dump", f'echo "dump $*" >> {log}\nn=$(basename "$4")\n'
                                    'printf "@r\\nACGT\\n+\\nIIII\\n" > "$3/${n}_1.fastq"\n'
                                    'printf "@r\\nACGT\\n+\\nIIII\\n" > "$3/${n}_2.fastq"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = DownloadConfig(sra_command="fasterq-dump --split-files --outdir {outdir} {accession}",
                            sra_prefetch_command="prefetch --max-size --output-directory {outdir} {accession}")
    assert resolver_for(config) == "sra-tools"
    ds = Dataset("s", "SRR42", "sra", 2, technology="10xv3")
    result = fetch_dataset(ds, tmp_path / "raw", config=config)
    assert result.source == "sra-tools"
    assert [f.name for f in result.files] == ["SRR42_1.fastq.gz", "SRR42_2.fastq.gz"]  # gzipped
    lines = log.read_text().splitlines()
    assert lines[0] == f"prefetch --max-size --output-directory {tmp_path}/raw/sra SRR42"
    assert lines[1] == f"dump --split-files --outdir {tmp_path}/raw {tmp_path}/raw/sra/SRR42"
    assert not (tmp_path / "raw" / "sra").exists()  # the .sra copy is gone once dumped
    assert resolver_for(DownloadConfig(sra_command="no-such-dump {accession}")) == "ena"
