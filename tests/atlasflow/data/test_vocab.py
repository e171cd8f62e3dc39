from __future__ import annotations

import json

import pytest

from atlasflow.genes import Vocabulary, build_vocabulary
from atlasflow.testing.realdata import pbmc_counts, write_format
from tests.atlasflow.test_cli import run


def test_default_vocabulary_is_versioned_and_stable():
    v = Vocabulary.default()
    assert len(v) == 765 and v.version == Vocabulary.default().version and len(v.version) == 12
    assert "CD3E" in v.symbol_set()


def test_build_from_a_gene_table_and_a_data_file(tmp_path):
    table = tmp_path / "genes.tsv"
    table.write_text("symbol\tgene_id\nCD3E\tENSG00000198851.3\nNEWGENE\t\n")
    data = write_format(pbmc_counts()[:20], "loom", tmp_path)
    vocab = build_vocabulary([table, data])
    assert vocab.symbols[:2] == ("CD3E", "NEWGENE") and vocab.gene_ids[0] == "ENSG00000198851"
    assert len(vocab) == 766  # pbmc's 765 genes, CD3E once, plus NEWGENE


def test_cli_build_show_and_json_round_trip(tmp_path):
    table = tmp_path / "genes.tsv"
    table.write_text("symbol\tgene_id\nA1\t\nB2\t\n")
    code, out = run("vocab", "build", str(table), "--out", str(tmp_path / "v.json"))
    assert code == 0 and "2 genes" in out
    loaded = Vocabulary.load(tmp_path / "v.json")
    assert loaded.symbols == ("A1", "B2")
    code, out = run("vocab", "show", "--vocab", str(tmp_path / "v.json"))
    assert f"vocabulary {loaded.version}: 2 genes" in out
    data = json.loads((tmp_path / "v.json").read_text())
    data["genes"][1] = "C3"  # edited by hand: the version no longer matches
    (tmp_path / "v.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match its gene list"):
        Vocabulary.load(tmp_path / "v.json")
