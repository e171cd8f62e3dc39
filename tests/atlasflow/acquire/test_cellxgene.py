"""CELLxGENE Discover as a source, against a local stand-in of its Curation API serving real cells."""

from __future__ import annotations

import io
import json
from pathlib import Path

import anndata as ad
import pytest

from atlasflow.acquire.cellxgene import list_collection, resolve_dataset
from atlasflow.acquire.fetch import FetchError, TransientFetchError, fetch_dataset
from atlasflow.cli.main import main
from atlasflow.core.config import DownloadConfig, load_config
from atlasflow.core.records import quarantine_path
from atlasflow.intake.manifest import Dataset, ManifestError, read_manifest
from atlasflow.intake.plan import write_batch_spec
from atlasflow.steps import ingest as P
from atlasflow.storage import StorageLayout
from atlasflow_testing.cellxgene_server import MOUSE, CellxgeneServer, PublishedDataset, write_cellxgene_h5ad
from atlasflow_testing.realdata import pbmc_counts

COLLECTION = "0b8c4a52-2b6e-4a3d-9d4e-6c1f0e7a9b11"
V3 = ("10x 3' v3", "EFO:0009922")


@pytest.fixture(scope="module")
def discover(tmp_path_factory):
    """A collection of three datasets: all 700 PBMCs (10x v1), 200 of them again as 10x v3, 100 as mouse."""
    root = tmp_path_factory.mktemp("cxg")
    cells = pbmc_counts()
    written = {
        "pbmc": write_cellxgene_h5ad(cells, root / "assets" / "pbmc.h5ad"),
        "v3": write_cellxgene_h5ad(cells[:200], root / "assets" / "v3.h5ad", donors=("D3",)),
        "mouse": write_cellxgene_h5ad(cells[:100], root / "assets" / "mouse.h5ad", organism=MOUSE),
    }
    published = {
        "pbmc": PublishedDataset(root / "assets" / "pbmc.h5ad", title="PBMC 68k", cell_count=700, donors=("D1", "D2")),
        "v3": PublishedDataset(root / "assets" / "v3.h5ad", title="PBMC v3", assay=V3, cell_count=200, donors=("D3",)),
        "mouse": PublishedDataset(root / "assets" / "mouse.h5ad", title="Mouse blood", organism=MOUSE,
                                  cell_count=100),
    }
    with CellxgeneServer(root) as server:
        server.publish(COLLECTION, list(published.values()))
        yield server, published, written


def row_env(tmp_path: Path, server: CellxgeneServer, rows: list[str], **overrides) -> object:
    """A base_dir, a manifest of ``rows`` (CSV lines) and a config pointing at the stand-in, planned."""
    (tmp_path / "manifest.csv").write_text("dataset_id,download_url,type,species,expected_bytes\n" + "\n".join(rows) + "\n")
    config = load_config(overrides={
        "storage.base_dir": str(tmp_path / "base"), "storage.max_storage_gb": 0.2, "storage.data_gb": 0.1,
        "storage.models_gb": 0.08, "storage.cache_gb": 0.01, "storage.outputs_gb": 0.01, "storage.min_free_gb": 0,
        "storage.checkpoint_gb": 0.001, "storage.unknown_size_gb": 0.01, "manifest.path": str(tmp_path / "manifest.csv"),
        "download.cellxgene_api_url": server.api_url, "download.backoff_s": 0.01, "download.attempts": 2,
        "genes.vocab_path": "builtin:pbmc68k", "qc.min_genes": 10, "qc.min_cells": 3, "qc.max_pct_mito": 20,
        **overrides})
    P.prepare_run(config)
    write_batch_spec(config, "batch_0000")
    assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
    return config


def test_a_dataset_id_resolves_to_its_h5ad_asset_and_metadata(discover):
    server, published, _ = discover
    d = published["pbmc"]
    found = resolve_dataset(d.dataset_id, base_url=server.api_url, timeout_s=5)
    assert found.url == f"{server.url}/assets/pbmc.h5ad" and found.filesize == d.path.stat().st_size
    assert found.dataset_version_id == d.dataset_version_id and found.collection_id == COLLECTION
    assert found.organism == ("Homo sapiens",) and found.organism_ontology_term_id == ("NCBITaxon:9606",)
    assert found.species == "Homo sapiens" and found.assay == ("10x 3' v1",) and found.cell_count == 700
    name, datasets, left_out = list_collection(COLLECTION, base_url=server.api_url, timeout_s=5)
    assert name == "PBMC atlas" and [x.dataset_id for x in datasets] == [p.dataset_id for p in published.values()]
    assert left_out == []


def test_manifest_rows_of_type_cellxgene_are_validated(tmp_path, discover):
    _, published, _ = discover
    uid = published["pbmc"].dataset_id
    (tmp_path / "m.csv").write_text("dataset_id,download_url,type,format\n"
                                    f"good,{uid.upper()},cellxgene,\n"
                                    "url,https://cellxgene.cziscience.com/e/x.cxg,cellxgene,\n"
                                    "short,0123abcd,cellxgene,\n"
                                    f"csv,{uid},cellxgene,csv\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(tmp_path / "m.csv")
    lines = caught.value.lines()
    assert len(lines) == 3
    assert "row 3, column 'download_url': a cellxgene row takes a CELLxGENE Discover dataset id (a UUID), not a URL" in lines[0]
    assert "row 4, column 'download_url': '0123abcd' is not a CELLxGENE dataset id" in lines[1]
    assert "row 5, column 'format': a cellxgene row is the dataset's H5AD asset" in lines[2]
    (tmp_path / "ok.csv").write_text(f"dataset_id,download_url,type\ngood,{uid.upper()},cellxgene\n")
    good = read_manifest(tmp_path / "ok.csv").datasets[0]
    assert (good.download_url, good.format, good.format_inferred) == (uid, "h5ad", True)  # ids are lower case


def test_a_cellxgene_row_downloads_and_processes_with_the_schema_columns(tmp_path, discover):
    server, published, written = discover
    d = published["pbmc"]
    config = row_env(tmp_path, server, [f"cxg_pbmc,{d.dataset_id},cellxgene,,"])
    fetched = P.download_dataset(config, "batch_0000", "cxg_pbmc", final_try=True)
    assert fetched["status"] == "ok" and fetched["bytes"] == d.path.stat().st_size, fetched
    raw = StorageLayout.of(config.storage.base_dir).raw_dir("cxg_pbmc")
    recorded = json.loads((raw / "fetch.json").read_text())
    assert recorded["source"] == "cellxgene" and recorded["cellxgene"]["dataset_version_id"] == d.dataset_version_id
    done = P.process_dataset_step(config, "batch_0000", fetched)
    assert done["status"] == "ok", done
    assert done["cells_before"] == written["pbmc"]["cells"] == 700
    out = ad.read_h5ad(done["path"])
    assert out.n_obs == done["cells_after"] > 600
    # donor_id → batch, cell_type → the labels, organism → species: each cell keeps its own
    donors = {name.split(":", 1)[1]: donor for name, donor in zip(out.obs_names, out.obs["batch"], strict=True)}
    src = ad.read_h5ad(d.path, backed="r")
    assert all(src.obs.loc[cell, "donor_id"] == donor for cell, donor in donors.items())
    assert set(out.obs["batch"]) == {"D1", "D2"}
    assert set(out.obs["cell_type"]) <= set(written["pbmc"]["cell_types"]) and out.obs["cell_type"].nunique() == 10
    assert all(src.obs.loc[name.split(":", 1)[1], "cell_type"] == label
               for name, label in zip(out.obs_names, out.obs["cell_type"], strict=True))
    assert set(out.obs["species"]) == {"Homo sapiens"} and set(out.obs["tissue_type"]) == {"blood"}
    # the genes were read from raw.X by their symbols (feature_name), not the normalised X
    assert done["coverage"]["vocab_fraction"] > 0.9 and not done.get("non_integer")


def test_a_mouse_dataset_is_refused_before_a_byte_is_fetched(tmp_path, discover):
    server, published, _ = discover
    config = row_env(tmp_path, server, [f"cxg_mouse,{published['mouse'].dataset_id},cellxgene,,"])
    before = len([t for t in server._server.transfers if t["path"] == "/assets/mouse.h5ad"])
    got = P.download_dataset(config, "batch_0000", "cxg_mouse", final_try=True)
    assert got["status"] == "quarantined" and got["stage"] == "download"
    assert "not human: CELLxGENE lists organism 'Mus musculus' (NCBITaxon:10090); " in got["reason"]
    assert "no genes.species_mapping is configured" in got["reason"]
    assert len([t for t in server._server.transfers if t["path"] == "/assets/mouse.h5ad"]) == before


def _versions(server, published, key, edit):
    entry = server.dataset_json(COLLECTION, published[key])
    return [edit(entry)]


@pytest.mark.parametrize(("case", "answer", "reason"), [
    ("no H5AD asset", lambda s, p: (200, _versions(s, p, "pbmc", lambda e: {**e, "assets": [
        a for a in e["assets"] if a["filetype"] != "H5AD"]})), "has no H5AD asset (assets: RDS)"),
    ("not JSON", lambda s, p: (200, b"<html>maintenance</html>"), "is not JSON"),
    ("wrong JSON", lambda s, p: (200, {"detail": "moved"}), "expected a list, got dict"),
    ("404", lambda s, p: (404, {"detail": "Resource not found"}), "CELLxGENE has no dataset"),
    ("410", lambda s, p: (410, {"detail": "gone"}), "CELLxGENE withdrew dataset"),
    ("no versions", lambda s, p: (200, []), "lists no published version"),
    ("asset not http", lambda s, p: (200, _versions(s, p, "pbmc", lambda e: {**e, "assets": [
        {"filetype": "H5AD", "url": "file:///etc/passwd", "filesize": 10}]})), "has no http(s) url"),
    ("bigger than reserved", lambda s, p: (200, _versions(s, p, "pbmc", lambda e: {**e, "assets": [
        {**e["assets"][0], "filesize": 10**12}]})), "more than the"),
])
def test_bad_api_answers_quarantine_the_dataset_with_the_reason(tmp_path, discover, case, answer, reason):
    server, published, _ = discover
    d = published["pbmc"]
    config = row_env(tmp_path, server, [f"cxg_bad,{d.dataset_id},cellxgene,,"])
    server.override(f"datasets/{d.dataset_id}/versions", *answer(server, published))
    try:
        got = P.download_dataset(config, "batch_0000", "cxg_bad", final_try=False)
    finally:
        server._server.overrides.clear()
    assert got["status"] == "quarantined" and got["stage"] == "download", got
    assert reason in got["reason"] and ("cxg_bad" in got["reason"] or d.dataset_id in got["reason"]), got["reason"]
    assert reason in json.loads(quarantine_path(config.state_dir, "cxg_bad").read_text())["reason"]


def test_a_failing_api_is_transient_and_a_short_asset_is_refused(tmp_path, discover):
    server, published, _ = discover
    d = published["v3"]
    config = DownloadConfig(cellxgene_api_url=server.api_url, attempts=1, backoff_s=0.01)
    row = Dataset("cxg", d.dataset_id, "cellxgene", 2, format="h5ad")
    server.override(f"datasets/{d.dataset_id}/versions", 503, {"detail": "busy"})
    with pytest.raises(TransientFetchError, match="HTTP 503"):
        fetch_dataset(row, tmp_path / "a", config=config, max_bytes=10**9)
    server._server.overrides.clear()
    # the API announces one byte more than the file has: what arrived is deleted, not used
    entry = server.dataset_json(COLLECTION, d)
    entry["assets"][0]["filesize"] += 1
    server.override(f"datasets/{d.dataset_id}/versions", 200, [entry])
    try:
        with pytest.raises(FetchError, match="CELLxGENE announced"):
            fetch_dataset(row, tmp_path / "b", config=config, max_bytes=10**9)
    finally:
        server._server.overrides.clear()
    assert not list((tmp_path / "b").glob("*.h5ad"))
    got = fetch_dataset(row, tmp_path / "c", config=config, max_bytes=10**9)
    assert got.bytes == d.path.stat().st_size and tuple(got.cellxgene["assay"]) == ("10x 3' v3",)


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_from_cellxgene_writes_manifest_rows_with_filters(tmp_path, discover, capsys, monkeypatch):
    server, published, _ = discover
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"download:\n  cellxgene_api_url: {server.api_url}\n")
    code, out = run("manifest", "from-cellxgene", "--collection", COLLECTION, "--config", str(cfg), "--json")
    assert code == 0
    every = json.loads(out)
    assert [r["dataset_id"] for r in every["rows"]] == [p.dataset_id for p in published.values()]
    pbmc = every["rows"][0]
    assert pbmc["expected_bytes"] == published["pbmc"].path.stat().st_size and pbmc["species"] == "Homo sapiens"
    assert (pbmc["type"], pbmc["batch_key"], pbmc["cell_type_key"]) == ("cellxgene", "donor_id", "cell_type")

    def ids(*filters: str) -> list[str]:
        code, out = run("manifest", "from-cellxgene", "--collection", COLLECTION, "--config", str(cfg), "--json",
                        *filters)
        assert code == 0
        return [r["dataset_id"] for r in json.loads(out)["rows"]]

    human = [published["pbmc"].dataset_id, published["v3"].dataset_id]
    assert ids("--organism", "human") == ids("--organism", "Homo sapiens") == ids("--organism", "NCBITaxon:9606") == human
    assert ids("--organism", "mouse") == [published["mouse"].dataset_id]
    assert ids("--assay", "10x 3' V3") == ids("--assay", "EFO:0009922") == [published["v3"].dataset_id]
    assert ids("--organism", "human", "--assay", "EFO:0009901") == [published["pbmc"].dataset_id]
    assert ids("--organism", "zebrafish") == []

    out_file = tmp_path / "cxg.csv"
    code, _ = run("manifest", "from-cellxgene", "--collection", COLLECTION, "--config", str(cfg), "--organism", "human",
                  "--out", str(out_file))
    assert code == 0 and "2 of 3 datasets as manifest rows" in capsys.readouterr().err
    manifest = read_manifest(out_file)  # what `atlasflow manifest check` accepts
    assert [(d.type, d.format, d.expected_bytes) for d in manifest] == [
        ("cellxgene", "h5ad", published[k].path.stat().st_size) for k in ("pbmc", "v3")]


def test_from_cellxgene_reports_unusable_datasets_and_bad_collections(tmp_path, discover, capsys):
    server, published, _ = discover
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"download:\n  cellxgene_api_url: {server.api_url}\n")
    entries = [server.dataset_json(COLLECTION, p) for p in published.values()]
    entries[1]["assets"] = [a for a in entries[1]["assets"] if a["filetype"] == "RDS"]
    server.override(f"collections/{COLLECTION}", 200, {"name": "x", "datasets": entries})
    try:
        code, out = run("manifest", "from-cellxgene", "--collection", COLLECTION, "--config", str(cfg), "--json")
    finally:
        server._server.overrides.clear()
    got = json.loads(out)
    assert code == 0 and len(got["rows"]) == 2 and len(got["left_out"]) == 1
    assert f"dataset {published['v3'].dataset_id} has no H5AD asset" in got["left_out"][0]
    missing = "11111111-2222-3333-4444-555555555555"
    code, _ = run("manifest", "from-cellxgene", "--collection", missing, "--config", str(cfg))
    assert code == 2 and f"CELLxGENE has no collection {missing} (HTTP 404" in capsys.readouterr().err
    code, _ = run("manifest", "from-cellxgene", "--collection", "not-a-uuid", "--config", str(cfg))
    assert code == 2 and "is not a CELLxGENE collection id" in capsys.readouterr().err
