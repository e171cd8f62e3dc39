"""Processed bytes per downloaded byte, per input format (what the storage ledger learns at run time).

The same real cells (pbmc68k_reduced counts, 700 cells) are written in every supported format and
processed with the default QC; the factor is processed-h5ad bytes / input bytes. These seed
expectations only: the ledger records the factor of every real dataset it processes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> dict:
    from atlasflow.core.config import load_config
    from atlasflow.core.layout import tree_bytes
    from atlasflow.intake.manifest import Dataset
    from atlasflow.prep.genes import Vocabulary
    from atlasflow.prep.process import process_dataset
    from atlasflow_testing.realdata import WRITABLE_FORMATS, pbmc_counts, write_format

    config = load_config(overrides={"qc.min_genes": 10, "genes.vocab_path": "builtin:pbmc68k"})
    pbmc = pbmc_counts()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="atlasflow-bench-exp-") as tmp:
        for fmt in WRITABLE_FORMATS:
            raw = Path(tmp) / fmt / "raw"
            path = write_format(pbmc, fmt, raw)
            raw_bytes = tree_bytes(path)
            summary = process_dataset(raw, Dataset("d", "https://h/x", "direct", 2), config=config,
                                      out_path=Path(tmp) / fmt / "out.h5ad", vocab=Vocabulary.builtin("pbmc68k"),
                                      cache_dir=Path(tmp) / fmt / "cache")
            rows[fmt] = {"input_bytes": raw_bytes, "processed_bytes": summary["processed_bytes"],
                         "factor": round(summary["processed_bytes"] / raw_bytes, 3)}
            sys.stdout.write(f"expansion[{fmt}]: {raw_bytes} -> {summary['processed_bytes']} bytes, "
                             f"factor {rows[fmt]['factor']}\n")
    result = {"benchmark": "expansion_factors", "data": "pbmc68k_reduced counts, 700 cells x 765 genes", "formats": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "expansion_factors.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
