"""GEO as it really is: every layout of atlasflow_testing.geo_corpus through the real download and
process steps (real cells, the local GEO stand-in), each processed with the right cells and samples
or quarantined with a reason that names the file."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pytest

from atlasflow.core.config import load_config
from atlasflow.intake.plan import write_batch_spec
from atlasflow.steps import ingest as P
from atlasflow_testing.geo_corpus import LAYOUTS, build_corpus, write_corpus_config
from atlasflow_testing.geo_server import GeoServer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("geo_corpus")
    (root / "www").mkdir()
    with GeoServer(root / "www") as server:
        layouts = build_corpus(root / "www" / "geo")
        config = load_config(write_corpus_config(root, server.url, layouts))
        P.prepare_run(config)
        spec = json.loads(Path(write_batch_spec(config, "batch_0000")).read_text())
        assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
        results = {}
        for row in spec["datasets"]:
            fetched = P.download_dataset(config, "batch_0000", row["dataset_id"], final_try=True)
            results[row["dataset_id"]] = (fetched, P.process_dataset_step(config, "batch_0000", fetched))
        yield config, results, server


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.accession for lay in LAYOUTS])
def test_each_layout_ends_processed_or_quarantined_with_a_reason(corpus, layout):
    config, results, _ = corpus
    fetched, processed = results[layout.accession]
    if layout.cells is None:
        assert processed["status"] == "quarantined" and processed["stage"] == layout.stage, processed
        for word in layout.reason:
            assert word in processed["reason"], processed["reason"]
        return
    assert processed["status"] == "ok", processed.get("reason")
    assert processed["cells_before"] == layout.cells, layout.what
    out = ad.read_h5ad(processed["path"])
    if layout.samples:
        # every cell carries its GSM sample, which is also its batch
        assert sorted(out.obs["sample"].unique()) == sorted(layout.samples)
        assert (out.obs["sample"].astype(str) == out.obs["batch"].astype(str)).all()
    else:
        assert "sample" not in out.obs and set(out.obs["batch"]) == {layout.accession}


@pytest.mark.slow
def test_skips_are_recorded_with_reasons_and_no_tar_is_kept(corpus):
    config, results, server = corpus
    fetched, _ = results["GSE910001"]
    skipped = "\n".join(fetched["skipped_files"])
    assert "GSE910001_RAW.tar/GSM9100011_tsne.png: not count data" in skipped
    assert "GSE910001_RAW.tar/GSM9100014_cell_annotations.tsv.gz: " in skipped and "holds text" in skipped
    assert "GSE910001_README.txt: the per-sample files in GSE910001_RAW.tar" in skipped
    fetched3, _ = results["GSE910003"]
    assert any(s.startswith("GSE910003_matrix.mtx.gz: GSE910003_filtered_feature_bc_matrix.h5 is preferred")
               for s in fetched3["skipped_files"])
    fetched12, _ = results["GSE910012"]
    assert any(s.startswith("GSM9100122_counts.h5ad: sample GSM9100122 is Mus musculus per GEO's records")
               for s in fetched12["skipped_files"]), fetched12
    fetched2, _ = results["GSE910002"]
    assert any("GSM9100022_raw_feature_bc_matrix.h5: GSM9100022_filtered_feature_bc_matrix.h5 is preferred" in s
               for s in fetched2["skipped_files"])
    # the tars streamed once each, and were never written: only members landed under data/raw
    tars = [t for t in server.transfers() if t["path"].endswith("_RAW.tar")]
    assert sorted(t["path"].rsplit("/", 1)[1] for t in tars) == ["GSE910001_RAW.tar", "GSE910002_RAW.tar",
                                                                  "GSE910011_RAW.tar"]
    base = Path(config.storage.base_dir)
    assert not [p for p in base.rglob("*") if p.name.endswith(".tar") or ".extracting" in p.name]
    # a README beside a preferred format is never requested; a table is sniffed from a ranged GET
    assert server.hits("/geo/series/GSE910nnn/GSE910003/suppl/README.txt") == 0
    metadata = [t for t in server.transfers() if t["path"].endswith("GSE910004_metadata.tsv.gz")]
    assert len(metadata) == 1 and not (base / "data/raw/GSE910004/GSE910004_metadata.tsv.gz").exists()
