"""GEO's rules: which supplementary files of a series (or sample) hold its counts, and which do not.

Pure functions over names, sizes and the first bytes of files; :mod:`atlasflow.acquire.fetch` does
the fetching and :mod:`atlasflow.acquire.geo_tar` the streaming of ``_RAW.tar``. The rules (the
README's "GEO rules" says the same for users):

1. **Only count data is fetched.** Images, reads, alignments, documents and GEO's own ``filelist.txt``
   are skipped by name. Every href must name a file of the listed folder itself: a sub-path, ``..``,
   an absolute or foreign link is refused, and two names that clean to the same file name
   (``a b.h5ad``, ``a_b.h5ad``) refuse the dataset rather than overwrite each other.
2. **Samples.** Files whose names start with a GSM accession belong to that sample (a 10x trio
   ``GSM1_matrix.mtx.gz`` + ``GSM1_barcodes.tsv.gz`` + ``GSM1_features.tsv.gz`` is one source); a
   series is one dataset whose cells carry the GSM id in ``obs['sample']`` and ``obs['batch']``.
3. **One candidate per sample.** Where one sample (or the series folder, for files without a GSM
   prefix) holds the same data in several formats, one format is taken, in this order:
   :data:`PREFERENCE` (10x HDF5, then the Matrix Market trio, h5ad, loom, RDS, a 10x ``.tar.gz``, a
   delimited table; Cell Ranger's ``raw_feature_bc_matrix`` only when no filtered matrix exists).
   The others are skipped with the reason. Tables named as normalised values (``norm``, ``log``,
   ``tpm``, ``scaled`` …) give way to a table of the same folder that is not.
4. **``_RAW.tar``.** Its contents are read from ``filelist.txt`` (member names and sizes) before a
   byte of the tar is fetched. When it holds count matrices, the per-sample members are taken
   (streamed, never stored whole) and series-level count files are skipped as the same cells in
   another layout; without a ``filelist.txt`` the tar is streamed only when the folder has no other
   count file.
5. **Tables are sniffed.** A delimited table is counts only when its values are non-negative numbers
   and its header or its first column names genes (symbols or Ensembl ids); otherwise (a README,
   cell metadata, cluster annotations, marker statistics) it is skipped with the reason.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = [
    "PREFERENCE",
    "GeoCandidate",
    "GeoSelection",
    "GeoSkip",
    "classify",
    "parse_filelist",
    "select_candidates",
    "select_geo",
    "sniff_table",
    "text_prefix",
]

# kind -> rank (lower wins); what the README documents as GEO rule 3
PREFERENCE: tuple[str, ...] = ("10x_h5", "10x_mtx", "h5ad", "loom", "rds", "10x_mtx_tar", "10x_h5_raw", "table")
_LABEL = {
    "10x_h5": "a 10x HDF5 matrix", "10x_mtx": "a 10x Matrix Market trio", "h5ad": "an h5ad file",
    "loom": "a loom file", "rds": "an RDS object", "10x_mtx_tar": "a 10x .tar.gz", "10x_h5_raw":
    "Cell Ranger's unfiltered (raw_feature_bc_matrix) HDF5", "table": "a delimited table",
}  # fmt: skip
_NOT_COUNTS = re.compile(
    r"\.(png|jpe?g|gif|tiff?|svg|pdf|docx?|xlsx?|pptx?|html?|bam|bai|cram|crai|bw|bigwig|bed(\.gz)?|"
    r"bedgraph(\.gz)?|wig(\.gz)?|narrowpeak(\.gz)?|fastq(\.gz)?|fq(\.gz)?|sra|fasta(\.gz)?|fa(\.gz)?|"
    r"gtf(\.gz)?|gff3?(\.gz)?|vcf(\.gz)?|zip|json|r|py|ipynb)$|(^|_)filelist\.txt$",
    re.IGNORECASE,
)
_RAW_TAR = re.compile(r"_RAW\.tar$", re.IGNORECASE)
_TRIO = re.compile(r"(matrix\.mtx|barcodes\.tsv|(?:features|genes)\.tsv)(\.gz)?$", re.IGNORECASE)
_GSM = re.compile(r"^(GSM[0-9]+)(?=[_.-]|$)")
_NORMALISED = re.compile(r"(norm|scaled|(^|[_.-])log|tpm|fpkm|rpkm|cpm|z-?score)", re.IGNORECASE)
_ENSEMBL = re.compile(r"^ENS[A-Z]*G[0-9]{6,}(\.[0-9]+)?$")
# a gene symbol as GEO tables spell them: CD3E, HLA-DRA, RP11-34P13.3, MT-CO1, C1orf112, Actb, mt-Co1
_SYMBOL = re.compile(r"^(?:[A-Z][A-Za-z0-9]*(?:[.-][A-Za-z0-9]+)*|mt-[A-Za-z0-9]+|[0-9]+[A-Z][A-Za-z0-9]*Rik)$")
_BARCODE = re.compile(r"[ACGTN]{8,}")


@dataclass(frozen=True)
class GeoSkip:
    """A listed file that is not fetched, and why (kept in ``fetch.json`` and the run report)."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class GeoCandidate:
    """A file that may hold counts: its format ``kind``, its ``sample`` (GSM id or name stem), its size."""

    name: str
    kind: str
    sample: str
    size: int | None = None
    in_tar: bool = False

    @property
    def rank(self) -> int:
        return PREFERENCE.index(self.kind)


@dataclass(frozen=True)
class GeoSelection:
    """What to fetch for one GEO accession: plain files, the ``_RAW.tar`` members, what is skipped."""

    accession: str
    files: tuple[GeoCandidate, ...] = ()
    tar: str | None = None
    tar_size: int | None = None
    members: tuple[GeoCandidate, ...] = ()
    skipped: tuple[GeoSkip, ...] = ()
    # no filelist.txt: the tar's members are chosen while it streams (``members`` is then empty)
    tar_unlisted: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def expected_bytes(self) -> int | None:
        """Bytes that land on disk (files + extracted members); None when a size is unknown."""
        if self.tar_unlisted:
            return None
        sizes = [c.size for c in (*self.files, *self.members)]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"accession": self.accession, "files": [c.name for c in self.files], "tar": self.tar,
                "members": [c.name for c in self.members], "expected_bytes": self.expected_bytes,
                "skipped": [s.to_dict() for s in self.skipped], "notes": list(self.notes)}


def parse_filelist(text: str) -> tuple[tuple[str, int] | None, list[tuple[str, int | None]]]:
    """GEO's ``filelist.txt``: ``((tar name, tar bytes) or None, [(member name, bytes), ...])``.

    The file is tab-separated, ``Archive/File  Name  Time  Size  Type``, one ``Archive`` row for the
    tar and one ``File`` row per member.
    """
    archive: tuple[str, int] | None = None
    members: list[tuple[str, int | None]] = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) < 2 or cols[0].lstrip("#").lower() not in ("archive", "file"):
            continue  # the header, blank lines
        size = next((int(c) for c in cols[2:] if c.isdigit()), None)
        if cols[0].lstrip("#").lower() == "archive":
            archive = (cols[1], size or 0)
        else:
            members.append((cols[1], size))
    return archive, members


def href_name(href: str) -> str | None:
    """The file name an href of a folder listing names, or None for links that are not files of it.

    Sort links (``?C=M``), the parent folder and sub-folders are not files; raises ``ValueError``
    for an href that reaches outside the folder (a path, ``..``, an absolute or foreign URL).
    """
    if href.startswith(("?", "#")) or href in ("../", "./", "/") or href.endswith("/"):
        return None
    parts = urlsplit(href)
    if parts.scheme or parts.netloc or href.startswith("/"):
        raise ValueError(f"{href!r} points outside the listed folder (absolute link)")
    name = unquote(parts.path)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{href!r} points outside the listed folder (a path, not a file name)")
    return name or None


def classify(name: str) -> GeoCandidate | GeoSkip:
    """A candidate for counts (with its kind and sample), or a skip with the reason."""
    if _NOT_COUNTS.search(name):
        return GeoSkip(name, "not count data (image, reads, alignment, document or GEO's file list)")
    if _RAW_TAR.search(name):
        return GeoCandidate(name, "raw_tar", "")
    m = _GSM.match(name)
    lower = name.lower()
    trio = _TRIO.search(name)
    if lower.endswith(".h5ad"):
        kind = "h5ad"
    elif lower.endswith(".loom"):
        kind = "loom"
    elif lower.endswith((".rds", ".rds.gz")):
        kind = "rds"
    elif lower.endswith(".h5"):
        kind = "10x_h5_raw" if re.search(r"raw_(feature|gene)_bc_matri", lower) else "10x_h5"
    elif trio:
        kind = "10x_mtx"
    elif lower.endswith((".tar.gz", ".tgz")):
        kind = "10x_mtx_tar"
    elif re.search(r"\.(csv|tsv|txt)(\.gz)?$", lower):
        kind = "table"
    else:
        return GeoSkip(name, "not a count-matrix format (h5ad, 10x HDF5 or Matrix Market, loom, RDS, csv/tsv/txt)")
    if m:
        sample = m.group(1)
    elif trio:  # a trio without a GSM prefix: its common stem names it
        sample = name[: trio.start()].rstrip("_.-") or "counts"
    else:
        sample = re.sub(r"(\.(h5ad|loom|rds|h5|tar|tgz|csv|tsv|txt|gz))+$", "", name, flags=re.IGNORECASE)
    return GeoCandidate(name, kind, sample)


def select_candidates(candidates: Sequence[GeoCandidate]) -> tuple[list[GeoCandidate], list[GeoSkip]]:
    """GEO rule 3: one format per GSM sample (and one for the files without a GSM prefix)."""
    groups: dict[str, list[GeoCandidate]] = {}
    for c in candidates:
        groups.setdefault(c.sample if _GSM.match(c.sample) else "", []).append(c)
    keep: list[GeoCandidate] = []
    skip: list[GeoSkip] = []
    for group in groups.values():
        best = min(c.rank for c in group)
        chosen = [c for c in group if c.rank == best]
        winner = chosen[0].name
        for c in group:
            if c.rank != best:
                skip.append(GeoSkip(c.name, f"{winner} is preferred: {_LABEL[chosen[0].kind]} beats "
                                            f"{_LABEL[c.kind]} for the same cells (GEO rule 3)"))
        if chosen[0].kind == "table":
            raw = [c for c in chosen if not _NORMALISED.search(c.name)]
            if raw and len(raw) < len(chosen):
                for c in chosen:
                    if c not in raw:
                        skip.append(GeoSkip(c.name, f"named as normalised values; raw counts are taken from "
                                                    f"{raw[0].name} (GEO rule 3)"))
                chosen = raw
        if chosen[0].kind == "10x_mtx":
            chosen, lost = _complete_trios(chosen)
            skip.extend(lost)
        keep.extend(chosen)
    order = {c.name: i for i, c in enumerate(candidates)}
    return sorted(keep, key=lambda c: order[c.name]), skip


def _complete_trios(parts: Sequence[GeoCandidate]) -> tuple[list[GeoCandidate], list[GeoSkip]]:
    """Trio parts grouped by their stem; an incomplete trio is skipped as a whole, with what it lacks."""
    stems: dict[str, list[GeoCandidate]] = {}
    for c in parts:
        m = _TRIO.search(c.name)
        assert m is not None
        stems.setdefault(c.name[: m.start()], []).append(c)
    keep: list[GeoCandidate] = []
    skip: list[GeoSkip] = []
    for group in stems.values():
        roles = {_role(c.name) for c in group}
        missing = sorted({"matrix", "barcodes", "features"} - roles)
        if missing:
            skip.extend(GeoSkip(c.name, f"an incomplete 10x trio (no {' or '.join(missing)} file beside it)")
                        for c in group)
        else:
            keep.extend(group)
    return keep, skip


def _role(name: str) -> str:
    low = name.lower()
    return "matrix" if ".mtx" in low else "barcodes" if "barcodes" in low else "features"


def select_geo(accession: str, hrefs: Iterable[str], *, filelist: str | None = None,
               sizes: Mapping[str, int] | None = None) -> GeoSelection:
    """Apply the GEO rules to a supplementary folder's listing (and the series' ``filelist.txt``).

    Raises
    ------
    ValueError
        Two listed names clean to the same file name (they would overwrite each other).
    """
    from atlasflow.acquire.http import safe_name

    sizes = dict(sizes or {})
    skipped: list[GeoSkip] = []
    candidates: list[GeoCandidate] = []
    tar: GeoCandidate | None = None
    seen: dict[str, str] = {}
    for href in hrefs:
        try:
            name = href_name(href)
        except ValueError as exc:
            skipped.append(GeoSkip(href, f"refused: {exc}"))
            continue
        if name is None:
            continue
        got = classify(name)
        if isinstance(got, GeoSkip):
            skipped.append(got)
            continue
        clean = safe_name(name)
        if clean in seen and seen[clean] != name:
            raise ValueError(f"{seen[clean]!r} and {name!r} both clean to the file name {clean!r}; refusing to let one "
                             "overwrite the other")
        seen[clean] = name
        got = GeoCandidate(got.name, got.kind, got.sample, sizes.get(name))
        if got.kind == "raw_tar":
            tar = got
        else:
            candidates.append(got)
    notes: list[str] = []
    members: list[GeoCandidate] = []
    tar_size: int | None = None
    tar_unlisted = False
    if tar is not None:
        if filelist is None:
            if candidates:
                skipped.append(GeoSkip(tar.name, "no filelist.txt says what it holds, and the folder has count files "
                                                 "of its own (GEO rule 4)"))
                tar = None
            else:
                tar_unlisted = True
                notes.append(f"{tar.name}: no filelist.txt; members are chosen by name while it streams")
        else:
            archive, listed = parse_filelist(filelist)
            tar_size = archive[1] if archive else tar.size
            inner: list[GeoCandidate] = []
            for mname, msize in listed:
                got = classify(mname) if "/" not in mname and ".." not in mname else \
                    GeoSkip(mname, "refused: a member path outside the extraction folder")
                if isinstance(got, GeoSkip) or got.kind == "raw_tar":
                    skipped.append(GeoSkip(f"{tar.name}/{mname}",
                                           got.reason if isinstance(got, GeoSkip) else "a tar inside the tar"))
                    continue
                inner.append(GeoCandidate(mname, got.kind, got.sample, msize, in_tar=True))
            chosen, lost = select_candidates(inner)
            skipped.extend(GeoSkip(f"{tar.name}/{s.name}", s.reason) for s in lost)
            members = chosen
            if not members:
                skipped.append(GeoSkip(tar.name, "filelist.txt lists no count-matrix member"))
                tar = None
            elif candidates:
                for c in candidates:
                    skipped.append(GeoSkip(c.name, f"the per-sample files in {tar.name} hold the series' counts; "
                                                   "this series-level file is the same cells in another layout "
                                                   "(GEO rule 4)"))
                candidates = []
    files, lost = select_candidates(candidates)
    skipped.extend(lost)
    return GeoSelection(accession, tuple(files), tar.name if tar else None, tar_size, tuple(members), tuple(skipped),
                        tar_unlisted, tuple(notes))


# ---- sniffing tables -----------------------------------------------------------------------------

def text_prefix(head: bytes, name: str, *, limit: int = 8 << 20) -> str:
    """The text at the start of a (possibly gzipped, possibly cut) file, at most ``limit`` bytes."""
    if head[:2] == b"\x1f\x8b" or name.lower().endswith(".gz"):
        d = zlib.decompressobj(wbits=47)
        try:
            head = d.decompress(head, limit)
        except zlib.error:
            return ""
    return head[:limit].decode("utf-8", "replace")


def _gene_like(label: str) -> bool:
    label = label.strip().strip('"')
    return bool(_ENSEMBL.match(label) or (_SYMBOL.match(label) and not _BARCODE.search(label)))


def _numeric(value: str) -> float | None:
    v = value.strip().strip('"')
    if v in ("", "NA", "NaN", "nan"):
        return 0.0
    try:
        return float(v)
    except ValueError:
        return None


def sniff_table(text: str, *, max_rows: int = 200) -> str | None:
    """None when the start of a delimited table looks like counts; else why it is not (GEO rule 5).

    Counts: every value after the first column is a non-negative number, and the header or the first
    column names genes (at least half of its labels, and at least 10 of them, are gene symbols or
    Ensembl ids). The last line of ``text`` may be cut, so it is ignored unless it ends the text.
    """
    lines = text.splitlines()
    if lines and not text.endswith("\n") and len(lines) > 1:
        lines = lines[:-1]
    lines = [ln for ln in lines[: max_rows + 1] if ln.strip() and not ln.startswith("#")]
    if len(lines) < 2:
        return "no data rows (a table of counts has a header and rows)"
    sep = "\t" if "\t" in lines[0] else "," if "," in lines[0] else None
    rows = [ln.split(sep) for ln in lines]
    header, body = rows[0], rows[1:]
    for row in body:
        for col, value in enumerate(row[1:], start=1):
            number = _numeric(value)
            column = header[col] if len(header) == len(row) and col < len(header) else f"#{col + 1}"
            if number is None:
                return (f"metadata, not counts: column {column.strip()!r} holds text "
                        f"({value.strip()[:40]!r})")
            if number < 0:
                return f"not counts: negative values ({value.strip()} in column {column.strip()!r})"
    labels_top = [h for h in header[1:] if h.strip()] if len(header) == len(body[0]) else \
        [h for h in header if h.strip()]
    labels_side = [r[0] for r in body]

    def genes(labels: Sequence[str]) -> bool:
        return len(labels) >= 10 and sum(map(_gene_like, labels)) * 2 >= len(labels)

    if genes(labels_top) or genes(labels_side):
        return None
    shown = ", ".join(h.strip().strip('"') for h in labels_top[:4])
    return (f"metadata, not counts: neither its header ({shown}{', …' if len(labels_top) > 4 else ''}) "
            "nor its first column names genes")
