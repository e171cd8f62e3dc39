from __future__ import annotations

from pathlib import Path

import pytest

from atlasflow.intake.manifest import ManifestError, infer_format, parse_size, read_manifest
from tests.atlasflow.conftest import HEADER, direct_rows, write_csv, write_xlsx


def problems_of(path: Path, **kwargs) -> list[tuple[int | None, str | None, str]]:
    with pytest.raises(ManifestError) as info:
        read_manifest(path, **kwargs)
    return [(p.row, p.column, p.reason) for p in info.value.problems]


def only_problem(path: Path, **kwargs) -> tuple[int | None, str | None, str]:
    found = problems_of(path, **kwargs)
    assert len(found) == 1, found
    return found[0]


# ---- reading ---------------------------------------------------------------------------------


def test_reads_csv_with_every_column(tmp_path):
    header = ["Dataset ID", " Download-URL ", "TYPE", "disease_status", "Tissue Type", "species", "format",
              "expected_bytes", "sha256", "md5", "batch_key", "cell_type_key", "notes", "Lab", "Technology"]
    sha = "ab" * 32
    rows = [
        ["GSE1000", "gse1000", "GEO", "ALS", "spinal_cord", "human", "", "12 GB", "", "", "", "", "", "Smith", ""],
        ["pbmc", "https://host.org/a/pbmc_filtered_feature_bc_matrix.h5", "direct", "control", "blood", "human",
         "", "1.5GiB", sha, "", "donor", "cell_type", "a note", "", ""],
        ["SRR123", "srr123", "sra", "", "", "", "", 5000, "", "0" * 32, "", "", "", "", "10XV3"],
    ]
    m = read_manifest(write_csv(tmp_path / "m.csv", rows, header))
    assert [d.dataset_id for d in m] == ["GSE1000", "pbmc", "SRR123"]
    geo, pbmc, sra = m.datasets
    assert (geo.type, geo.download_url, geo.expected_bytes, geo.row) == ("geo", "GSE1000", 12 * 10**9, 2)
    assert geo.extra == {"lab": "Smith"} and geo.disease_status == "ALS" and geo.tissue_type == "spinal_cord"
    assert (pbmc.format, pbmc.format_inferred, pbmc.expected_bytes) == ("10x_h5", True, int(1.5 * 2**30))
    assert (pbmc.sha256, pbmc.batch_key, pbmc.cell_type_key, pbmc.notes) == (sha, "donor", "cell_type", "a note")
    assert (sra.download_url, sra.md5, sra.expected_bytes, sra.format) == ("SRR123", "0" * 32, 5000, None)
    assert (sra.technology, sra.is_reads, pbmc.technology, pbmc.is_reads) == ("10xv3", True, None, False)
    assert any("lab" in w for w in m.warnings)
    assert len(m.sha256) == 64


def test_reads_first_or_named_xlsx_sheet(tmp_path):
    path = tmp_path / "m.xlsx"
    write_xlsx(path, direct_rows(2), sheet="datasets", extra_sheets=["other"])
    m = read_manifest(path)
    assert m.sheet == "datasets" and len(m) == 2
    # numbers typed into Excel arrive as numbers; an integral float becomes an int byte count
    assert m.datasets[0].expected_bytes == 1_000_000
    row, column, reason = only_problem(path, sheet="nope")
    assert row is None and "no sheet named 'nope'" in reason and "datasets, other" in reason


def test_xlsx_row_numbers_are_sheet_rows(tmp_path):
    rows = direct_rows(3)
    rows.insert(1, [None] * 5)  # a blank row stays counted, as Excel shows it
    rows[2][2] = "bogus"
    path = write_xlsx(tmp_path / "m.xlsx", rows)
    assert only_problem(path)[:2] == (4, "type")


def test_csv_row_numbers_survive_multiline_cells(tmp_path):
    header = HEADER + ["notes"]
    rows = [r + [""] for r in direct_rows(3)]
    rows[0][5] = "line one\nline two"
    rows[2][2] = "nope"
    path = write_csv(tmp_path / "m.csv", rows, header)
    # header line 1, first record spans lines 2-3, so the third record starts on line 5
    assert only_problem(path)[:2] == (5, "type")


def test_numeric_dataset_id_from_excel(tmp_path):
    path = write_xlsx(tmp_path / "m.xlsx", [[12345, "https://h.org/x.h5ad", "direct", None, None]])
    assert read_manifest(path).datasets[0].dataset_id == "12345"


@pytest.mark.parametrize(
    ("url", "fmt"),
    [
        ("https://h/x.h5ad", "h5ad"), ("https://h/x.loom", "loom"), ("https://h/raw_feature_bc_matrix.h5", "10x_h5"),
        ("https://h/m.mtx.gz", "10x_mtx"), ("https://h/m.tar.gz", "10x_mtx"), ("https://h/c.csv.gz", "csv"),
        ("https://h/c.tsv", "tsv"), ("https://h/c.txt.gz", "tsv"), ("https://h/X.H5AD?dl=1", "h5ad"),
        ("https://h/download?id=3", None),
    ],
)  # fmt: skip
def test_infer_format(url, fmt):
    assert infer_format(url) == fmt


@pytest.mark.parametrize(
    ("value", "size"),
    [(5, 5), (5.0, 5), ("5", 5), ("1,000", 1000), ("2 kB", 2000), ("3MiB", 3 * 2**20), ("1.5 GB", 1_500_000_000),
     ("2e3", 2000)],
)
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["12x", "-5", "1.5", "GB", "", True, "1.5 B"])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


# ---- every validation rule ---------------------------------------------------------------------


@pytest.mark.parametrize("column", ["dataset_id", "download_url", "type"])
def test_missing_required_value(manifest_csv, column):
    row = {"dataset_id": "a", "download_url": "https://h.org/x.h5ad", "type": "direct", "format": "", "expected_bytes": ""}
    row[column] = ""
    assert only_problem(manifest_csv([list(row.values())])) == (2, column, "missing required value")


def test_missing_required_column(manifest_csv):
    row, column, reason = only_problem(manifest_csv([["a", "direct"]], header=["dataset_id", "type"]))
    assert row == 1 and "'download_url' is missing" in reason


def test_duplicate_header_column(manifest_csv):
    found = problems_of(manifest_csv([["a", "b", "c", "d"]], header=["dataset_id", "Dataset ID", "download_url", "type"]))
    assert any("appears twice" in reason for _, _, reason in found)


def test_unknown_type_and_format(manifest_csv):
    found = problems_of(manifest_csv([["a", "https://h.org/x.h5ad", "ftp", "", ""], ["b", "https://h.org/x", "direct", "rdata", ""]]))
    assert (2, "type", "unknown type 'ftp'; expected one of: geo, direct, sra, cellxgene") in found
    assert any(r == 3 and c == "format" and "unknown format 'rdata'" in why for r, c, why in found)


def test_direct_format_must_be_inferable(manifest_csv):
    row, column, reason = only_problem(manifest_csv([["a", "https://h.org/get?id=1", "direct", "", ""]]))
    assert (row, column) == (2, "format") and "cannot infer" in reason


def test_duplicate_dataset_id_names_first_row(manifest_csv):
    rows = direct_rows(3)
    rows[2][0] = rows[0][0].upper()
    assert only_problem(manifest_csv(rows)) == (4, "dataset_id", "duplicate dataset_id 'DS000' (first on row 2)")


@pytest.mark.parametrize("bad_id", ["../etc", "a b", ".hidden", "-x", "x" * 65, "a/b", "a;rm -rf", "é"])
def test_dataset_id_pattern(manifest_csv, bad_id):
    row, column, reason = only_problem(manifest_csv([[bad_id, "https://h.org/x.h5ad", "direct", "", ""]]))
    assert (row, column) == (2, "dataset_id") and "not a valid id" in reason


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("s3://bucket/x.h5ad", "scheme 's3'"),
        ("x.h5ad", "scheme '(none)'"),
        ("https:///x.h5ad", "no host"),
        ("file:///etc/passwd.h5ad", "file:// URLs are refused"),
        ("https://h.org/a b.h5ad", "whitespace"),
    ],
)
def test_url_rules(manifest_csv, url, fragment):
    row, column, reason = only_problem(manifest_csv([["a", url, "direct", "h5ad", ""]]))
    assert (row, column) == (2, "download_url") and fragment in reason


def test_file_urls_only_below_allowed_root(tmp_path, manifest_csv):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    inside = f"file://{root}/sub/x.h5ad"
    escape = f"file://{root}/../secret.h5ad"
    remote = "file://otherhost/x.h5ad"
    path = manifest_csv([["a", inside, "direct", "", ""], ["b", escape, "direct", "", ""], ["c", remote, "direct", "", ""]])
    found = problems_of(path, allowed_file_root=root)
    assert [(r, c) for r, c, _ in found] == [(3, "download_url"), (4, "download_url")]
    assert "outside the allowed root" in found[0][2] and "names a host" in found[1][2]
    ok = read_manifest(manifest_csv([["a", inside, "direct", "", ""]]), allowed_file_root=root)
    assert ok.datasets[0].format == "h5ad"


@pytest.mark.parametrize(("acc", "ok"), [("GSE12", True), ("gsm9", True), ("GSE12a", False), ("GDS5", False),
                                         ("https://ncbi/GSE1", False)])
def test_geo_accessions(manifest_csv, acc, ok):
    path = manifest_csv([["a", acc, "geo", "", ""]])
    if ok:
        assert read_manifest(path).datasets[0].download_url == acc.upper()
    else:
        assert only_problem(path)[:2] == (2, "download_url")


@pytest.mark.parametrize(
    ("acc", "ok"),
    [("SRR1", True), ("ERR22", True), ("DRR3", True), ("SRP4", True), ("PRJNA5", True), ("PRJEB6", True),
     ("SRX7", False), ("SRR", False), ("PRJ9", False)],
)
def test_sra_accessions(manifest_csv, acc, ok):
    path = manifest_csv([["a", acc, "sra", "", "", "10xv2"]], [*HEADER, "technology"])
    if ok:
        assert read_manifest(path).datasets[0].download_url == acc
    else:
        assert only_problem(path)[:2] == (2, "download_url")


def test_expected_bytes_must_be_numeric(manifest_csv):
    row, column, reason = only_problem(manifest_csv([["a", "https://h.org/x.h5ad", "direct", "", "lots"]]))
    assert (row, column) == (2, "expected_bytes") and "'lots'" in reason


@pytest.mark.parametrize(("column", "value"), [("sha256", "abc"), ("sha256", "g" * 64), ("md5", "0" * 31)])
def test_malformed_checksums(manifest_csv, column, value):
    header = HEADER + [column]
    row, col, reason = only_problem(manifest_csv([["a", "https://h.org/x.h5ad", "direct", "", "", value]], header=header))
    assert (row, col) == (2, column) and "malformed checksum" in reason


def test_every_problem_is_collected(manifest_csv):
    rows = [
        ["ok1", "https://h.org/x.h5ad", "direct", "", ""],
        ["bad id", "GSE1x", "geo", "", "x"],
        ["ok1", "s3://b/x.h5ad", "dirct", "", ""],
    ]
    found = problems_of(manifest_csv(rows))
    assert {(r, c) for r, c, _ in found} == {
        (3, "dataset_id"), (3, "download_url"), (3, "expected_bytes"), (4, "dataset_id"), (4, "type"),
    }
    assert len(found) == 5


def test_error_message_names_file_row_column(manifest_csv):
    path = manifest_csv([["a", "https://h.org/x.h5ad", "nope", "", ""]])
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert info.value.lines() == [f"{path}, row 2, column 'type': unknown type 'nope'; expected one of: geo, direct, sra, cellxgene"]


# ---- unreadable files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "name", "fragment"),
    [
        (b"", "m.csv", "empty (no header row)"),
        (b"dataset_id,download_url,type\n", "m.csv", "a header but no dataset rows"),
        (b"\n\n,,\n", "m.csv", "empty"),
        (b"dataset_id,download_url,type\n\xff\xfe,x,y\n", "m.csv", "not UTF-8"),
        (b"PK\x03\x04garbage", "m.xlsx", "cannot open the workbook"),
        (b"a,b,c\n", "m.xlsx", "no zip signature"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 504, "m.xls", "legacy .xls"),
        (b"{}", "m.json", "unsupported manifest type"),
    ],
)
def test_unreadable_manifests(tmp_path, content, name, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    row, column, reason = only_problem(path)
    assert fragment in reason


def test_missing_file_and_directory(tmp_path):
    assert "no such file" in only_problem(tmp_path / "absent.csv")[2]
    assert "not a file" in only_problem(tmp_path)[2]


def test_password_protected_xlsx(tmp_path):
    from msoffcrypto.format.ooxml import OOXMLFile

    plain = write_xlsx(tmp_path / "plain.xlsx", direct_rows(1))
    encrypted = tmp_path / "locked.xlsx"
    with plain.open("rb") as src, encrypted.open("wb") as dst:
        OOXMLFile(src).encrypt("secret", dst)
    assert encrypted.read_bytes()[:4] != b"PK\x03\x04"  # really encrypted, not a zip any more
    row, column, reason = only_problem(encrypted)
    assert "password-protected" in reason


def test_sheet_with_csv_is_an_error(manifest_csv):
    path = manifest_csv(direct_rows(1))
    assert "has no sheets" in only_problem(path, sheet="x")[2]


def test_reading_xlsx_does_not_import_numpy(tmp_path):
    """Manifests are read while parsing DAGs; numpy there would cost every parse."""
    import subprocess
    import sys

    path = write_xlsx(tmp_path / "m.xlsx", direct_rows(2))
    code = (
        "import sys; from atlasflow.intake.manifest import read_manifest; "
        f"m = read_manifest({str(path)!r}); assert len(m) == 2; "
        "print(sorted(x for x in ('numpy', 'pandas') if x in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dataset_round_trips_through_dict(manifest_csv):
    d = read_manifest(manifest_csv(direct_rows(1))).datasets[0]
    from atlasflow.intake.manifest import Dataset

    assert Dataset.from_dict(d.to_dict()) == d


# ---- raw reads: technology and FASTQ URLs ------------------------------------------------------

READS_HEADER = [*HEADER, "technology"]


def test_reads_rows_take_a_known_technology_or_none(manifest_csv):
    # empty: detected from the reads before kb count (acquire/chemistry.py)
    (d,) = read_manifest(manifest_csv([["a", "SRR1", "sra", "", ""]], READS_HEADER)).datasets
    assert (d.technology, d.is_reads) == (None, True)
    row, column, reason = only_problem(manifest_csv([["a", "SRR1", "sra", "", "", "10xv9"]], READS_HEADER))
    assert column == "technology" and reason == "unknown technology '10xv9'; expected one of: 10xv2, 10xv3, smartseq2"
    row, column, reason = only_problem(manifest_csv([["a", "SRR1", "sra", "h5ad", "", "10xv3"]], READS_HEADER))
    assert column == "format" and "an sra row holds reads" in reason
    # a count matrix may carry a technology as metadata; it needs none
    ok = read_manifest(manifest_csv([["b", "https://h.org/x.h5ad", "direct", "", "", "smartseq2"]], READS_HEADER))
    assert ok.datasets[0].technology == "smartseq2" and not ok.datasets[0].is_reads


def test_direct_fastq_rows_list_r1_and_r2(manifest_csv):
    url = "https://h.org/s_R1.fastq.gz;https://h.org/s_R2.fastq.gz"
    (d,) = read_manifest(manifest_csv([["s", url, "direct", "", "", "10xv3"]], READS_HEADER)).datasets
    assert (d.format, d.format_inferred, d.is_reads) == ("fastq", True, True)
    assert d.urls() == ["https://h.org/s_R1.fastq.gz", "https://h.org/s_R2.fastq.gz"]
    _, column, reason = only_problem(manifest_csv([["s", "https://h.org/a.h5ad;https://h.org/b.h5ad", "direct", "", "",
                                                    ""]], READS_HEADER))
    assert column == "download_url" and "only allowed for FASTQ rows" in reason
    _, column, reason = only_problem(manifest_csv([["s", "https://h.org/s_R1.fastq.gz;gopher://h.org/x", "direct",
                                                    "", "", "10xv3"]], READS_HEADER))
    assert column == "download_url" and "'gopher' is not allowed" in reason


def test_technology_enters_the_fingerprint_only_when_set(manifest_csv):
    # rows of plans sealed before the column existed keep their fingerprint (no spurious "edited" rows)
    plain = read_manifest(manifest_csv([["a", "https://h.org/x.h5ad", "direct", "", ""]])).datasets[0]
    blank = read_manifest(manifest_csv([["a", "https://h.org/x.h5ad", "direct", "", "", ""]], READS_HEADER)).datasets[0]
    tagged = read_manifest(manifest_csv([["a", "https://h.org/x.h5ad", "direct", "", "", "10xv3"]],
                                        READS_HEADER)).datasets[0]
    assert plain.fingerprint() == blank.fingerprint() != tagged.fingerprint()


def test_a_manifest_in_the_seed_format_is_valid(tmp_path):
    """The columns a first-time user's manifest has (dataset_id, download_url, type, disease_status,
    tissue_type): no format, no sizes, no technology, an sra row among geo and direct ones."""
    header = ["dataset_id", "download_url", "type", "disease_status", "tissue_type"]
    rows = [["als_gse1", "GSE174332", "geo", "ALS", "motor_cortex"],
            ["ctrl_h5", "https://example.org/d/ctrl_filtered_feature_bc_matrix.h5", "direct", "control", "spinal_cord"],
            ["als_sra", "SRR12345678", "sra", "ALS", "spinal_cord"]]
    m = read_manifest(write_csv(tmp_path / "als_datasets.csv", rows, header))
    assert [(d.type, d.format, d.technology, d.is_reads) for d in m] == [
        ("geo", None, None, False), ("direct", "10x_h5", None, False), ("sra", None, None, True)]
    assert m.datasets[2].disease_status == "ALS" and m.datasets[2].tissue_type == "spinal_cord"


# ---- issue 16 point 10: only ASCII digits; non-ASCII host names warned about ---------------------------------


@pytest.mark.parametrize(("value", "dtype", "column"), [
    ("GSE١٢٣", "geo", "download_url"),      # Arabic-Indic digits
    ("GSM１２３", "geo", "download_url"),     # fullwidth digits
    ("SRR٤٥٦", "sra", "download_url"),
    ("PRJNA۷۸۹", "sra", "download_url"),     # extended Arabic-Indic
])
def test_unicode_digits_are_refused_at_validation(manifest_csv, value, dtype, column):
    rows = [["ok", value, dtype, "", ""]]
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest_csv(rows))
    (problem,) = info.value.problems
    assert problem.column == column and problem.row == 2 and repr(value) in problem.reason


@pytest.mark.parametrize("value", ["1٠٠ MB", "٣GB", "１２"])
def test_unicode_digits_in_sizes_are_refused(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_a_non_ascii_host_name_is_warned_about(manifest_csv, caplog):
    rows = [["idn", "https://exаmple.org/x.h5ad", "direct", "", ""],  # a Cyrillic 'а' in the host
            ["plain", "https://example.org/y.h5ad", "direct", "", ""]]
    manifest = read_manifest(manifest_csv(rows))
    assert len(manifest.datasets) == 2
    (warning,) = [w for w in manifest.warnings if "host" in w]
    assert "row 2" in warning and "exаmple.org" in warning and "xn--" in warning
