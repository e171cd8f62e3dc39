"""`atlasflow dataset run ID`: one seed-format row through the DAG's own steps against the local GEO
stand-in, one JSON line out, and nothing left behind that a pipeline run would read."""

from __future__ import annotations

import io
import json

import pytest

from atlasflow.cli.main import main
from atlasflow.core.config import load_config
from atlasflow.model.sizing import model_artifacts
from atlasflow.prep.genes import Vocabulary
from atlasflow.storage import Ledger
from atlasflow_testing.seed import served_seed


def run(*argv: str) -> tuple[int, dict | None]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) <= 1, lines  # one JSON line, nothing else on stdout
    return code, json.loads(lines[0]) if lines else None


@pytest.fixture
def seed(tmp_path):
    with served_seed(tmp_path) as (server, info):
        yield str(tmp_path / "atlasflow.yaml"), server, info


def leftovers(config) -> list[str]:
    base = config.base_dir
    found = [p for p in (base / "data").rglob("*") if p.is_file()]
    found += [p for p in (config.state_dir / "batches").glob("*")] + [p for p in (config.state_dir / "stages").glob("*")]
    found += [p for p in (config.state_dir / "quarantine").glob("*")]
    return [str(p.relative_to(base)) for p in found]


def test_a_direct_and_a_geo_row_are_processed_and_leave_nothing_behind(seed):
    cfg, _, info = seed
    config = load_config(cfg)
    tomb = config.state_dir / "tombstones" / "seed_geo.json"
    tomb.parent.mkdir(parents=True)
    tomb.write_text('{"dataset_id": "seed_geo", "from": "an earlier pipeline run"}')
    code, direct = run("dataset", "run", "seed_direct", "--config", cfg)
    assert code == 0, direct
    assert (direct["status"], direct["stage"], direct["reason"]) == ("processed", "process", None)
    assert direct["cells_before"] == info["cells"]["seed_direct"] and 0 < direct["cells_after"] <= direct["cells_before"]
    assert direct["download_bytes"] == info["bytes"]["seed_direct"] and direct["size_source"] == "head"
    assert direct["reserved_bytes"] > direct["download_bytes"] and direct["processed_bytes"] > 0
    code, geo = run("dataset", "run", "seed_geo", "--config", cfg)
    assert code == 0 and geo["status"] == "processed" and geo["cells_before"] == info["cells"]["seed_geo"]
    assert geo["size_source"] == "geo"
    assert leftovers(config) == []
    assert tomb.read_text() == '{"dataset_id": "seed_geo", "from": "an earlier pipeline run"}'  # restored
    assert not (config.state_dir / "tombstones" / "seed_direct.json").exists()
    assert Ledger(config.storage).reservations() == []  # released


def test_a_bad_row_is_quarantined_with_its_reason_and_exit_0(seed):
    cfg, _, _ = seed
    code, gone = run("dataset", "run", "seed_gone", "--config", cfg)
    assert code == 0 and (gone["status"], gone["stage"]) == ("quarantined", "download")
    assert "404" in gone["reason"] and gone["cells_before"] is None and gone["size_source"] == "default"
    assert leftovers(load_config(cfg)) == []  # the trial's quarantine record is not the pipeline's


def test_keep_leaves_the_processed_file(seed):
    cfg, _, _ = seed
    code, kept = run("dataset", "run", "seed_direct", "--config", cfg, "--keep")
    assert code == 0 and kept["path"].endswith("data/processed/trial_seed_direct/seed_direct.h5ad")
    import anndata as ad

    assert ad.read_h5ad(kept["path"]).n_obs == kept["cells_after"]


def test_unknown_rows_and_bad_configs_exit_2_and_a_full_budget_exits_1(seed, tmp_path, capsys):
    cfg, _, _ = seed
    code, line = run("dataset", "run", "nope", "--config", cfg)
    assert code == 2 and line is None and "no row 'nope'" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("storage:\n  max_storage_gb: -1\n")
    assert run("dataset", "run", "seed_direct", "--config", str(tmp_path / "bad.yaml"))[0] == 2
    import re

    text = (tmp_path / "atlasflow.yaml").read_text()
    for key, gb in (("max_storage", 0.001), ("data", 0.0005), ("models", 0.0004), ("cache", 0.00005),
                    ("outputs", 0.00005)):
        text = re.sub(rf"{key}_gb: .*", f"{key}_gb: {gb}", text)
    # 1 MB: less than the reservation of a row of unknown size (storage.unknown_size_gb, 20 MB), ever
    (tmp_path / "small.yaml").write_text(text)
    code, refused = run("dataset", "run", "seed_gone", "--config", str(tmp_path / "small.yaml"))
    assert code == 1 and refused["status"] == "not_admitted" and "can never be admitted" in refused["reason"]


def test_a_dataset_being_fetched_is_not_tried_at_once(seed):
    cfg, _, _ = seed
    raw = load_config(cfg).base_dir / "data" / "raw" / "seed_direct"
    raw.mkdir(parents=True)
    (raw / "seed_direct.h5ad.part").write_bytes(b"half")  # a pipeline download in flight
    code, busy = run("dataset", "run", "seed_direct", "--config", cfg)
    assert code == 1 and busy["status"] == "busy" and "is fetching seed_direct" in busy["reason"]
    assert (raw / "seed_direct.h5ad.part").read_bytes() == b"half"  # untouched


def test_a_trial_reserves_no_model_artefacts(seed, tmp_path):
    """A trial is never trained or integrated, so it reserves its files only, not the computed
    checkpoint/scVI reservation a pipeline batch holds (1.09 GB with the cpu preset's human vocabulary)."""
    cfg, _, info = seed
    computed = tmp_path / "computed.yaml"  # the seed config's fixed 1 MB override removed
    computed.write_text("".join(line for line in open(cfg) if "checkpoint_gb" not in line))
    config = load_config(computed)
    artefacts = model_artifacts(config, len(Vocabulary.load(config.genes.vocab_path))).bytes()
    assert config.storage.checkpoint_gb is None and artefacts > 5_000_000
    code, trial = run("dataset", "run", "seed_direct", "--config", str(computed))
    assert code == 0 and trial["status"] == "processed", trial
    assert trial["download_bytes"] == info["bytes"]["seed_direct"] < trial["reserved_bytes"] < artefacts
