"""``atlasflow vocab show|build``: inspect or build the gene vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atlasflow.core.config import load_config
from atlasflow.core.fsutil import write_text_atomic
from atlasflow.prep.genes import DEFAULT_VOCABULARY, Vocabulary, build_vocabulary

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser("vocab", help="inspect or build the gene vocabulary")
    vsub = p.add_subparsers(dest="vocab_command", required=True)
    show = vsub.add_parser("show", help="size, version and first genes of a vocabulary")
    show.add_argument("--vocab", help="vocabulary file or builtin:<name> (default: the config's genes.vocab_path, "
                                      f"else {DEFAULT_VOCABULARY})")
    show.add_argument("--config", help="config file (default $ATLASFLOW_CONFIG)")
    show.set_defaults(func=_cmd_show)
    build = vsub.add_parser("build", help="build a vocabulary from gene tables or data files")
    build.add_argument("inputs", nargs="+", type=Path)
    build.add_argument("--out", required=True, type=Path, help="write here (.tsv or .json)")
    build.set_defaults(func=_cmd_build)


def _cmd_show(args: Any, out: Any) -> int:
    # without --vocab, the vocabulary the pipeline would use: a user's config names it
    vocab = Vocabulary.load(args.vocab or load_config(args.config).genes.vocab_path)
    with_ids = sum(1 for i in vocab.gene_ids if i)
    out.write(f"vocabulary {vocab.version}: {len(vocab)} genes ({with_ids} with Ensembl ids, "
              f"{len(vocab.synonyms)} synonyms); first: {', '.join(vocab.symbols[:8])}\n")
    return 0


def _cmd_build(args: Any, out: Any) -> int:
    vocab = build_vocabulary(args.inputs)
    if args.out.suffix == ".json":
        vocab.save(args.out)
    else:
        write_text_atomic(args.out, vocab.to_tsv())
    out.write(f"wrote {args.out}: {len(vocab)} genes, version {vocab.version}\n")
    return 0
