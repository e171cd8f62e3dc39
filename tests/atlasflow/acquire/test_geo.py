"""GEO rules on names, filelist.txt and table heads (pure functions; the fetching is in test_geo_fetch.py)."""

from __future__ import annotations

import gzip

import pytest

from atlasflow.acquire.fetch import geo_expected_bytes, parse_soft_organisms
from atlasflow.acquire.geo import href_name, parse_filelist, select_geo, sniff_table, text_prefix

FILELIST = """#Archive/File\tName\tTime\tSize\tType
Archive\tGSE9_RAW.tar\t01/02/2020 10:00:00\t5000000\tTAR
File\tGSM1_matrix.mtx.gz\t01/02/2020 10:00:00\t1000000\tMTX
File\tGSM1_barcodes.tsv.gz\t01/02/2020 10:00:00\t1000\tTSV
File\tGSM1_features.tsv.gz\t01/02/2020 10:00:00\t2000\tTSV
File\tGSM2_filtered_feature_bc_matrix.h5\t01/02/2020 10:00:00\t900000\tH5
File\tGSM2_matrix.mtx.gz\t01/02/2020 10:00:00\t1100000\tMTX
File\tGSM2_barcodes.tsv.gz\t01/02/2020 10:00:00\t1000\tTSV
File\tGSM2_genes.tsv.gz\t01/02/2020 10:00:00\t2000\tTSV
File\tGSM3_raw_feature_bc_matrix.h5\t01/02/2020 10:00:00\t800000\tH5
File\tGSM4_matrix.mtx.gz\t01/02/2020 10:00:00\t10\tMTX
File\tGSM5_tsne.png\t01/02/2020 10:00:00\t10\tPNG
"""


def test_filelist_is_parsed_and_the_rules_choose_one_format_per_sample():
    archive, members = parse_filelist(FILELIST)
    assert archive == ("GSE9_RAW.tar", 5_000_000) and len(members) == 10
    sel = select_geo("GSE9", ["../", "GSE9_RAW.tar", "filelist.txt", "GSE9_all_counts.csv.gz"], filelist=FILELIST)
    assert sel.tar == "GSE9_RAW.tar" and sel.tar_size == 5_000_000
    assert [c.name for c in sel.members] == ["GSM1_matrix.mtx.gz", "GSM1_barcodes.tsv.gz", "GSM1_features.tsv.gz",
                                             "GSM2_filtered_feature_bc_matrix.h5", "GSM3_raw_feature_bc_matrix.h5"]
    why = {s.name: s.reason for s in sel.skipped}
    assert "GSM2_filtered_feature_bc_matrix.h5 is preferred" in why["GSE9_RAW.tar/GSM2_matrix.mtx.gz"]
    assert "incomplete 10x trio (no barcodes or features" in why["GSE9_RAW.tar/GSM4_matrix.mtx.gz"]
    assert "not count data" in why["GSE9_RAW.tar/GSM5_tsne.png"]
    assert "per-sample files in GSE9_RAW.tar" in why["GSE9_all_counts.csv.gz"]
    # the members, never the tar, are what lands on disk
    assert sel.expected_bytes == 1_000_000 + 1000 + 2000 + 900_000 + 800_000
    assert geo_expected_bytes("GSE9", ["GSE9_RAW.tar", "filelist.txt"], filelist=FILELIST) == sel.expected_bytes


def test_expected_bytes_of_plain_files_needs_their_sizes():
    hrefs = ["GSE1_counts.h5ad", "README.txt", "x.png"]
    assert geo_expected_bytes("GSE1", hrefs) is None  # the h5ad's size is unknown
    assert geo_expected_bytes("GSE1", hrefs, sizes={"GSE1_counts.h5ad": 123}) == 123  # README.txt loses to h5ad
    # a RAW.tar without filelist.txt: its contents are unknown in advance
    assert geo_expected_bytes("GSE2", ["GSE2_RAW.tar"]) is None


def test_hrefs_are_confined_to_the_listed_folder_and_collisions_refused():
    assert href_name("a%20b.h5ad") == "a b.h5ad" and href_name("?C=M;O=A") is None and href_name("sub/") is None
    for bad in ("x/../../top.h5ad", "/geo/top.h5ad", "https://evil.example/x.h5ad", "..%2Ftop.h5ad", "a/b.h5ad"):
        with pytest.raises(ValueError, match="outside the listed folder"):
            href_name(bad)
    sel = select_geo("GSE1", ["x/../../top.h5ad", "ok.h5ad"])
    assert [c.name for c in sel.files] == ["ok.h5ad"]
    assert "refused" in sel.skipped[0].reason and sel.skipped[0].name == "x/../../top.h5ad"
    with pytest.raises(ValueError, match="both clean to the file name 'a_b.h5ad'"):
        select_geo("GSE1", ["a%20b.h5ad", "a_b.h5ad"])


def test_normalised_tables_give_way_to_raw_ones():
    sel = select_geo("GSE1", ["GSE1_raw_counts.csv.gz", "GSE1_normalized.csv.gz", "GSE1_log_expr.txt.gz"])
    assert [c.name for c in sel.files] == ["GSE1_raw_counts.csv.gz"]
    assert all("named as normalised values" in s.reason for s in sel.skipped)


GENES = ["CD3E", "HLA-DRA", "MT-CO1", "RP11-34P13.3", "C1orf112", "MS4A1", "LYZ", "NKG7", "GNLY", "CD14", "FCGR3A"]


def test_sniffing_tells_counts_from_metadata():
    cells = [f"AAACCTGAGCGTAG{i:02d}-1" for i in range(12)]
    genes_x_cells = "," + ",".join(cells) + "\n" + "".join(f"{g}," + ",".join("0" if i % 3 else "2" for i in range(12))
                                                              + "\n" for g in GENES)
    assert sniff_table(genes_x_cells) is None
    cells_x_genes = "\t".join(GENES) + "\n" + "".join(f"{c}\t" + "\t".join("1" for _ in GENES) + "\n" for c in cells)
    assert sniff_table(cells_x_genes) is None  # R's write.table: the header lacks the corner cell
    ens = "gene\t" + "\t".join(cells) + "\n" + "".join(f"ENSG{i:011d}.{i % 3 + 1}\t" + "\t".join("3" for _ in cells)
                                                        + "\n" for i in range(12))
    assert sniff_table(ens) is None
    meta = "barcode,cell_type,n_genes\n" + "".join(f"{c},B cell,{i}\n" for i, c in enumerate(cells))
    assert "column 'cell_type' holds text ('B cell')" in sniff_table(meta)
    numeric_meta = "\tnGene\tnUMI\tpercent.mito\n" + "".join(f"{c}\t100\t2000\t0.01\n" for c in cells)
    assert "nor its first column names genes" in sniff_table(numeric_meta)
    stats = "gene,log2FC,pval\n" + "".join(f"{g},-1.5,0.001\n" for g in GENES)
    assert "negative values" in sniff_table(stats)
    assert "no data rows" in sniff_table("This series holds ...\n")
    # a cut gzip prefix still sniffs (what a ranged GET returns)
    long = "," + ",".join(cells) + "\n" + "".join(f"{g}{k}," + ",".join("1" for _ in cells) + "\n"
                                                for k in range(300) for g in GENES)
    blob = gzip.compress(long.encode())
    assert sniff_table(text_prefix(blob[: len(blob) // 2], "a.csv.gz")) is None


def test_soft_organisms():
    soft = ("^SERIES = GSE9\n!Series_sample_id = GSM1\n^SAMPLE = GSM1\n!Sample_organism_ch1 = Homo sapiens\n"
            "!Sample_taxid_ch1 = 9606\n^SAMPLE = GSM2\n!Sample_organism_ch1 = Mus musculus\n"
            "^SAMPLE = GSM3\n!Sample_taxid_ch1 = 10090\n")
    assert parse_soft_organisms(soft) == {"GSM1": "Homo sapiens", "GSM2": "Mus musculus", "GSM3": "10090"}
