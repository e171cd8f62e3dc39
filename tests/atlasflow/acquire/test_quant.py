"""kb count on simulated 10x v3 reads with a known answer, and the bad inputs it must refuse.

The simulated reads are error-free, the genes share no k-mer (random sequence) and UMIs are
distinct within a cell, so a correct pseudoalignment + barcode correction + UMI collapse gives
exactly the simulated matrix: the test demands equality, not a tolerance.
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest

from atlasflow.acquire.quant import QuantError, check_fastq, order_reads, quantified, quantify
from atlasflow.core.config import QuantConfig
from atlasflow.readers.formats import read_counts
from atlasflow_testing.reads import simulate_10x, write_fastq


def qconfig(kb, **kw) -> QuantConfig:
    return QuantConfig(index=kb["index"], t2g=kb["t2g"], onlist=kb["onlist"], threads=1, **kw)


@pytest.mark.slow


def test_kb_count_recovers_the_simulated_umi_matrix_exactly(kb_reference, tmp_path):
    kb = kb_reference
    run = simulate_10x(kb["ref"], tmp_path / "raw", n_cells=10, whitelist=kb["barcodes"], seed=3)
    assert 300 <= run.n_reads <= 1200 and run.n_reads > run.truth.sum()  # PCR duplicates to collapse
    summary = quantify(tmp_path / "raw", technology="10xv3", config=qconfig(kb), work_dir=tmp_path / "work")
    assert summary["reads_processed"] == run.n_reads and summary["reads_pseudoaligned"] == run.n_reads
    assert not (tmp_path / "work").exists()  # BUS files and kb's on-list copy are gone

    adata = read_counts(tmp_path / "raw" / "counts")  # the normal 10x Matrix Market reader
    assert adata.uns["atlasflow_read"]["format"] == "10x_mtx"
    barcodes = [b.split("-")[0] for b in adata.obs_names]
    assert sorted(barcodes) == sorted(run.barcodes)  # on-listed decoys without reads are not cells
    got = adata.X.toarray()[[barcodes.index(b) for b in run.barcodes]]
    got = got[:, [list(adata.var["gene_id"]).index(g) for g in kb["ref"].gene_ids]]
    np.testing.assert_array_equal(got, run.truth)
    assert list(adata.var_names) == list(kb["ref"].gene_names)
    # a re-run finds the marker and does not quantify again
    assert quantified(tmp_path / "raw")["seconds"] == summary["seconds"]


def test_truncated_fastq_gz_is_refused_before_kallisto_sees_it(kb_reference, tmp_path):
    kb = kb_reference
    run = simulate_10x(kb["ref"], tmp_path / "raw", n_cells=4, whitelist=kb["barcodes"])
    data = run.r2.read_bytes()
    run.r2.write_bytes(data[: len(data) // 2])  # an interrupted copy
    t0 = time.monotonic()
    with pytest.raises(QuantError, match=r"sample_R2.fastq.gz: the gzip stream is truncated"):
        quantify(tmp_path / "raw", technology="10xv3", config=qconfig(kb), work_dir=tmp_path / "work")
    assert time.monotonic() - t0 < 5 and not (tmp_path / "raw" / "counts").exists()


def test_uncompressed_fastq_cut_mid_record_is_refused(tmp_path):
    path = write_fastq(tmp_path / "x_R1.fastq", [("r1", "ACGT" * 7), ("r2", "ACGT" * 7)], compress=False)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-2]))
    with pytest.raises(QuantError, match="6 lines, not a whole number of 4-line FASTQ records"):
        check_fastq(path)


def test_multi_member_gzip_is_read_whole(tmp_path):
    # bgzip / `cat a.gz b.gz` files are several gzip members back to back: valid, not truncated
    one = gzip.compress(b"@r1\nACGT\n+\nIIII\n")
    (tmp_path / "m_R1.fastq.gz").write_bytes(one + one)
    assert check_fastq(tmp_path / "m_R1.fastq.gz").reads == 2


def test_reads_that_do_not_fit_the_chemistry_are_refused(kb_reference, tmp_path):
    kb = kb_reference
    # 20 bp barcode reads: too short for 10x v3's 16 bp barcode + 12 bp UMI
    simulate_10x(kb["ref"], tmp_path / "raw", n_cells=4, whitelist=kb["barcodes"], r1_length=20)
    with pytest.raises(QuantError, match=r"sample_R1.fastq.gz: reads of 20 bp, shorter than the 28 bp barcode\+UMI "
                                         r"of 10xv3"):
        quantify(tmp_path / "raw", technology="10xv3", config=qconfig(kb), work_dir=tmp_path / "work")
    # the same 28 bp reads are fine for 10x v2 (26 bp), so the check is the chemistry's, not a constant
    simulate_10x(kb["ref"], tmp_path / "raw2", n_cells=4, whitelist=kb["barcodes"], r1_length=28)
    order = order_reads(sorted((tmp_path / "raw2").iterdir()), "10xv2")
    assert [p.name for p in order] == ["sample_R1.fastq.gz", "sample_R2.fastq.gz"]


def test_a_missing_index_names_the_key_and_the_command(kb_reference, tmp_path):
    kb = kb_reference
    simulate_10x(kb["ref"], tmp_path / "raw", n_cells=2, whitelist=kb["barcodes"])
    config = QuantConfig(index=str(tmp_path / "nope.idx"), t2g=kb["t2g"])
    with pytest.raises(QuantError, match=r"quant.index .*nope.idx does not exist; build it with `atlasflow quant ref"):
        quantify(tmp_path / "raw", technology="10xv3", config=config, work_dir=tmp_path / "work")
    with pytest.raises(QuantError, match="quant.index is not configured"):
        quantify(tmp_path / "raw", technology="10xv3", config=QuantConfig(), work_dir=tmp_path / "work")


def test_a_quantification_over_its_time_limit_is_stopped_with_its_children(kb_reference, tmp_path):
    kb = kb_reference
    simulate_10x(kb["ref"], tmp_path / "raw", n_cells=4, whitelist=kb["barcodes"])
    t0 = time.monotonic()
    with pytest.raises(QuantError, match=r"did not finish within 1 s \(quant.timeout_s\); its processes were stopped"):
        quantify(tmp_path / "raw", technology="10xv3", config=qconfig(kb, timeout_s=1), work_dir=tmp_path / "work")
    assert time.monotonic() - t0 < 30
    # nothing of kb's process group is left running
    mine = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    leftovers = []
    for p in mine:
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if str(tmp_path).encode() in cmd and int(p.name) != os.getpid():
            leftovers.append(cmd[:200])
    assert leftovers == []


def test_unpaired_files_for_a_paired_chemistry_are_refused(tmp_path):
    for name in ("a_R1.fastq.gz", "b_R2.fastq.gz"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(QuantError, match="needs read 1 .* and read 2"):
        order_reads(sorted(tmp_path.iterdir()), "10xv3")


@pytest.mark.parametrize(("layout", "expected"), [
    ((8, 28, 90), ["SRR1_2.fastq.gz", "SRR1_3.fastq.gz"]),  # index, barcode+UMI, cDNA (as submitted)
    ((28, 90, 8), ["SRR1_1.fastq.gz", "SRR1_2.fastq.gz"]),  # barcode+UMI, cDNA, index
])
def test_three_read_dumps_drop_the_index_read_by_length(tmp_path, layout, expected):
    files = [write_fastq(tmp_path / f"SRR1_{i}.fastq.gz", [("r", "A" * n)]) for i, n in enumerate(layout, start=1)]
    lengths = {f: check_fastq(f).max_length for f in files}
    assert [p.name for p in order_reads(files, "10xv3", lengths)] == expected
