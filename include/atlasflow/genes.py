"""The shared gene vocabulary and mapping each dataset's genes onto it.

A vocabulary is an ordered list of upper-case gene symbols, optionally with Ensembl ids; its
version is a hash of that list, so a checkpoint can say exactly which vocabulary it was trained
on. Datasets name genes by symbol or by Ensembl id (``ENSG…``, version suffix ignored); both map.
Coverage is reported per dataset, and a dataset covering too little of the vocabulary is
quarantined by the caller rather than crashing training.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from atlasflow.fsutil import write_json_atomic

__all__ = ["GeneMapping", "Vocabulary", "map_genes"]

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

    @property
    def version(self) -> str:
        text = "\n".join(f"{s}\t{i or ''}" for s, i in zip(self.symbols, self.gene_ids, strict=True))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_genes(cls, symbols: Sequence[str], gene_ids: Sequence[str | None] | None = None) -> Vocabulary:
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
        return cls(tuple(out_s), tuple(out_i))

    @classmethod
    def default(cls) -> Vocabulary:
        text = resources.files("atlasflow").joinpath("data/vocab_default.tsv").read_text()
        return cls._from_tsv_text(text, "the packaged default vocabulary")

    @classmethod
    def load(cls, path: str | Path | None) -> Vocabulary:
        """Load a ``.tsv`` (``symbol[\\tgene_id]`` with a header) or ``.json`` vocabulary; ``None``: the default."""
        if path is None:
            return cls.default()
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the vocabulary ({exc.strerror or exc})") from exc
        if path.suffix == ".json":
            data = json.loads(text)
            try:
                vocab = cls.from_genes(data["genes"], data.get("gene_ids"))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}: not a vocabulary ({exc})") from exc
            if data.get("version") and data["version"] != vocab.version:
                raise ValueError(f"{path}: version {data['version']} does not match its gene list ({vocab.version})")
            return vocab
        return cls._from_tsv_text(text, str(path))

    @classmethod
    def _from_tsv_text(cls, text: str, source: str) -> Vocabulary:
        rows = [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not rows or rows[0][0].strip().lower() != "symbol":
            raise ValueError(f"{source}: expected a header line starting with 'symbol'")
        body = rows[1:]
        return cls.from_genes([r[0] for r in body], [r[1].strip() if len(r) > 1 else None for r in body])

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "genes": list(self.symbols), "gene_ids": list(self.gene_ids)}

    def save(self, path: Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    def symbol_set(self) -> set[str]:
        return set(self.symbols)


@dataclass(frozen=True)
class GeneMapping:
    """Where each dataset gene goes in the vocabulary (``-1``: not in it) and how much is covered."""

    positions: tuple[int, ...]
    matched_by_id: int
    vocab_fraction: float  # share of vocabulary genes the dataset has

    @property
    def mapped(self) -> int:
        return sum(p >= 0 for p in self.positions)

    def to_dict(self) -> dict[str, Any]:
        return {"genes": len(self.positions), "mapped": self.mapped, "matched_by_id": self.matched_by_id,
                "vocab_fraction": round(self.vocab_fraction, 4)}


def map_genes(names: Sequence[str], vocab: Vocabulary, *, gene_ids: Sequence[str] | None = None) -> GeneMapping:
    """Map dataset genes (symbols or Ensembl ids, plus optional id column) onto ``vocab``.

    When two dataset genes map to the same vocabulary gene, the first keeps it; later ones are
    dropped (their counts are left out rather than double-counted).
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
    return GeneMapping(tuple(positions), via_id, len(taken) / len(vocab))


def _genes_of(path: Path) -> tuple[list[str], list[str | None]]:
    """Gene symbols (and ids) from a gene table (``symbol[,gene_id]`` header) or any readable data file."""
    if path.suffix in (".tsv", ".csv", ".txt") and path.stat().st_size < 50_000_000:
        first = path.read_text().splitlines()[0:1]
        sep = "\t" if first and "\t" in first[0] else ","
        if first and first[0].split(sep)[0].strip().lower() == "symbol":
            rows = [line.split(sep) for line in path.read_text().splitlines()[1:] if line.strip()]
            return [r[0] for r in rows], [r[1].strip() if len(r) > 1 and r[1].strip() else None for r in rows]
    from atlasflow.formats import open_counts

    src = open_counts(path)
    try:
        return list(src.genes), list(src.gene_ids) if src.gene_ids else [None] * len(src.genes)
    finally:
        src.close()


def build_vocabulary(paths: Sequence[Path]) -> Vocabulary:
    """The union of genes of ``paths`` (gene tables or data files), in first-seen order."""
    symbols: list[str] = []
    ids: list[str | None] = []
    for path in paths:
        s, i = _genes_of(path)
        symbols += s
        ids += i
    return Vocabulary.from_genes(symbols, ids)


def register(sub: Any) -> None:
    p = sub.add_parser("vocab", help="inspect or build the gene vocabulary")
    vsub = p.add_subparsers(dest="vocab_command", required=True)
    show = vsub.add_parser("show", help="size, version and first genes of a vocabulary")
    show.add_argument("--vocab", help="vocabulary file (default: the packaged one)")
    show.set_defaults(func=_cmd_show)
    build = vsub.add_parser("build", help="build a vocabulary from gene tables or data files")
    build.add_argument("inputs", nargs="+", type=Path)
    build.add_argument("--out", required=True, type=Path, help="write here (.tsv or .json)")
    build.set_defaults(func=_cmd_build)


def _cmd_show(args: Any, out: Any) -> int:
    vocab = Vocabulary.load(args.vocab)
    with_ids = sum(1 for i in vocab.gene_ids if i)
    out.write(f"vocabulary {vocab.version}: {len(vocab)} genes ({with_ids} with Ensembl ids); "
              f"first: {', '.join(vocab.symbols[:8])}\n")
    return 0


def _cmd_build(args: Any, out: Any) -> int:
    from atlasflow.fsutil import write_text_atomic

    vocab = build_vocabulary(args.inputs)
    if args.out.suffix == ".json":
        vocab.save(args.out)
    else:
        lines = ["symbol\tgene_id"] + [f"{s}\t{i or ''}" for s, i in zip(vocab.symbols, vocab.gene_ids, strict=True)]
        write_text_atomic(args.out, "\n".join(lines) + "\n")
    out.write(f"wrote {args.out}: {len(vocab)} genes, version {vocab.version}\n")
    return 0
