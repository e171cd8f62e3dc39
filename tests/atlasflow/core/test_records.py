"""Every state path comes from core/records: the layout docs/contracts.md documents."""

from __future__ import annotations

from pathlib import Path

from atlasflow.core import records as R
from atlasflow.core.config import load_config


def test_state_paths_are_the_documented_layout(tmp_path):
    state = Path("/base/state")
    assert R.trained_path(state, "batch_0001") == state / "trained" / "batch_0001.json"
    assert R.quarantine_path(state, "GSE1") == state / "quarantine" / "GSE1.json"
    assert R.tombstone_path(state, "GSE1") == state / "tombstones" / "GSE1.json"
    assert R.batch_spec_path(state, "batch_0001") == state / "batches" / "batch_0001.json"
    assert R.pinned_vocab_path(state) == state / "vocab.json"
    assert R.jobs_dir(state, "batch_0001") == state / "jobs" / "batch_0001"
    assert R.jobs_path(state, "batch_0001") == state / "jobs" / "batch_0001" / "jobs.json"
    assert R.stage_path(state, "process", "batch_0001", "GSE1") == state / "stages" / "batch_0001" / "process" / "GSE1.json"
    assert R.stage_path(state, "train", "batch_0001") == state / "stages" / "batch_0001" / "train" / "_batch.json"
    assert R.rejected_path(state) == state / "retrain" / "rejected.json"
    assert R.retrain_triggered_path(state) == state / "retrain" / "triggered.json"
    assert R.retrain_decisions_path(state) == state / "retrain" / "decisions.jsonl"


def test_tombstones_under_state_are_the_layouts_tombstones(tmp_path):
    from atlasflow.core.layout import StorageLayout

    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    layout = StorageLayout.of(config.storage.base_dir)
    assert R.tombstone_path(config.state_dir, "GSE1") == layout.tombstones / "GSE1.json"


def test_quarantine_and_trained_records_round_trip(tmp_path):
    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    assert R.quarantine_record(config, "GSE1") is None and R.batch_trained(config, "batch_0000") is None
    info = R.record_quarantine(config, "batch_0000", "GSE1", "download", "404")
    assert info == {"dataset_id": "GSE1", "batch_id": "batch_0000", "status": "quarantined", "stage": "download",
                    "reason": "404"}
    assert R.quarantine_record(config, "GSE1") == info and R.quarantine_path(config.state_dir, "GSE1").exists()
    R.record_trained(config, "batch_0000", {"checkpoint_dir": "/c"})
    assert R.batch_trained(config, "batch_0000") == {"checkpoint_dir": "/c"}
