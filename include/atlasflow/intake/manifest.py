"""Reading and validating the dataset manifest (Excel ``.xlsx`` or ``.csv``/``.tsv``).

The manifest is the user's only input, so validation is exhaustive: every problem is collected
(sheet row number, column, reason) before one :class:`ManifestError` is raised. Fields that later
become paths, SLURM job names or URLs are checked against strict patterns here, so no later step
ever has to trust them.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

__all__ = [
    "DATASET_TYPES",
    "FORMATS",
    "READS_FORMATS",
    "TECHNOLOGIES",
    "Dataset",
    "holds_reads",
    "Manifest",
    "ManifestError",
    "Problem",
    "infer_format",
    "read_manifest",
]

log = logging.getLogger(__name__)

DatasetType = Literal["geo", "direct", "sra", "cellxgene"]
DATASET_TYPES: tuple[str, ...] = ("geo", "direct", "sra", "cellxgene")
FORMATS: tuple[str, ...] = ("h5ad", "10x_h5", "10x_mtx", "loom", "csv", "tsv", "rds", "fastq")
# Formats that hold reads, not counts: quantified (kb count) before they are read.
READS_FORMATS: tuple[str, ...] = ("fastq",)
Technology = Literal["10xv2", "10xv3", "smartseq2"]
# Sequencing chemistry of a reads row (kb count -x); the manifest spells it in lower case.
TECHNOLOGIES: tuple[str, ...] = ("10xv2", "10xv3", "smartseq2")


def holds_reads(dataset_type: str | None, fmt: str | None) -> bool:
    """Whether a row of this type and format is raw reads (an sra accession or FASTQ files), not counts."""
    return dataset_type == "sra" or fmt in READS_FORMATS

REQUIRED_COLUMNS = ("dataset_id", "download_url", "type")
OPTIONAL_COLUMNS = (
    "disease_status",
    "tissue_type",
    "species",
    "format",
    "expected_bytes",
    "sha256",
    "md5",
    "batch_key",
    "cell_type_key",
    "notes",
    "technology",
)
KNOWN_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

# dataset_id becomes a folder name and part of a SLURM job name: no separators, no leading dot.
DATASET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GEO_RE = re.compile(r"^(GSE|GSM)[0-9]+$")
# a CELLxGENE Discover dataset id (a UUID), resolved to its H5AD asset through the Curation API
CELLXGENE_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SRA_RE = re.compile(r"^((SRR|ERR|DRR)[0-9]+|(SRP|ERP|DRP)[0-9]+|PRJ(NA|EB|DB)[0-9]+)$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MD5_RE = re.compile(r"^[0-9a-f]{32}$")
URL_SCHEMES = ("https", "http", "ftp")

# the accession-like source types: (pattern, upper- (else lower-) cased, what the row takes, what was expected)
_ACCESSION_TYPES: dict[str, tuple[re.Pattern[str], bool, str, str]] = {
    "geo": (GEO_RE, True, "a GEO accession (GSE… or GSM…)",
            "a GEO accession (expected GSE<digits> or GSM<digits>)"),
    "cellxgene": (CELLXGENE_RE, False, "a CELLxGENE Discover dataset id (a UUID)",
                  "a CELLxGENE dataset id (expected a UUID such as 0123abcd-4567-89ab-cdef-0123456789ab)"),
    "sra": (SRA_RE, True, "an accession (SRR/ERR/DRR…, SRP/ERP/DRP… or PRJNA/PRJEB/PRJDB…)",
            "an SRA accession (expected SRR/ERR/DRR<digits>, SRP/ERP/DRP<digits> or PRJNA/PRJEB/PRJDB<digits>)"),
}
_ARTICLE = {"geo": "a", "cellxgene": "a", "sra": "an"}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}  # fmt: skip
# Suffix → format, longest first so ".mtx.gz" wins over ".gz"-less matches.
_FORMAT_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".h5ad", "h5ad"),
    (".loom", "loom"),
    ("filtered_feature_bc_matrix.h5", "10x_h5"),
    ("raw_feature_bc_matrix.h5", "10x_h5"),
    (".h5", "10x_h5"),
    (".mtx.gz", "10x_mtx"),
    (".mtx", "10x_mtx"),
    (".tar.gz", "10x_mtx"),
    (".tgz", "10x_mtx"),
    (".tar", "10x_mtx"),
    (".csv.gz", "csv"),
    (".csv", "csv"),
    (".tsv.gz", "tsv"),
    (".rds", "rds"),
    (".fastq.gz", "fastq"),
    (".fq.gz", "fastq"),
    (".fastq", "fastq"),
    (".fq", "fastq"),
    (".tsv", "tsv"),
    (".txt.gz", "tsv"),
    (".txt", "tsv"),
)
# What a row's identity is made of: changing one of these changes what is fetched or how it is read.
FINGERPRINT_FIELDS = ("download_url", "type", "format", "sha256", "md5", "species", "batch_key", "cell_type_key")

_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # encrypted .xlsx and legacy .xls
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class Problem:
    """One reason a manifest is invalid. ``row`` is the sheet row number (the header is row 1)."""

    reason: str
    row: int | None = None
    column: str | None = None

    def format(self, source: str) -> str:
        where = [source]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        return f"{', '.join(where)}: {self.reason}"


class ManifestError(ValueError):
    """The manifest cannot be used; ``problems`` holds every reason found."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = [p.format(source) for p in self.problems]
        super().__init__(f"{len(lines)} problem(s) in the manifest:\n" + "\n".join(lines))

    def lines(self) -> list[str]:
        return [p.format(self.source) for p in self.problems]


@dataclass(frozen=True)
class Dataset:
    """One validated manifest row."""

    dataset_id: str
    download_url: str
    type: DatasetType
    row: int
    format: str | None = None
    format_inferred: bool = False
    disease_status: str | None = None
    tissue_type: str | None = None
    species: str | None = None
    expected_bytes: int | None = None
    sha256: str | None = None
    md5: str | None = None
    batch_key: str | None = None
    cell_type_key: str | None = None
    notes: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    technology: Technology | None = None

    @property
    def is_reads(self) -> bool:
        """Raw reads (an sra accession or FASTQ URLs): quantified before they are read as counts."""
        return holds_reads(self.type, self.format)

    def urls(self) -> list[str]:
        """A direct row's URLs: FASTQ rows may list several (R1;R2), separated by ``;``."""
        return [u for u in self.download_url.split(";") if u]

    def fingerprint(self) -> str:
        """Hash of the fields that decide what is downloaded and how it is read."""
        text = "\x1f".join(f"{k}={getattr(self, k) or ''}" for k in FINGERPRINT_FIELDS)
        if self.technology:  # only when set: rows of plans sealed before the column existed keep their hash
            text += f"\x1ftechnology={self.technology}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("dataset_id", "download_url", "type", "row", "format", "format_inferred")}
        out.update({k: getattr(self, k) for k in OPTIONAL_COLUMNS if k != "format"})
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Dataset:
        return cls(**{**data, "extra": dict(data.get("extra") or {})})


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: its datasets in sheet order, and where it came from."""

    source: str
    sheet: str | None
    sha256: str
    datasets: tuple[Dataset, ...]
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.datasets)

    def __iter__(self) -> Iterator[Dataset]:
        return iter(self.datasets)

    def by_id(self) -> dict[str, Dataset]:
        return {d.dataset_id: d for d in self.datasets}


def normalize_column(name: Any) -> str:
    """``" Dataset ID "`` → ``"dataset_id"``: case-, space- and hyphen-insensitive."""
    text = "" if name is None else str(name)
    return re.sub(r"[\s\-]+", "_", text.strip()).lower()


def infer_format(url: str) -> str | None:
    """The format a URL's file name implies, or ``None`` when the name says nothing."""
    name = unquote(urlsplit(url).path).lower()
    for suffix, fmt in _FORMAT_SUFFIXES:
        if name.endswith(suffix):
            return fmt
    return None


def parse_size(value: Any) -> int:
    """Bytes from a number or a string such as ``"12 GB"`` or ``"1.5GiB"``; raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        number, unit = float(value), "b"
    elif isinstance(value, float):
        number, unit = value, "b"
    else:
        m = _SIZE_RE.match(str(value).replace(",", ""))
        if not m:
            raise ValueError(value)
        number, unit = float(m.group(1)), (m.group(2) or "b").lower()
    size = number * _SIZE_UNITS[unit]
    if size < 0 or size != size or size == float("inf"):
        raise ValueError(value)
    if unit == "b" and not float(number).is_integer():
        raise ValueError(value)
    return int(round(size))


def _cell_text(value: Any) -> str | None:
    """A spreadsheet cell as stripped text; ``None`` for empty. ``12.0`` from Excel becomes ``"12"``."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _import_openpyxl() -> Any:
    # openpyxl imports numpy when it can, which costs ~0.2 s and would put numpy into every DAG
    # parse that reads an .xlsx manifest. It treats numpy as optional, so hide it while importing.
    if "openpyxl" in sys.modules or "numpy" in sys.modules:
        import openpyxl

        return openpyxl
    sys.modules["numpy"] = None  # type: ignore[assignment]
    try:
        import openpyxl
    finally:
        del sys.modules["numpy"]
    return openpyxl


def _read_rows_xlsx(path: Path, sheet: str | None) -> tuple[str, Iterator[tuple[int, list[Any]]]]:
    with path.open("rb") as fh:
        head = fh.read(8)
    if head.startswith(_OLE2_MAGIC):
        raise _ReadError(
            "the workbook is password-protected (encrypted) or a legacy .xls file; "
            "remove the password or save it as .xlsx or .csv"
        )
    if not head.startswith(_ZIP_MAGIC):
        raise _ReadError("not an .xlsx workbook (no zip signature); is it a CSV with the wrong extension?")
    openpyxl = _import_openpyxl()
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises a zoo of zip/xml/key errors for damaged files
        raise _ReadError(f"cannot open the workbook: {type(exc).__name__}: {exc}") from exc
    if sheet is None:
        ws = book.worksheets[0]
    elif sheet in book.sheetnames:
        ws = book[sheet]
    else:
        book.close()
        raise _ReadError(f"no sheet named {sheet!r}; the workbook has: {', '.join(book.sheetnames)}")

    def rows() -> Iterator[tuple[int, list[Any]]]:
        try:
            for number, values in enumerate(ws.iter_rows(values_only=True), start=1):
                yield number, list(values)
        except Exception as exc:  # a damaged sheet fails while streaming, not at open
            raise _ReadError(f"cannot read sheet {ws.title!r}: {type(exc).__name__}: {exc}") from exc
        finally:
            book.close()

    return ws.title, rows()


def _read_rows_csv(path: Path) -> Iterator[tuple[int, list[Any]]]:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        start = 1
        try:
            for values in reader:
                # line_num counts physical lines, so a quoted multi-line cell keeps later numbers right
                yield start, values
                start = reader.line_num + 1
        except UnicodeDecodeError as exc:
            raise _ReadError(f"not UTF-8 text near line {start} ({exc.reason}); save the file as UTF-8 CSV") from exc
        except csv.Error as exc:
            raise _ReadError(f"malformed CSV near line {start}: {exc}") from exc


class _ReadError(Exception):
    pass


def read_manifest(
    path: str | Path,
    *,
    sheet: str | None = None,
    allowed_file_root: str | Path | None = None,
) -> Manifest:
    """Read and validate a manifest.

    Parameters
    ----------
    path
        ``.xlsx`` (first sheet unless ``sheet`` is given), ``.csv`` or ``.tsv``.
    sheet
        Worksheet name for ``.xlsx`` files.
    allowed_file_root
        ``file://`` URLs are accepted only when they resolve below this folder.

    Returns
    -------
    The validated :class:`Manifest`.

    Raises
    ------
    ManifestError
        With every problem found, each naming the row, the column and the reason.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ManifestError(source, [Problem(f"no such file: {path}" if not path.exists() else f"not a file: {path}")])
    suffix = path.suffix.lower()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(source, [Problem(f"cannot read the file: {exc.strerror or exc}")]) from exc
    digest = hashlib.sha256(data).hexdigest()
    sheet_title: str | None = None
    problems: list[Problem] = []
    try:
        if suffix in (".xlsx", ".xlsm"):
            sheet_title, rows = _read_rows_xlsx(path, sheet)
            source = f"{path} [sheet '{sheet_title}']"
            table = list(rows)
        elif suffix in (".csv", ".tsv", ".tab", ".txt"):
            if sheet is not None:
                problems.append(Problem(f"sheet {sheet!r} was given but a {suffix} file has no sheets"))
            table = list(_read_rows_csv(path))
        elif suffix == ".xls":
            raise _ReadError("legacy .xls workbooks are not supported; save it as .xlsx or .csv")
        else:
            raise _ReadError(f"unsupported manifest type {suffix or '(no extension)'!r}; use .xlsx or .csv")
    except _ReadError as exc:
        raise ManifestError(source, [Problem(str(exc))]) from None

    datasets, found, warnings = _validate_table(table, allowed_file_root)
    problems.extend(found)
    if problems:
        raise ManifestError(source, problems)
    for w in warnings:
        log.warning("%s: %s", source, w)
    return Manifest(source=str(path), sheet=sheet_title, sha256=digest, datasets=tuple(datasets), warnings=tuple(warnings))


def _validate_table(
    table: list[tuple[int, list[Any]]], allowed_file_root: str | Path | None
) -> tuple[list[Dataset], list[Problem], list[str]]:
    problems: list[Problem] = []
    warnings: list[str] = []
    nonblank = [(n, vals) for n, vals in table if any(_cell_text(v) for v in vals)]
    if not nonblank:
        return [], [Problem("the manifest is empty (no header row)")], warnings
    header_row, header = nonblank[0]
    columns: dict[str, int] = {}
    extra_columns: dict[str, int] = {}
    for idx, raw in enumerate(header):
        name = normalize_column(raw)
        if not name:
            continue
        if name in columns or name in extra_columns:
            problems.append(Problem(f"column {name!r} appears twice in the header", header_row, str(raw).strip()))
            continue
        if name in KNOWN_COLUMNS:
            columns[name] = idx
        else:
            extra_columns[name] = idx
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            problems.append(Problem(f"required column {name!r} is missing from the header", header_row))
    if extra_columns:
        warnings.append(f"unrecognised columns kept as extra metadata: {', '.join(extra_columns)}")
    if problems:
        return [], problems, warnings
    body = nonblank[1:]
    if not body:
        return [], [Problem("the manifest is empty: a header but no dataset rows")], warnings

    seen: dict[str, int] = {}
    datasets: list[Dataset] = []
    root = Path(allowed_file_root).resolve() if allowed_file_root else None
    for number, values in body:

        def get(name: str, _values: list[Any] = values) -> str | None:
            idx = columns.get(name)
            return _cell_text(_values[idx]) if idx is not None and idx < len(_values) else None

        row_problems: list[Problem] = []

        def bad(column: str, reason: str, _n: int = number, _p: list[Problem] = row_problems) -> None:
            _p.append(Problem(reason, _n, column))

        def warn(message: str, _n: int = number) -> None:
            warnings.append(f"row {_n}: {message}")

        dataset_id = get("dataset_id")
        if dataset_id is None:
            bad("dataset_id", "missing required value")
        elif not DATASET_ID_RE.match(dataset_id):
            bad(
                "dataset_id",
                f"{dataset_id!r} is not a valid id: use 1-64 letters, digits, '_', '.', '-', "
                "starting with a letter or digit (it becomes a folder and a SLURM job name)",
            )
        else:
            key = dataset_id.lower()  # case-insensitive filesystems would merge these folders
            if key in seen:
                bad("dataset_id", f"duplicate dataset_id {dataset_id!r} (first on row {seen[key]})")
            else:
                seen[key] = number

        dtype = (get("type") or "").lower() or None
        if dtype is None:
            bad("type", "missing required value")
        elif dtype not in DATASET_TYPES:
            bad("type", f"unknown type {get('type')!r}; expected one of: {', '.join(DATASET_TYPES)}")

        url = get("download_url")
        if url is None:
            bad("download_url", "missing required value")
        fmt = (get("format") or "").lower() or None
        if url is not None and dtype in DATASET_TYPES:
            if dtype == "direct" and ";" in url:
                # several files of one sample: only FASTQ rows (R1;R2), each URL checked on its own
                parts = url.split(";")
                checked = [_check_source(u, dtype, root, lambda reason: bad("download_url", reason), warn)
                           for u in parts]
                url = ";".join(checked)
                if any(not u for u in parts):
                    bad("download_url", "empty URL between ';' separators")
                elif (fmt or infer_format(parts[0])) != "fastq":
                    bad("download_url", "several URLs (separated by ';') are only allowed for FASTQ rows (R1;R2)")
            else:
                url = _check_source(url, dtype, root, lambda reason: bad("download_url", reason), warn)

        inferred = False
        if fmt is not None and fmt not in FORMATS:
            bad("format", f"unknown format {get('format')!r}; expected one of: {', '.join(FORMATS)}")
        elif dtype == "cellxgene" and fmt not in (None, "h5ad"):
            bad("format", f"a cellxgene row is the dataset's H5AD asset; leave format empty or set 'h5ad' (not {fmt!r})")
        elif dtype == "cellxgene":
            fmt, inferred = "h5ad", fmt is None
        elif fmt is None and dtype == "direct" and url is not None:
            fmt = infer_format(url.split(";")[0])
            inferred = fmt is not None
            if fmt is None:
                bad("format", f"cannot infer the format from the URL's file name; set one of: {', '.join(FORMATS)}")

        expected: int | None = None
        raw_size = values[columns["expected_bytes"]] if "expected_bytes" in columns and columns["expected_bytes"] < len(values) else None
        if _cell_text(raw_size) is not None:
            try:
                expected = parse_size(raw_size)
            except ValueError:
                bad("expected_bytes", f"{_cell_text(raw_size)!r} is not a byte count (a number, optionally with a unit such as GB)")

        technology = (get("technology") or "").lower() or None
        if technology is not None and technology not in TECHNOLOGIES:
            bad("technology", f"unknown technology {get('technology')!r}; expected one of: {', '.join(TECHNOLOGIES)}")
        # empty for reads: the chemistry is detected from the reads (acquire/chemistry.py) before kb count
        if dtype == "sra" and fmt is not None and fmt not in READS_FORMATS:
            bad("format", f"an sra row holds reads; leave format empty or set 'fastq' (not {fmt!r})")

        sha256 = (get("sha256") or "").lower() or None
        if sha256 is not None and not SHA256_RE.match(sha256):
            bad("sha256", "malformed checksum: expected 64 hexadecimal characters")
        md5 = (get("md5") or "").lower() or None
        if md5 is not None and not MD5_RE.match(md5):
            bad("md5", "malformed checksum: expected 32 hexadecimal characters")

        problems.extend(row_problems)
        if row_problems:
            continue
        assert dataset_id is not None and url is not None and dtype is not None
        datasets.append(
            Dataset(
                dataset_id=dataset_id,
                download_url=url,
                type=dtype,  # type: ignore[arg-type]
                row=number,
                format=fmt,
                format_inferred=inferred,
                disease_status=get("disease_status"),
                tissue_type=get("tissue_type"),
                species=get("species"),
                expected_bytes=expected,
                sha256=sha256,
                md5=md5,
                batch_key=get("batch_key"),
                cell_type_key=get("cell_type_key"),
                notes=get("notes"),
                technology=technology,  # type: ignore[arg-type]
                extra={k: t for k, i in extra_columns.items() if i < len(values) and (t := _cell_text(values[i]))},
            )
        )
    return datasets, problems, warnings


def _check_source(url: str, dtype: str, root: Path | None, bad: Any, warn: Any = None) -> str:
    """Validate a ``download_url`` cell for its type; returns the normalised value."""
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        bad("contains whitespace or control characters")
        return url
    if dtype in _ACCESSION_TYPES:
        pattern, upper, what, expected = _ACCESSION_TYPES[dtype]
        acc = url.upper() if upper else url.lower()
        if "://" in url:
            bad(f"{_ARTICLE[dtype]} {dtype} row takes {what}, not a URL; use type 'direct' for a file URL")
        elif not pattern.match(acc):
            bad(f"{url!r} is not {expected}")
        return acc
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if root is None:
            bad("file:// URLs are refused unless manifest.allowed_file_root is configured")
            return url
        if parts.netloc not in ("", "localhost"):
            bad(f"file:// URL names a host ({parts.netloc!r}); only local paths are allowed")
            return url
        target = Path(unquote(parts.path)).resolve()
        if not target.is_relative_to(root):
            bad(f"file:// path {target} is outside the allowed root {root}")
        return url
    if scheme not in URL_SCHEMES:
        shown = scheme or "(none)"
        bad(f"URL scheme {shown!r} is not allowed; use https, http or ftp (or file:// below the allowed root)")
        return url
    if not parts.hostname:
        bad("URL has no host name")
    elif not parts.hostname.isascii() and warn is not None:
        # an internationalised name may imitate a known host letter for letter (a Cyrillic 'а' for 'a')
        try:
            puny = parts.hostname.encode("idna").decode()
        except UnicodeError:
            puny = "not a valid IDNA name"
        warn(f"download_url host {parts.hostname!r} is not ASCII ({puny}): check it is the host you mean")
    return url
