"""The bad-input corpus (issue 16): every hostile or broken input, and the outcome it must get.

Each row builds one download folder and names the outcome: ``ok`` (processed) or a refusal whose
message must name the file and the reason. Whatever the outcome: nothing is written outside the
dataset's own folders (a sentinel tree beside them is compared before and after), no temporary
(``*.partial`` / ``*.tmp``) is left behind, and a refusal never deletes the download it read (the
process step's own cleanup policy decides that, never a reader). Inputs that fail earlier than
processing (manifest, download, FASTQ) have their own tables below.

Further cases, tested where their mechanism lives: a kill mid-extraction
(tests/atlasflow/readers/test_extract.py), Retry-After / resume / redirects / tokens
(tests/atlasflow/acquire/test_http_hardening.py), kb count outliving its task
(tests/atlasflow/acquire/test_quant_kill.py), half-deleted checkpoints (tests/atlasflow/model/test_train.py).
"""

from __future__ import annotations

import gzip
import io
import os
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from atlasflow.core.config import load_config
from atlasflow.intake.manifest import Dataset, ManifestError, read_manifest
from atlasflow.prep.genes import Vocabulary
from atlasflow.prep.process import DatasetQuarantined, process_dataset
from atlasflow_testing.realdata import pbmc_counts, write_format

CONFIG = load_config(overrides={"qc.min_genes": 10, "qc.min_cells": 3, "qc.max_pct_mito": 20})
VOCAB = Vocabulary.builtin("pbmc68k")
CAP = 20 * 10**6  # the dataset's reservation in these cases: what an archive may extract to disk
# a gzipped table is bounded in memory by config.readers (default: 200x its size, at most 10 GB)
RATIO = r"from a [0-9]+-byte file, more than 200x its size \(readers\.max_expansion_ratio\); refused"
BOMB = 32 * 2**20


@pytest.fixture(scope="module")
def pbmc():
    return pbmc_counts()[:120].copy()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _zeros_tar(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for i in range(8):
            info = tarfile.TarInfo(f"filtered_feature_bc_matrix/part{i}.bin")
            info.size = BOMB // 8
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    return path


def _dead_owner_partial(raw: Path, pbmc) -> None:
    """A good 10x archive, and the half extraction a killed earlier try left in the cache."""
    archive = write_format(pbmc, "10x_mtx_tar", raw)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = raw.parent / "cache" / "ds" / f"{archive.name}.extracted.{proc.pid}@{socket.gethostname()}.partial"
    (stale / "filtered_feature_bc_matrix").mkdir(parents=True)
    (stale / "filtered_feature_bc_matrix" / "matrix.mtx.gz").write_bytes(b"\x1f\x8b half")


# id -> (build the raw folder, expected outcome: "ok" or a regex the refusal must match)
CASES: dict[str, tuple[Callable[[Path, object], None], str]] = {
    "empty file": (lambda raw, _: (raw / "x.h5ad").write_bytes(b""), r"x\.h5ad: the file is empty"),
    "unknown binary": (lambda raw, _: (raw / "blob.bin").write_bytes(b"\x00\x01binary"), r"blob\.bin: unknown format"),
    "RData workspace": (lambda raw, _: (raw / "w.RData").write_bytes(b"RDX3\n"), r"w\.RData: RData workspaces are not read"),
    "damaged HDF5": (lambda raw, _: (raw / "d.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4000)),
                     r"d\.h5ad: damaged HDF5 file|d\.h5ad: an HDF5 file that is neither"),
    "truncated h5ad": (lambda raw, pbmc: (lambda p: p.write_bytes(p.read_bytes()[:20_000]))(
        write_format(pbmc, "h5ad", raw)), r"data\.h5ad: (damaged HDF5|cannot read h5ad)"),
    "CSV with text in counts": (lambda raw, _: (raw / "t.csv").write_text("gene,c1,c2\nCD3E,1,x\nMS4A1,2,3\n"),
                                r"t\.csv: non-numeric values, e\.g\. 'x' in column 'c2'"),
    "CSV header only": (lambda raw, _: (raw / "h.csv").write_text("gene,c1,c2\n"), r"h\.csv: no data rows"),
    "tar member '..'": (lambda raw, _: _tar(raw / "e.tar.gz", [(_member("../../outside.txt"), b"x")]),
                        r"e\.tar\.gz: refusing member '\.\./\.\./outside\.txt' \(absolute path or '\.\.'\)"),
    "tar absolute member": (lambda raw, _: _tar(raw / "a.tar.gz", [(_member("/tmp/abs.txt"), b"x")]),
                            r"a\.tar\.gz: refusing member '/tmp/abs\.txt'"),
    "tar symlink": (lambda raw, _: _tar(raw / "s.tar.gz", [(_member("m", tarfile.SYMTYPE, "/etc/passwd"), None)]),
                    r"s\.tar\.gz: refusing member 'm' \(links and devices are not extracted\)"),
    "tar hard link": (lambda raw, _: _tar(raw / "l.tar.gz", [(_member("m", tarfile.LNKTYPE, "/etc/passwd"), None)]),
                      r"l\.tar\.gz: refusing member 'm' \(links and devices"),
    "tar device": (lambda raw, _: _tar(raw / "v.tar.gz", [(_member("m", tarfile.CHRTYPE), None)]),
                   r"v\.tar\.gz: refusing member 'm' \(links and devices"),
    "tar bomb": (lambda raw, _: _zeros_tar(raw / "bomb.tar.gz"),
                 rf"bomb\.tar\.gz: extracting it needs over [0-9]+ bytes .* more than the {CAP} bytes .* stopped after"),
    "truncated tar.gz": (lambda raw, pbmc: (lambda p: p.write_bytes(p.read_bytes()[:-300]))(
        write_format(pbmc, "10x_mtx_tar", raw)), r"data\.tar\.gz: not a readable tar archive"),
    "10x archive without barcodes": (lambda raw, _: _tar(raw / "n.tar.gz", [
        (_member("f/matrix.mtx"), b"%%MatrixMarket matrix coordinate integer general\n1 1 1\n1 1 1\n"),
        (_member("f/features.tsv"), b"G1\tCD3E\n")]), r"n\.tar\.gz: 10x Matrix Market input lacks barcodes\.tsv"),
    "gzipped CSV bomb": (lambda raw, _: (raw / "b.csv.gz").write_bytes(gzip.compress(b"g,c\n" + b"0" * BOMB)),
                         r"b\.csv\.gz: decompresses to over [0-9]+ bytes .*" + RATIO),
    "gzipped Matrix Market bomb": (lambda raw, _: [
        (raw / "matrix.mtx.gz").write_bytes(gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n%"
                                                          + b" " * BOMB)),
        (raw / "barcodes.tsv.gz").write_bytes(gzip.compress(b"c1\n")),
        (raw / "features.tsv.gz").write_bytes(gzip.compress(b"G1\tCD3E\n"))],
        r"matrix\.mtx\.gz: decompresses to over [0-9]+ bytes .*" + RATIO),
    "RDS bomb": (lambda raw, _: (raw / "r.rds").write_bytes(gzip.compress(b"X\n" + bytes(BOMB))),
                 r"r\.rds: decompresses to over [0-9]+ bytes .*" + RATIO),
    "RDS cut short": (lambda raw, _: (raw / "c.rds").write_bytes(gzip.compress(b"X\n" + os.urandom(5000))[:-40]),
                      r"c\.rds: not a readable RDS file"),
    "RDS in bzip2": (lambda raw, _: (raw / "z.rds").write_bytes(b"BZh91AY&SY"), r"z\.rds: an RDS file compressed with bzip2"),
    "half extraction left by a killed try": (_dead_owner_partial, "ok"),
    "good 10x archive": (lambda raw, pbmc: write_format(pbmc, "10x_mtx_tar", raw), "ok"),
}


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_outcome(pbmc, tmp_path, case):
    build, expected = CASES[case]
    work = tmp_path / "work"
    raw = work / "raw"
    raw.mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep.txt").write_text("untouched")
    build(raw, pbmc)
    downloads = _snapshot(raw)
    before = _snapshot(outside)
    try:
        summary = process_dataset(raw, Dataset("ds", "https://h/x", "direct", 2), config=CONFIG,
                                  out_path=work / "processed" / "ds.h5ad", vocab=VOCAB, cache_dir=work / "cache",
                                  max_bytes=CAP)
    except DatasetQuarantined as exc:
        assert expected != "ok", f"{case}: refused: {exc}"
        import re

        assert re.search(expected, str(exc)), f"{case}: {exc}"
        assert not (work / "processed" / "ds.h5ad").exists()
    else:
        assert expected == "ok", f"{case}: processed, but {expected!r} was expected"
        assert summary["cells_after"] > 0
    assert _snapshot(outside) == before, f"{case}: wrote outside its folders"
    assert not [p for p in tmp_path.rglob("*") if p.parent == tmp_path and p.name not in ("work", "outside")]
    assert {k: v for k, v in _snapshot(raw).items() if k in downloads} == downloads, f"{case}: a download changed"
    leftovers = [p for p in work.rglob("*") if p.name.endswith((".partial", ".tmp"))
                 and f"{os.getpid()}@" in p.name]
    assert not leftovers, f"{case}: temporaries left: {leftovers}"


# ---- refused at the manifest ------------------------------------------------------------------------------------

MANIFEST_CASES = {
    "Unicode digits in a GEO accession": (["ds", "GSE١٢٣", "geo", "", ""], "download_url", r"'GSE١٢٣' is not a GEO"),
    "Unicode digits in an SRA accession": (["ds", "SRR٤٥٦", "sra", "", ""], "download_url", r"'SRR٤٥٦' is not an SRA"),
    "shell in a dataset id": (["ds;rm -rf", "https://h.org/x.h5ad", "direct", "", ""], "dataset_id", r"not a valid id"),
    "file URL without an allowed root": (["ds", "file:///etc/passwd", "direct", "", ""], "download_url",
                                         r"file:// URLs are refused"),
    "javascript URL": (["ds", "javascript:alert(1)", "direct", "h5ad", ""], "download_url", r"scheme 'javascript'"),
    "control character": (["ds", "https://h.org/x\x07.h5ad", "direct", "", ""], "download_url", r"control characters"),
    "Unicode digits in a size": (["ds", "https://h.org/x.h5ad", "direct", "", "١٠ MB"], "expected_bytes",
                                 r"is not a byte count"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_manifest_rows_are_refused_with_row_and_column(tmp_path, case):
    import csv

    row, column, reason = MANIFEST_CASES[case]
    path = tmp_path / "m.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["dataset_id", "download_url", "type", "format", "expected_bytes"], row])
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    problems = [p for p in info.value.problems if p.column == column]
    assert problems and problems[0].row == 2, info.value.problems
    import re

    assert re.search(reason, problems[0].reason), problems[0].reason


# ---- refused as reads ---------------------------------------------------------------------------------------------

FASTQ_CASES = {
    "gzip bomb of one endless line": (gzip.compress(b"@r1\n" + b"A" * (48 * 2**20)), r"a line longer than"),
    "cut gzip stream": (gzip.compress(b"@r1\nACGT\n+\nIIII\n" * 1000)[:-12], r"truncated|damaged"),
    "not FASTQ": (gzip.compress(b">fasta\nACGT\n"), r"not FASTQ"),
    "record cut short": (gzip.compress(b"@r1\nACGT\n+\nIIII\n@r2\nACGT\n"), r"not a whole number of 4-line"),
}


@pytest.mark.parametrize("case", list(FASTQ_CASES))
def test_bad_fastq_is_refused_naming_the_file(tmp_path, case):
    from atlasflow.acquire.quant import QuantError, check_fastq

    data, reason = FASTQ_CASES[case]
    path = tmp_path / "s_R1.fastq.gz"
    path.write_bytes(data)
    with pytest.raises(QuantError, match=rf"s_R1\.fastq\.gz: .*({reason})"):
        check_fastq(path)
    assert path.read_bytes() == data  # the check never touches the download
