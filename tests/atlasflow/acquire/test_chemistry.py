"""Chemistry detection for reads rows without a technology, on simulated 10x v2 and v3 reads.

Each chemistry's cells are drawn from its own on-list (two disjoint random lists standing in for
10x's 737K and 3M lists), as real v2 and v3 libraries are; a run whose barcodes are on neither
list, or whose read 1 is too short for any barcode + UMI, is undecidable.
"""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.acquire.chemistry import UndecidableChemistry, detect_chemistry, onlist_for
from atlasflow.acquire.quant import QuantError, quantify
from atlasflow.core.config import QuantConfig
from atlasflow.readers.formats import read_counts
from atlasflow_testing.reads import simulate_10x


@pytest.fixture(scope="module")
def v2_onlist(kb_reference, tmp_path_factory):
    """A 10x v2 stand-in on-list, disjoint from the reference's (v3) list."""
    rng = np.random.default_rng(99)
    taken = set(kb_reference["barcodes"])
    barcodes = sorted({"".join("ACGT"[i] for i in rng.integers(0, 4, 16)) for _ in range(500)} - taken)
    path = tmp_path_factory.mktemp("v2") / "onlist_v2.txt"
    path.write_text("\n".join(barcodes) + "\n")
    return {"path": str(path), "barcodes": barcodes}


def config(kb, v2, **kw) -> QuantConfig:
    return QuantConfig(index=kb["index"], t2g=kb["t2g"], onlist_10xv2=v2["path"], onlist_10xv3=kb["onlist"],
                       threads=1, **kw)


def test_each_chemistry_is_told_by_read_length_and_on_list_share(kb_reference, v2_onlist, tmp_path):
    kb = kb_reference
    v3 = simulate_10x(kb["ref"], tmp_path / "v3", chemistry="10xv3", n_cells=6, whitelist=kb["barcodes"], seed=4)
    found = detect_chemistry([v3.r1], config(kb, v2_onlist))
    assert found.chemistry == "10xv3" and found.shares == {"10xv2": 0.0, "10xv3": 1.0}
    assert (found.reads_sampled, found.r1_min_length) == (v3.n_reads, 28)
    # a v2 library sequenced with a 28 bp read 1 (common): only the on-lists can tell it from v3
    v2 = simulate_10x(kb["ref"], tmp_path / "v2", chemistry="10xv2", n_cells=6, whitelist=v2_onlist["barcodes"],
                      seed=5, r1_length=28)
    assert detect_chemistry([v2.r1], config(kb, v2_onlist)).chemistry == "10xv2"
    # a 26 bp read 1 cannot be v3 (28 bp barcode + UMI): the length filter leaves v2 alone
    short = simulate_10x(kb["ref"], tmp_path / "v2s", chemistry="10xv2", n_cells=6, whitelist=v2_onlist["barcodes"],
                         seed=6)
    found = detect_chemistry([short.r1], config(kb, v2_onlist))
    assert found.chemistry == "10xv2" and found.shares["10xv3"] is None


def test_undecidable_samples_name_their_figures(kb_reference, v2_onlist, tmp_path):
    kb = kb_reference
    cfg = config(kb, v2_onlist)
    stray = simulate_10x(kb["ref"], tmp_path / "stray", n_cells=6, seed=17)  # random barcodes, on no list
    with pytest.raises(UndecidableChemistry) as info:
        detect_chemistry([stray.r1], cfg)
    msg = str(info.value)
    assert "fewer than 10% of barcodes on any on-list" in msg and "10xv2: 0.0% on its on-list" in msg
    assert "10xv3: 0.0% on its on-list" in msg and f"{stray.n_reads} read-1 sequences of 28-28 bp" in msg
    assert info.value.detection.chemistry is None
    too_short = simulate_10x(kb["ref"], tmp_path / "short", n_cells=4, whitelist=kb["barcodes"], r1_length=20, seed=8)
    with pytest.raises(UndecidableChemistry, match=r"read 1 is shorter than any 10x barcode \+ UMI .*20-20 bp"):
        detect_chemistry([too_short.r1], cfg)
    # half the cells on each list: neither wins by the margin
    mixed = simulate_10x(kb["ref"], tmp_path / "mixed", n_cells=6,
                         whitelist=kb["barcodes"][:3] + v2_onlist["barcodes"][:3], seed=9)
    with pytest.raises(UndecidableChemistry, match=r"within a factor 1.5 of each other"):
        detect_chemistry([mixed.r1], cfg)


def test_on_lists_default_to_kb_pythons_own(kb_reference, v2_onlist):
    default = QuantConfig()
    assert onlist_for("10xv3", default).endswith("10x_version3_whitelist.txt.gz")
    assert onlist_for("10xv2", default).endswith("10x_version2_whitelist.txt.gz")
    assert onlist_for("10xv2", config(kb_reference, v2_onlist)) == v2_onlist["path"]
    # quant.onlist (one list for every chemistry, kb count -w) cannot tell chemistries apart: not used
    assert onlist_for("10xv2", QuantConfig(onlist="/x/list.txt")) == onlist_for("10xv2", default)


@pytest.mark.slow
def test_quantify_without_a_technology_detects_and_records_it(kb_reference, v2_onlist, tmp_path):
    kb = kb_reference
    run = simulate_10x(kb["ref"], tmp_path / "raw", chemistry="10xv2", n_cells=8, whitelist=v2_onlist["barcodes"],
                       seed=11)
    summary = quantify(tmp_path / "raw", technology=None, config=config(kb, v2_onlist), work_dir=tmp_path / "work")
    assert (summary["technology"], summary["technology_source"], summary["kb_technology"]) == ("10xv2", "detected",
                                                                                             "10XV2")
    assert summary["detection"]["shares"] == {"10xv2": 1.0, "10xv3": None}
    adata = read_counts(tmp_path / "raw" / "counts")
    assert sorted(b.split("-")[0] for b in adata.obs_names) == sorted(run.barcodes)
    stray = simulate_10x(kb["ref"], tmp_path / "raw2", n_cells=4, seed=12)
    assert stray.r1.exists()
    with pytest.raises(QuantError, match=r"cannot detect the chemistry .*on its on-list"):
        quantify(tmp_path / "raw2", technology=None, config=config(kb, v2_onlist), work_dir=tmp_path / "work2")
    assert not (tmp_path / "raw2" / "counts").exists()


@pytest.mark.slow
def test_seed_style_sra_rows_are_detected_recorded_or_quarantined_with_figures(kb_reference, v2_onlist, tmp_path):
    """sra rows with no technology (the seed manifest's columns) through download → quant → process."""
    import json

    from atlasflow.core.config import load_config
    from atlasflow.intake.plan import write_batch_spec
    from atlasflow.steps import ingest as P
    from atlasflow_testing.geo_server import GeoServer
    from atlasflow_testing.reads import build_fastq_demo, publish_ena

    kb = kb_reference
    (tmp_path / "www").mkdir()
    with GeoServer(tmp_path / "www") as server:
        v2 = simulate_10x(kb["ref"], tmp_path / "sim" / "v2", chemistry="10xv2", n_cells=8,
                          whitelist=v2_onlist["barcodes"], seed=21)
        stray = simulate_10x(kb["ref"], tmp_path / "sim" / "stray", n_cells=5, seed=22)
        publish_ena(tmp_path / "www", "SRR9100000", [v2.r1, v2.r2])
        publish_ena(tmp_path / "www", "SRR9100001", [stray.r1, stray.r2])
        extra = [["seed_v2", "SRR9100000", "sra", "", "", ""], ["seed_stray", "SRR9100001", "sra", "", "", ""]]
        build_fastq_demo(tmp_path, server.url, reference=kb["ref"], index=kb["index"], t2g=kb["t2g"],
                         onlist=kb["onlist"], barcodes=kb["barcodes"], n_samples=0, extra_rows=extra)
        config = load_config(tmp_path / "atlasflow.yaml", overrides={
            "quant.onlist_10xv2": v2_onlist["path"], "quant.onlist_10xv3": kb["onlist"]})
        P.prepare_run(config)
        write_batch_spec(config, "batch_0000")
        assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
        fetched = [P.download_dataset(config, "batch_0000", d, final_try=True) for d in ("seed_v2", "seed_stray")]
        quant = [P.quant_dataset_step(config, "batch_0000", f) for f in fetched]
    assert quant[0]["status"] == "ok"
    assert (quant[0]["quant"]["technology"], quant[0]["quant"]["technology_source"]) == ("10xv2", "detected")
    assert quant[1]["status"] == "quarantined" and quant[1]["stage"] == "quant"
    assert "cannot detect the chemistry (fewer than 10% of barcodes on any on-list)" in quant[1]["reason"]
    assert "10xv2: 0.0% on its on-list, 10xv3: 0.0% on its on-list" in quant[1]["reason"]
    processed = P.process_dataset_step(config, "batch_0000", quant[0])
    assert processed["status"] == "ok" and processed["cells_after"] == 8
    tomb = json.loads((config.state_dir / "tombstones" / "seed_v2.json").read_text())
    assert (tomb["technology"], tomb["technology_source"]) == ("10xv2", "detected")
    assert tomb["detection"]["shares"] == {"10xv2": 1.0, "10xv3": None}
