from __future__ import annotations

import json

import pytest

from atlasflow.prep.genes import Vocabulary, build_vocabulary
from atlasflow_testing.realdata import pbmc_counts, write_format
from tests.atlasflow.cli.test_cli import run


def test_default_vocabulary_is_the_human_one():
    from atlasflow.core.config import load_config

    v = Vocabulary.default()
    assert len(v) == 19_927 and v.source == "builtin:human_grch38_ens100" and len(v.version) == 12
    assert load_config().genes.vocab_path is None and Vocabulary.load(None).version == v.version
    code, out = run("vocab", "show")
    assert code == 0 and f"vocabulary {v.version}: 19927 genes" in out


def test_show_uses_the_configs_vocabulary(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("genes:\n  vocab_path: builtin:pbmc68k\n")
    small = Vocabulary.builtin("pbmc68k")
    code, out = run("vocab", "show", "--config", str(config))
    assert code == 0 and f"vocabulary {small.version}: 765 genes" in out
    monkeypatch.setenv("ATLASFLOW_CONFIG", str(config))
    code, out = run("vocab", "show")
    assert code == 0 and f"vocabulary {small.version}: 765 genes" in out


def test_small_vocabulary_is_versioned_and_stable():
    v = Vocabulary.builtin("pbmc68k")  # the demo's and the tests', set explicitly in their configs
    assert len(v) == 765 and v.version == Vocabulary.load("builtin:pbmc68k").version and len(v.version) == 12
    assert "CD3E" in v.symbol_set() and v.describe() == f"builtin:pbmc68k (version {v.version}, 765 genes)"


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


# ---- the packaged human vocabulary and synonym matching ------------------------------------------

HUMAN = "builtin:human_grch38_ens100"


def test_human_vocabulary_is_packaged_with_ids_and_synonyms():
    v = Vocabulary.load(HUMAN)
    assert len(v) == 19_927 and v.version == "825072f1f5a0"  # changes only when the data file does
    assert all(i and i.startswith("ENSG") for i in v.gene_ids)
    assert v.gene_ids[v.symbols.index("CD3E")] == "ENSG00000198851"
    assert sum(s.startswith("MT-") for s in v.symbols) == 13  # the mitochondrial protein-coding genes
    assert v.synonyms["IGJ"] == "JCHAIN" and v.synonyms["ADRBK1"] == "GRK2"
    assert Vocabulary.builtin("pbmc68k").synonyms == {} and len(Vocabulary.builtin("pbmc68k")) == 765


def test_unknown_builtin_names_the_packaged_ones():
    with pytest.raises(ValueError, match="builtin:nope: no such packaged vocabulary.*builtin:human_grch38_ens100"):
        Vocabulary.load("builtin:nope")


def test_real_pbmc_genes_map_through_previous_symbols():
    from atlasflow.prep.genes import map_genes

    v = Vocabulary.load(HUMAN)
    names = list(pbmc_counts().var_names)  # 10x's 2016 (hg19-era) gene names
    m = map_genes(names, v)
    assert m.mapped == 737 and m.matched_by_synonym == 45
    assert m.positions[names.index("IGJ")] == v.symbols.index("JCHAIN")  # plasma-cell marker, renamed 2012
    unmapped = {n for n, p in zip(names, m.positions, strict=True) if p < 0}
    assert "NEAT1" in unmapped  # a lncRNA: outside a protein-coding vocabulary


@pytest.mark.parametrize("order", [("ADRBK1", "GRK2"), ("GRK2", "ADRBK1")])
def test_a_gene_measured_under_its_own_name_beats_an_old_name(order):
    from atlasflow.prep.genes import map_genes

    v = Vocabulary.load(HUMAN)
    m = map_genes(list(order), v)
    got = dict(zip(order, m.positions, strict=True))
    assert got["GRK2"] == v.symbols.index("GRK2") and got["ADRBK1"] == -1 and m.matched_by_synonym == 0


def test_ensembl_ids_with_version_suffix_map_by_id():
    from atlasflow.prep.genes import map_genes

    v = Vocabulary.load(HUMAN)
    m = map_genes(["ENSG00000198851.9", "ENSG00000156738"], v)
    assert m.positions == (v.symbols.index("CD3E"), v.symbols.index("MS4A1")) and m.matched_by_id == 2


def test_synonym_tables_drop_ambiguity_and_round_trip(tmp_path):
    from atlasflow.prep.genes import map_genes

    table = tmp_path / "genes.tsv"
    table.write_text(
        "symbol\tgene_id\tprevious\taliases\n"
        "AAA\tENSG00000000001\tOLD1\tSHARED;BBB\n"  # alias BBB is another gene's own symbol
        "BBB\tENSG00000000002\t\tSHARED\n"  # SHARED names two genes: ambiguous
        "CCC\t\tOLD1X\tOLD1\n"  # OLD1 is AAA's previous symbol and CCC's alias: previous wins
    )
    v = Vocabulary.load(table)
    assert dict(v.synonyms) == {"OLD1": "AAA", "OLD1X": "CCC"}
    assert map_genes(["OLD1", "SHARED", "old1x"], v).positions == (0, -1, 2)
    again = tmp_path / "again.tsv"
    again.write_text(v.to_tsv())
    pinned = v.save(tmp_path / "vocab.json")
    for other in (Vocabulary.load(again), Vocabulary.load(pinned)):
        assert other.version == v.version and dict(other.synonyms) == dict(v.synonyms)
    code, out = run("vocab", "build", str(table), "--out", str(tmp_path / "built.tsv"))
    assert code == 0 and dict(Vocabulary.load(tmp_path / "built.tsv").synonyms) == dict(v.synonyms)
    code, out = run("vocab", "show", "--vocab", HUMAN)
    assert code == 0 and "19927 genes (19927 with Ensembl ids, 39860 synonyms)" in out


def test_json_with_a_synonym_outside_the_vocabulary_is_refused(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"genes": ["A"], "synonyms": {"OLD": "B"}}))
    with pytest.raises(ValueError, match="synonyms point at genes not in the vocabulary: B"):
        Vocabulary.load(path)


def test_config_keeps_a_builtin_name_as_is(tmp_path):
    from atlasflow.core.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"genes: {{vocab_path: '{HUMAN}'}}\n")
    assert load_config(cfg).genes.vocab_path == HUMAN


def test_processing_real_cells_against_the_human_vocabulary(tmp_path):
    from atlasflow.core.config import load_config
    from atlasflow.intake.manifest import Dataset
    from atlasflow.prep.process import DatasetQuarantined, process_dataset

    v = Vocabulary.load(HUMAN)
    write_format(pbmc_counts(), "h5ad", tmp_path / "raw")
    ds = Dataset("pbmc", "https://h/x.h5ad", "direct", 2)

    def go(coverage: float):
        config = load_config(overrides={"qc.min_genes": 10, "qc.min_vocab_coverage": coverage})
        return process_dataset(tmp_path / "raw", ds, config=config, out_path=tmp_path / "out" / "pbmc.h5ad",
                               vocab=v, cache_dir=tmp_path / "cache")

    # 765 genes are 3.7 % of 19,927: the default threshold sets the dataset aside with the numbers
    with pytest.raises(DatasetQuarantined, match=r"cover 3\.7% of the vocabulary .*825072f1f5a0, 19927 genes"):
        go(0.5)
    summary = go(0.02)
    import anndata as ad

    out = ad.read_h5ad(summary["path"])
    assert set(out.var_names) <= v.symbol_set() and "JCHAIN" in out.var_names and "IGJ" not in out.var_names
    assert out.uns["atlasflow"]["vocab_version"] == v.version
    assert summary["coverage"]["matched_by_synonym"] == 45 and summary["coverage"]["genes_mapped"] <= 737


def test_a_gzipped_gene_table_bomb_is_refused_in_bounded_memory(tmp_path, monkeypatch):
    """Issue 16 point 4: a gene table (vocabulary, ortholog table, `vocab build` input) decompresses to at
    most genes.MAX_TABLE_BYTES; it was inflated whole with gzip.decompress."""
    import gzip

    from atlasflow.prep import genes
    from atlasflow.prep.genes import OrthologTable

    monkeypatch.setattr(genes, "MAX_TABLE_BYTES", 1 << 20)
    bomb = tmp_path / "genes.tsv.gz"
    bomb.write_bytes(gzip.compress(b"symbol\tgene_id\n" + b"A" * (8 << 20)))
    with pytest.raises(ValueError, match=r"genes\.tsv\.gz: cannot read the vocabulary \(genes\.tsv\.gz: decompresses "
                                         r"to over 1048576 bytes"):
        Vocabulary.load(bomb)
    with pytest.raises(ValueError, match=r"cannot read the ortholog table .*decompresses to over 1048576 bytes"):
        OrthologTable.load(bomb)
    with pytest.raises(ValueError, match=r"genes\.tsv\.gz: .*decompresses to over 1048576 bytes.*not a gene table"):
        build_vocabulary([bomb])
    small = tmp_path / "small.tsv.gz"
    small.write_bytes(gzip.compress(b"symbol\tgene_id\nCD3E\tENSG00000198851\nMS4A1\tENSG00000156738\n"))
    assert list(Vocabulary.load(small).symbols[:2]) == ["CD3E", "MS4A1"]  # control: a real table still loads
