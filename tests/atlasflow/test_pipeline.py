"""The ingest steps called directly, in DAG order, on real cells from the local stand-in server.

These are what the DAG's tasks call; here they run without Airflow so the resume rules (what a
cleared or re-triggered task does) are checked in seconds. tests/integration runs the same steps
under the real scheduler.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlasflow import pipeline as P
from atlasflow.config import load_config
from atlasflow.plan import write_batch_spec
from atlasflow.testing.demo import build_demo
from atlasflow.testing.geo_server import GeoServer


@pytest.fixture
def demo(tmp_path: Path):
    (tmp_path / "www").mkdir()
    with GeoServer(tmp_path / "www") as server:
        build_demo(tmp_path, server.url, n_datasets=4, cells=60, batch_size=2, budget_mb=40, keep_checkpoints=1,
                   missing_at=1)
        config = load_config(tmp_path / "atlasflow.yaml", overrides={"integration.enabled": False,
                                                                    "training.epochs": 1})
        yield config, server


def run_batch(config, batch_id: str, ids: list[str], previous: str | None) -> dict:
    admission = P.admit_batch(config, batch_id, owner="test")
    assert admission["admitted"], admission["reason"]
    processed = [P.process_dataset_step(config, batch_id, P.download_dataset(config, batch_id, d, final_try=True))
                 for d in ids]
    integrated = P.integrate_batch_step(config, batch_id, processed)
    trained = P.train_batch_step(config, batch_id, previous_checkpoint=previous)
    cleaned = P.cleanup_batch(config, batch_id)
    return {"processed": processed, "integrated": integrated, "trained": trained, "cleaned": cleaned}


def test_batches_chain_checkpoints_and_rerun_does_no_work(demo):
    config, server = demo
    plan = P.prepare_run(config)
    assert plan["batches"] == ["batch_0000", "batch_0001", "batch_0002"]
    specs = {b: [d["dataset_id"] for d in json.loads(Path(write_batch_spec(config, b)).read_text())["datasets"]]
             for b in plan["batches"]}
    assert specs["batch_0000"] == ["pbmc_1", "pbmc_gone"]

    first = run_batch(config, "batch_0000", specs["batch_0000"], None)
    assert [p["status"] for p in first["processed"]] == ["ok", "quarantined"]  # the 404 does not fail the batch
    assert first["integrated"]["quarantined"] == {"pbmc_gone": first["processed"][1]["reason"]}
    second = run_batch(config, "batch_0001", specs["batch_0001"], first["trained"]["checkpoint_dir"])
    assert second["trained"]["parent_checkpoint"] == first["trained"]["checkpoint_dir"]
    # keep_checkpoints=1: batch_0000's checkpoint is gone, its record is not
    assert not Path(first["trained"]["checkpoint_dir"]).exists()
    assert P.batch_trained(config, "batch_0000")["checkpoint_dir"] == first["trained"]["checkpoint_dir"]

    transfers = len(server.transfers())
    again = run_batch(config, "batch_0000", specs["batch_0000"], None)
    assert again["trained"] == first["trained"]
    assert all(p.get("skipped") for p in again["processed"] if p["status"] == "ok")
    assert len(server.transfers()) == transfers  # nothing downloaded again
    admission = P.admit_batch(config, "batch_0001", owner="test")
    assert admission["bytes"] == 0 and "trained before" in admission["reason"]

    third = run_batch(config, "batch_0002", specs["batch_0002"], second["trained"]["checkpoint_dir"])
    assert third["trained"]["parent_checkpoint"] == second["trained"]["checkpoint_dir"]
    assert third["trained"]["global_step"] > second["trained"]["global_step"]


def test_a_pruned_previous_checkpoint_is_a_clear_error(demo):
    config, _ = demo
    P.prepare_run(config)
    write_batch_spec(config, "batch_0001")
    with pytest.raises(FileNotFoundError, match="should resume from .*batch_0000, which is gone"):
        P.training_job(config, "batch_0001", previous_checkpoint=str(config.state_dir / ".." / "models" /
                                                                      "checkpoints" / "batch_0000"))


def test_a_dataset_removed_from_the_manifest_is_quarantined_not_fatal(demo):
    config, _ = demo
    P.prepare_run(config)
    assert P.download_dataset(config, "batch_0000", "not_there", final_try=True)["reason"] == "no longer in the manifest"
