from __future__ import annotations

import json
import random

import pytest

from atlasflow.core.config import load_config
from atlasflow.intake.manifest import read_manifest
from atlasflow.intake.plan import BatchPlan, freeze_plan, load_plan, make_plan, save_plan, write_batch_spec
from tests.atlasflow.conftest import direct_rows


def ids(plan: BatchPlan) -> list[list[str]]:
    return [list(b.dataset_ids) for b in plan.batches]


def test_batches_of_batch_size_in_manifest_order(manifest_csv):
    plan = make_plan(read_manifest(manifest_csv(direct_rows(7))), batch_size=3)
    assert [b.batch_id for b in plan.batches] == ["batch_0000", "batch_0001", "batch_0002"]
    assert ids(plan) == [["ds000", "ds001", "ds002"], ["ds003", "ds004", "ds005"], ["ds006"]]
    assert plan.batches[0].expected_bytes == 3_000_000 and not plan.changes


def test_byte_cap_closes_batches_early(manifest_csv):
    rows = direct_rows(5)
    sizes = [4, 4, 9, 15, 1]  # GB; cap 10 GB
    for row, size in zip(rows, sizes, strict=True):
        row[4] = f"{size} GB"
    plan = make_plan(read_manifest(manifest_csv(rows)), batch_size=3, max_batch_bytes=10 * 10**9)
    # 4+4 fit, +9 would pass 10; 9 alone; 15 is over the cap on its own and gets its own batch; then 1
    assert ids(plan) == [["ds000", "ds001"], ["ds002"], ["ds003"], ["ds004"]]


def test_unknown_size_makes_batch_size_unknown(manifest_csv):
    rows = direct_rows(2)
    rows[1][4] = ""
    assert make_plan(read_manifest(manifest_csv(rows)), batch_size=2).batches[0].expected_bytes is None


def test_appending_rows_appends_batches(tmp_path, manifest_csv):
    first = make_plan(read_manifest(manifest_csv(direct_rows(4))), batch_size=3)
    saved = load_plan(save_plan(first, tmp_path / "plan.json"))
    grown = make_plan(read_manifest(manifest_csv(direct_rows(6))), batch_size=3, previous=saved)
    # the partial batch_0001 stays partial: it may already have been trained
    assert ids(grown) == [["ds000", "ds001", "ds002"], ["ds003"], ["ds004", "ds005"]]
    assert [b.sealed for b in grown.batches] == [True, True, False]
    assert [b.batch_id for b in grown.new_batches] == ["batch_0002"]
    assert not grown.changes


def test_reordering_rows_changes_nothing(tmp_path, manifest_csv):
    saved = load_plan(save_plan(make_plan(read_manifest(manifest_csv(direct_rows(6))), batch_size=2), tmp_path / "p.json"))
    shuffled = direct_rows(6)
    random.Random(1).shuffle(shuffled)
    again = make_plan(read_manifest(manifest_csv(shuffled)), batch_size=2, previous=saved)
    assert ids(again) == ids(saved) and not again.changes


def test_removed_and_edited_rows_are_reported_not_replanned(tmp_path, manifest_csv):
    saved = load_plan(save_plan(make_plan(read_manifest(manifest_csv(direct_rows(4))), batch_size=2), tmp_path / "p.json"))
    rows = direct_rows(4)
    del rows[1]  # ds001 removed from batch_0000
    rows[2][1] = "https://example.org/other/ds003.h5ad"  # ds003 edited in batch_0001
    rows[0][4] = 5  # expected_bytes is not part of a row's identity: no report
    again = make_plan(read_manifest(manifest_csv(rows)), batch_size=2, previous=saved)
    assert ids(again) == ids(saved)
    changes = {(c.kind, c.dataset_id, c.batch_id) for c in again.changes}
    assert changes == {("removed", "ds001", "batch_0000"), ("edited", "ds003", "batch_0001")}
    edited = next(c for c in again.changes if c.kind == "edited")
    assert "download_url" in edited.detail and "other/ds003" in edited.detail
    # the edit keeps being reported on the next plan too: saving does not launder it
    later = make_plan(read_manifest(manifest_csv(rows)), batch_size=2, previous=load_plan(save_plan(again, tmp_path / "p.json")))
    assert {c.dataset_id for c in later.changes} == {"ds001", "ds003"}


def test_random_append_sequences_never_renumber(tmp_path, manifest_csv):
    rng = random.Random(7)
    total, previous, history = 0, None, []
    for _ in range(12):
        total += rng.randint(0, 5)
        rows = direct_rows(total)
        if not rows:
            continue
        plan = make_plan(read_manifest(manifest_csv(rows)), batch_size=rng.randint(1, 4), previous=previous)
        for old, new in zip(history, plan.batches, strict=False):
            assert old == (new.batch_id, new.dataset_ids)
        assert sorted(d for b in plan.batches for d in b.dataset_ids) == [r[0] for r in rows]
        history = [(b.batch_id, b.dataset_ids) for b in plan.batches]
        previous = load_plan(save_plan(plan, tmp_path / "p.json"))


def test_save_is_atomic_and_round_trips(tmp_path, manifest_csv):
    plan = make_plan(read_manifest(manifest_csv(direct_rows(5))), batch_size=2)
    path = save_plan(plan, tmp_path / "state" / "plan.json")
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]
    loaded = load_plan(path)
    assert ids(loaded) == ids(plan) and loaded.manifest_sha256 == plan.manifest_sha256
    assert load_plan(tmp_path / "none.json") is None


@pytest.mark.parametrize("text", ["{not json", json.dumps({"version": 99, "batches": []}),
                                  json.dumps({"version": 1, "batch_size": 2, "batches": [
                                      {"index": 1, "batch_id": "batch_0001", "dataset_ids": []}]})])
def test_unreadable_saved_plan_is_a_clear_error(tmp_path, text):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="not a readable batch plan"):
        load_plan(path)


def test_invalid_arguments(manifest_csv):
    m = read_manifest(manifest_csv(direct_rows(1)))
    with pytest.raises(ValueError):
        make_plan(m, batch_size=0)
    with pytest.raises(ValueError):
        make_plan(m, batch_size=1, max_batch_bytes=0)


def test_freeze_plan_and_batch_spec(tmp_path, manifest_csv):
    path = manifest_csv(direct_rows(5))
    config = load_config(overrides={"storage.base_dir": str(tmp_path / "base"), "manifest.path": str(path),
                                    "plan.batch_size": 2})
    summary = freeze_plan(config)
    assert summary["batches"] == ["batch_0000", "batch_0001", "batch_0002"] and summary["datasets"] == 5
    assert summary["plan_path"] == str(config.plan_path)
    spec = json.loads(open(write_batch_spec(config, "batch_0001")).read())
    assert [d["dataset_id"] for d in spec["datasets"]] == ["ds002", "ds003"]
    assert spec["datasets"][0]["download_url"] == "https://example.org/files/ds002.h5ad"
    # a row removed later is left out of the spec and named
    rows = direct_rows(5)
    del rows[3]
    manifest_csv(rows)
    again = freeze_plan(config)
    assert any("ds003" in c and "removed" in c for c in again["changes"])
    spec = json.loads(open(write_batch_spec(config, "batch_0001")).read())
    assert [d["dataset_id"] for d in spec["datasets"]] == ["ds002"] and spec["removed"] == ["ds003"]
    with pytest.raises(KeyError):
        write_batch_spec(config, "batch_0099")
