"""Datasets that are not human are set aside, with the evidence, unless an ortholog table maps them.

Mouse-like data are made from real cells (pbmc68k_reduced) by spelling their symbols the mouse
way (``Cd3e`` for ``CD3E``): exactly the case where upper-casing would silently "map" them.
"""

from __future__ import annotations

import pytest

from atlasflow.core.config import load_config
from atlasflow.intake.manifest import Dataset
from atlasflow.prep.genes import OrthologTable, Vocabulary, dataset_species, map_genes, normalize_species
from atlasflow.prep.process import DatasetQuarantined, process_dataset
from atlasflow_testing.realdata import pbmc_counts, write_format

VOCAB = Vocabulary.builtin("pbmc68k")
CONFIG = load_config(overrides={"qc.min_genes": 10, "genes.vocab_path": "builtin:pbmc68k"})


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Two raw datasets of the same 100 real cells: human symbols, and the same symbols mouse-style."""
    root = tmp_path_factory.mktemp("species")
    pbmc = pbmc_counts()[:100].copy()
    write_format(pbmc, "h5ad", root / "human")
    mouse = pbmc.copy()
    mouse.var_names = [g.capitalize() for g in pbmc.var_names]  # CD3E -> Cd3e
    write_format(mouse, "10x_mtx_dir", root / "mouse")
    return root


def process(raw_dir, tmp_path, config=CONFIG, **row):
    ds = Dataset(raw_dir.name, f"https://h/{raw_dir.name}", "direct", 2, **row)
    return process_dataset(raw_dir, ds, config=config, out_path=tmp_path / "out" / f"{raw_dir.name}.h5ad",
                           vocab=VOCAB, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("value", ["human", "Homo sapiens", "HSAPIENS", "9606", "homo_sapiens", None, ""])
def test_human_spellings_of_the_species_column(value):
    assert dataset_species(value, ["CD3E", "C1orf112"]) == ("human", "")


def test_what_says_a_dataset_is_not_human():
    assert normalize_species("Mus musculus") == normalize_species("10090") == "mouse"
    assert dataset_species("Mouse", ["CD3E"]) == ("mouse", "the manifest's species is 'Mouse'")
    species, evidence = dataset_species(None, ["Actb", "Cd3e", "Gapdh", "Lyz2", "H2-K1"])
    assert species == "mouse" and evidence == "4 of 5 gene symbols are mouse-style (Actb, Cd3e, Gapdh, …)"
    # the genes win over a manifest that says human: they are what would be mapped
    assert dataset_species("human", ["ENSMUSG00000029580"])[0] == "mouse"
    # a few mixed-case names in human data are not mouse-style: human ORFs, lower-case oddities
    assert dataset_species(None, ["C1orf112", "CXorf21", "ACTB", "ms4a1"])[0] == "human"


def test_upper_casing_is_not_a_mapping():
    names = ["Cd3e", "Ms4a1", "Lyz", "CD74"]
    assert map_genes(names, VOCAB).mapped == 0  # CD74 too: the dataset as a whole is mouse-style
    assert map_genes([n.upper() for n in names], VOCAB).mapped == 4


def test_mouse_style_dataset_is_quarantined_naming_the_evidence(raw, tmp_path):
    with pytest.raises(DatasetQuarantined) as caught:
        process(raw / "mouse", tmp_path)
    reason = caught.value.reason
    # 17 capitalised names stay human-style (ORFs like C1orf228, and F12), hence 748
    assert reason.startswith("mouse (data_mtx): not human: 748 of 765 gene symbols are mouse-style (Hes4, ")
    assert "no genes.species_mapping is configured" in reason and "mouse_symbol, human_symbol" in reason
    assert not (tmp_path / "out" / "mouse.h5ad").exists()


def test_species_column_quarantines_and_a_human_dataset_passes(raw, tmp_path):
    with pytest.raises(DatasetQuarantined, match=r"human \(data.h5ad\): not human: the manifest's species is "
                                                 r"'Mus musculus'; no genes.species_mapping"):
        process(raw / "human", tmp_path, species="Mus musculus")
    summary = process(raw / "human", tmp_path, species="Homo sapiens")
    assert summary["status"] == "ok" and summary["coverage"]["genes_mapped"] > 600
    assert "orthologs" not in summary["coverage"]


def test_an_ortholog_table_maps_a_mouse_dataset_and_only_through_itself(raw, tmp_path):
    table = tmp_path / "mouse_to_human.tsv"
    pairs = [(g.capitalize(), g) for g in VOCAB.symbols[:500]]  # only 500 of the 765 genes have orthologs
    pairs.append((VOCAB.symbols[600].capitalize(), "NOT_IN_VOCAB"))
    pairs += [("Dup1", "CD3E"), ("Dup1", "CD3D")]  # one mouse gene, two human ones: left out
    table.write_text("# test table\nmouse_symbol\thuman_symbol\n" + "".join(f"{m}\t{h}\n" for m, h in pairs))
    loaded = OrthologTable.load(table)
    assert loaded.species == "mouse" and loaded.ambiguous == 1 and loaded.lookup("CD3E") == "CD3E"
    mapped = process(raw / "mouse", tmp_path, config=CONFIG.with_overrides({"genes.species_mapping": str(table)}))
    assert mapped["coverage"]["orthologs"] == f"mouse via {table}"
    assert 0 < mapped["coverage"]["genes_mapped"] <= 500  # not the 765 that upper-casing would give
    # a table for another species does not apply
    rat = tmp_path / "rat.tsv"
    rat.write_text("rat_symbol,human_symbol\nCd3e,CD3E\n")
    with pytest.raises(DatasetQuarantined, match="genes.species_mapping .*rat.tsv. maps rat genes, not mouse"):
        process(raw / "mouse", tmp_path, config=CONFIG.with_overrides({"genes.species_mapping": str(rat)}))
    bad = tmp_path / "bad.tsv"
    bad.write_text("symbol\thuman\nCd3e\tCD3E\n")
    with pytest.raises(ValueError, match="expected a header '<species>_symbol, human_symbol'"):
        OrthologTable.load(bad)
