"""The ``@stage`` decorator and the stage record it writes (the run report's raw material)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from atlasflow.core.records import BATCH_SCOPE, stage_path
from atlasflow.core.runlog import RecordAlso, StageStatus, read_stages, record_stage, stage


@dataclass(frozen=True)
class _Config:
    """What ``@stage`` needs of an AtlasConfig: its state folder."""

    state_dir: Path


def _on_disk(state: Path, stage_name: str, batch_id: str, dataset_id: str | None = None) -> dict[str, Any]:
    return json.loads(stage_path(state, stage_name, batch_id, dataset_id).read_text())


def test_stage_records_start_end_status_and_result_fields(tmp_path):
    @stage("download")
    def step(config: _Config, batch_id: str, dataset_id: str, *, final_try: bool) -> dict[str, Any]:
        running = _on_disk(config.state_dir, "download", batch_id, dataset_id)
        assert running["status"] == "running" and running["ended"] is None  # written before the body runs
        return {"dataset_id": dataset_id, "status": "ok", "bytes": 123, "files": 2, "not_kept": "x"}

    result = step(_Config(tmp_path), "batch_0000", "GSE1", final_try=True)

    assert result == {"dataset_id": "GSE1", "status": "ok", "bytes": 123, "files": 2, "not_kept": "x"}
    record = _on_disk(tmp_path, "download", "batch_0000", "GSE1")
    assert record["status"] == "ok" and record["stage"] == "download" and record["dataset_id"] == "GSE1"
    assert record["batch_id"] == "batch_0000" and record["attempts"] == 1
    assert record["ended"] >= record["started"] and record["seconds"] == pytest.approx(
        record["ended"] - record["started"], abs=1e-3)
    assert record["bytes"] == 123 and record["files"] == 2 and "not_kept" not in record  # a record, not an XCom
    assert set(record) >= {"host", "pid"}


def test_stage_record_format_is_what_record_stage_writes(tmp_path):
    """The decorator is record_stage around the function: the same keys, so ops/report.py reads both."""
    @stage("cleanup")
    def step(config: _Config, batch_id: str) -> dict[str, Any]:
        return {"batch_id": batch_id, "trained": True, "released": True}

    step(_Config(tmp_path / "a"), "batch_0000")
    with record_stage(tmp_path / "b", "cleanup", "batch_0000") as out:
        out.update({"batch_id": "batch_0000", "trained": True, "released": True})
    decorated, plain = _on_disk(tmp_path / "a", "cleanup", "batch_0000"), _on_disk(tmp_path / "b", "cleanup", "batch_0000")
    assert set(decorated) == set(plain)
    varying = {"started", "ended", "seconds"}
    assert {k: v for k, v in decorated.items() if k not in varying} == {k: v for k, v in plain.items() if k not in varying}
    assert stage_path(tmp_path / "a", "cleanup", "batch_0000").name == f"{BATCH_SCOPE}.json"


def test_stage_records_a_failure_and_re_raises(tmp_path):
    @stage("integrate")
    def step(config: _Config, batch_id: str) -> dict[str, Any]:
        raise ValueError("scVI ran out of cells")

    with pytest.raises(ValueError, match="out of cells"):
        step(_Config(tmp_path), "batch_0001")
    record = _on_disk(tmp_path, "integrate", "batch_0001")
    assert record["status"] == StageStatus.FAILED == "failed"
    assert record["error"] == "ValueError: scVI ran out of cells" and record["ended"] is not None


@pytest.mark.parametrize(("result", "status"), [
    ({"status": "quarantined", "reason": "no cells"}, "quarantined"),
    ({"admitted": False, "reason": "does not fit yet"}, "waiting"),
    ({"admitted": True, "already_trained": True}, "skipped"),
    ({"status": "skipped", "reason": "no usable dataset"}, "skipped"),
    ({"batch_id": "batch_0000"}, "ok"),  # no status key: the work was done
])
def test_the_result_decides_the_record_status(tmp_path, result, status):
    @stage("admit")
    def step(config: _Config, batch_id: str) -> dict[str, Any]:
        return result

    step(_Config(tmp_path), "batch_0000")
    assert _on_disk(tmp_path, "admit", "batch_0000")["status"] == status


def test_a_re_run_that_finds_the_work_done_keeps_the_record_of_the_run_that_did_it(tmp_path):
    calls: list[str] = []

    @stage("process", dataset_id=lambda args: args["fetched"]["dataset_id"])
    def step(config: _Config, batch_id: str, fetched: dict[str, Any]) -> dict[str, Any]:
        calls.append(fetched["dataset_id"])
        if len(calls) > 1:
            return {"dataset_id": "GSE2", "status": "ok", "skipped": "already processed"}
        return {"dataset_id": "GSE2", "status": "ok", "cells_after": 50}

    step(_Config(tmp_path), "batch_0000", {"dataset_id": "GSE2"})
    first = _on_disk(tmp_path, "process", "batch_0000", "GSE2")
    assert step(_Config(tmp_path), "batch_0000", {"dataset_id": "GSE2"})["skipped"] == "already processed"
    assert _on_disk(tmp_path, "process", "batch_0000", "GSE2") == first
    assert [r["dataset_id"] for r in read_stages(tmp_path)] == ["GSE2"]


def test_record_also_goes_to_the_record_only(tmp_path):
    trained = {"batch_id": "batch_0000", "checkpoint_dir": "/ckpt/batch_0000", "global_step": 7}

    @stage("train")
    def step(config: _Config, batch_id: str, *, previous_checkpoint: str | None) -> Any:
        return RecordAlso(trained, {"skipped": f"{batch_id} already trained"})

    assert step(_Config(tmp_path), "batch_0000", previous_checkpoint=None) is trained  # XCom: the result, unchanged
    record = _on_disk(tmp_path, "train", "batch_0000")
    assert record["status"] == "skipped" and record["skipped"] == "batch_0000 already trained"
    assert record["checkpoint_dir"] == "/ckpt/batch_0000" and record["global_step"] == 7


def test_stage_keeps_the_function_name_and_docstring_and_checks_its_arguments():
    @stage("cleanup")
    def cleanup_batch(config: _Config, batch_id: str) -> dict[str, Any]:
        """Doc."""
        return {}

    assert cleanup_batch.__name__ == "cleanup_batch" and cleanup_batch.__doc__ == "Doc."
    with pytest.raises(TypeError, match="batch_id"):
        @stage("cleanup")
        def no_batch(config: _Config) -> dict[str, Any]:
            return {}


def test_stage_status_values_are_the_words_on_disk_and_in_the_report():
    assert [s.value for s in StageStatus] == ["running", "ok", "skipped", "waiting", "quarantined", "failed"]
    assert json.dumps({"status": StageStatus.WAITING}) == '{"status": "waiting"}'
    with pytest.raises(ValueError):
        StageStatus("done")  # an unknown status is an error, not a new word in the report
