"""atlasflow.steps.retrain without Airflow: splits, pseudo-labels, change detection, and promote/keep decided
on real checkpoints (1 epoch on real pbmc cells) against a deliberately damaged one."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from atlasflow.core.config import load_config
from atlasflow.core.fsutil import write_json_atomic
from atlasflow.intake.plan import write_batch_spec
from atlasflow.steps import ingest as P
from atlasflow.steps import retrain as R
from atlasflow.storage import Cleaner, Ledger
from atlasflow_testing.demo import build_demo
from atlasflow_testing.geo_server import GeoServer
from tests.atlasflow.ops.test_notify import WebhookServer
from tests.atlasflow.steps.test_ingest import run_batch


def test_splits_are_deterministic_stable_and_disjoint():
    ids = [f"ds{i:04d}" for i in range(2000)]
    first = R.assign_splits(ids, canary_fraction=0.3)
    assert first == R.assign_splits(reversed(ids), canary_fraction=0.3)  # order does not matter
    assert set(first) == set(ids) and set(first.values()) == {"validation", "canary"}  # one split each
    assert 0.26 < sum(v == "canary" for v in first.values()) / len(ids) < 0.34
    # adding datasets never moves one that was already assigned
    more = R.assign_splits(ids + [f"new{i}" for i in range(500)], canary_fraction=0.3)
    assert all(more[k] == v for k, v in first.items())
    # the salt changes the assignment; fractions 0 and 1 put everything in one split
    assert R.assign_splits(ids, canary_fraction=0.3, seed=1) != first
    assert set(R.assign_splits(ids, canary_fraction=0.0).values()) == {"validation"}
    assert set(R.assign_splits(ids, canary_fraction=1.0).values()) == {"canary"}


def _row(cell, ds, label, conf, **kw) -> dict:
    return {"cell_id": cell, "dataset_id": ds, "predicted_label": label, "confidence": conf, **kw}


def test_pseudo_labels_above_the_threshold_with_provenance(tmp_path):
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    with (feedback / "a.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["Cell ID", "dataset_id", "predicted_label", "confidence", "source", "checkpoint"])
        w.writeheader()
        w.writerow({"Cell ID": "c1", "dataset_id": "d1", "predicted_label": "B", "confidence": "0.95",
                    "source": "svc", "checkpoint": "batch_0003"})
        w.writerow({"Cell ID": "c2", "dataset_id": "d1", "predicted_label": "T", "confidence": "0.9"})  # not above
        w.writerow({"Cell ID": "c3", "dataset_id": "d1", "predicted_label": "NK", "confidence": "0.99"})
        w.writerow({"Cell ID": "c4", "dataset_id": "d1", "predicted_label": "", "confidence": "0.99"})  # refused
        w.writerow({"Cell ID": "c5", "dataset_id": "d1", "predicted_label": "B", "confidence": "high"})  # refused
    # the design doc's per-prediction JSON (class_id), and a list of them
    (feedback / "b.json").write_text(json.dumps(
        [_row("c1", "d1", "B", 0.97, source="review"),  # duplicate of a.csv's c1, more confident: wins
         _row("c3", "d1", "T", 0.98),  # disagrees with a.csv's confident NK: the cell is dropped
         {"cell_id": "c9", "dataset_id": "d2", "class_id": "Mono", "confidence": 0.91},
         _row("c7", "held", "B", 0.99),  # a held-out dataset: never a training label
         _row("c8", "d2", "B", 1.5)]))
    (feedback / "broken.json").write_text("{not json")
    config = load_config(overrides={"storage.base_dir": str(tmp_path / "base"),
                                    "retrain.feedback_path": str(feedback)})

    rows, refused = R.read_feedback(sorted(feedback.iterdir()))
    assert refused == {"missing predicted_label": 1, "confidence not a number": 1, "confidence outside 0..1": 1,
                       "unreadable file": 1}
    kept, dropped = R.select_pseudo_labels(rows, threshold=0.9, exclude_datasets={"held"})
    assert [(r.dataset_id, r.cell_id, r.predicted_label, r.confidence) for r in kept] == [
        ("d1", "c1", "B", 0.97), ("d2", "c9", "Mono", 0.91)]
    assert dropped == {"confidence <= 0.9": 1, "held-out (validation/canary) dataset": 1, "conflicting labels": 2,
                       "duplicate prediction": 1}
    assert kept[0].source == "review" and kept[0].feedback_file.endswith("b.json") and kept[0].feedback_row == 0
    # a stricter threshold keeps fewer
    assert [r.cell_id for r in R.select_pseudo_labels(rows, threshold=0.95)[0]] == ["c1", "c7"]

    summary = R.build_retrain_set(config)  # no checkpoint yet: nothing is held out
    table = list(csv.DictReader(open(summary["path"])))
    assert [(t["dataset_id"], t["cell_id"], t["pseudo_label"]) for t in table] == [
        ("d1", "c1", "B"), ("d2", "c9", "Mono"), ("held", "c7", "B")]
    assert list(table[0]) == list(R.RETRAIN_COLUMNS)
    assert table[0]["feedback_sha256"] == R._sha256(feedback / "b.json") and table[0]["threshold"] == "0.9"
    assert summary["pseudo_labels"] == 3 and summary["labels"] == {"B": 2, "Mono": 1}
    assert json.loads((Path(summary["path"]).parent / "retrain.json").read_text())["refused"] == summary["refused"]


@pytest.fixture
def demo(tmp_path: Path):
    (tmp_path / "www").mkdir()
    with GeoServer(tmp_path / "www") as server, WebhookServer() as hook:
        build_demo(tmp_path, server.url, n_datasets=4, cells=120, batch_size=2, budget_mb=40, keep_checkpoints=3,
                   missing_row=False)
        config = load_config(tmp_path / "atlasflow.yaml", overrides={
            # 1 epoch, but enough small steps at a brisk rate that the model learns something to lose
            "integration.enabled": False, "training.epochs": 1, "training.batch_cells": 16, "training.lr": 0.01,
            "training.warmup_steps": 0, "retrain.tolerance": 0.01,
            # this salt puts the two held-out datasets (pbmc_1, pbmc_4) in different splits: both are exercised
            "retrain.canary_fraction": 0.5, "retrain.split_seed": 1,
            "notify.channel": "webhook", "notify.webhook_url": hook.url})
        yield config, hook


def _damage(src: Path, dst: Path, scale: float) -> Path:
    """A copy of ``src`` whose weights have Gaussian noise of ``scale`` added: a deliberately worse model."""
    import torch

    shutil.copytree(src, dst)
    torch.manual_seed(123)
    state = torch.load(dst / "model.pt", weights_only=True)
    torch.save({k: v + scale * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()},
               dst / "model.pt")
    return dst


@pytest.mark.slow


def test_promote_keep_and_resume_from_production(demo):
    config, hook = demo
    plan = P.prepare_run(config)
    specs = {b: [d["dataset_id"] for d in json.loads(Path(write_batch_spec(config, b)).read_text())["datasets"]]
             for b in plan["batches"]}
    assert list(specs) == ["batch_0000", "batch_0001"]

    detected = R.detect_changes(config)
    assert detected["new_batches"] == ["batch_0000", "batch_0001"] and not detected["new_feedback_files"]
    first_trigger = R.ingest_trigger(config, detected, run_id="r1")
    assert first_trigger["trigger"] and first_trigger["conf"]["new_datasets"] == sorted(specs["batch_0000"]
                                                                                        + specs["batch_0001"])
    again = R.ingest_trigger(config, R.detect_changes(config), run_id="r2")
    assert not again["trigger"] and "already triggered" in again["reason"]  # no trigger loop
    assert R.ingest_trigger(config, R.detect_changes(config), run_id="r1")["trigger"]  # the same run, cleared

    first = run_batch(config, "batch_0000", specs["batch_0000"], None)["trained"]
    ckpt0 = Path(first["checkpoint_dir"])
    # the checkpoint keeps each held-out cell's dataset id: splits by dataset need it
    progress = json.loads((ckpt0 / "progress.json").read_text())
    import numpy as np

    with np.load(ckpt0 / "val_sets.npz") as z:
        assert set(z["batch_0000__datasets"].astype(str)) == set(progress["batches"][0]["val_datasets"])

    # no production yet: the first candidate is promoted (and the webhook hears it)
    ev0 = R.evaluate_candidate(config)
    assert ev0["status"] == "evaluated" and ev0["production"] is None
    d0 = R.promote_or_keep(config, ev0, run_id="r1")
    assert d0["action"] == "promoted" and R.production(config)["checkpoint_dir"] == str(ckpt0)
    assert hook.received[-1]["event"] == "promoted" and d0["notification"]["sent"]
    assert R.evaluate_candidate(config)["status"] == "unchanged"  # nothing new to judge

    second = run_batch(config, "batch_0001", specs["batch_0001"], str(ckpt0))["trained"]
    ckpt1 = Path(second["checkpoint_dir"])
    assert R.detect_changes(config)["new_datasets"] == []
    assert R.ingest_trigger(config, R.detect_changes(config), run_id="r3")["trigger"] is False

    # a deliberately damaged copy of the newest checkpoint is the candidate: it must be kept out
    bad = _damage(ckpt1, ckpt1.parent / "batch_0002", scale=1.0)
    ev_bad = R.evaluate_candidate(config)
    assert ev_bad["candidate"] == str(bad) and ev_bad["production"] == str(ckpt0)
    splits = ev_bad["splits"]
    held_out = set(json.loads((ckpt1 / "progress.json").read_text())["batches"][0]["val_datasets"]) | set(
        json.loads((ckpt1 / "progress.json").read_text())["batches"][1]["val_datasets"])
    assert {d for s in splits.values() for d in s["datasets"]} == held_out  # every held-out dataset, once
    assert set(splits) == {"validation", "canary"}
    assert not set(splits["validation"]["datasets"]) & set(splits["canary"]["datasets"])
    for name, s in splits.items():
        print(f"damaged vs production, {name}: {s['cells']} cells, production {s['production']}, "
              f"candidate {s['candidate']}")
    d_bad = R.promote_or_keep(config, ev_bad, run_id="r4")
    print("decision:", d_bad["action"], "-", d_bad["reason"])
    assert d_bad["action"] == "kept" and "regressed beyond the tolerance" in d_bad["reason"]
    assert all(delta < -0.01 for delta in d_bad["deltas"].values())
    assert R.production(config)["checkpoint_dir"] == str(ckpt0)  # the old one stays
    assert hook.received[-1]["event"] == "kept" and "regressed" in hook.received[-1]["text"]
    decisions = (config.state_dir / "retrain" / "decisions.jsonl").read_text().splitlines()
    assert [json.loads(line)["action"] for line in decisions] == ["promoted", "kept"]
    assert json.loads((config.base_dir / "outputs" / "retrain" / "decision.json").read_text())["action"] == "kept"
    assert R.evaluate_candidate(config)["status"] == "unchanged"  # judged once, not every week

    # the next run's first batch resumes from production, not from the rejected checkpoint
    assert R.resume_checkpoint(config, bad) == ckpt0
    assert R.resume_checkpoint(config, ckpt1) == ckpt1  # not judged: built upon as before
    job = P.training_job(config, "batch_0003", previous_checkpoint=str(bad))
    assert job["command"][job["command"].index("--resume-from") + 1] == str(ckpt0)

    # the same decision rule, the other way round: a damaged production loses to the trained model
    write_json_atomic(config.base_dir / "models" / "production.json",
                        {"checkpoint_dir": str(bad), "model_sha256": R._sha256(bad / "model.pt")})
    ev_good = R.evaluate_candidate(config, ckpt1)
    d_good = R.promote_or_keep(config, ev_good, run_id="r5")
    for name, s in ev_good["splits"].items():
        print(f"trained vs damaged production, {name}: production {s['production']['masked_acc']:.4f}, "
              f"candidate {s['candidate']['masked_acc']:.4f}")
    print("decision:", d_good["action"], "-", d_good["reason"])
    assert d_good["action"] == "promoted" and all(delta > 0.01 for delta in d_good["deltas"].values())
    assert R.production(config)["checkpoint_dir"] == str(ckpt1)
    assert R.production(config)["previous"] == str(bad)

    # cleanup never prunes the production checkpoint, even when it is not among the newest
    write_json_atomic(config.base_dir / "models" / "production.json",
                        {"checkpoint_dir": str(ckpt0), "model_sha256": R._sha256(ckpt0 / "model.pt")})
    Cleaner(Ledger(config.storage)).prune_checkpoints(keep=1)
    assert ckpt0.exists() and not ckpt1.exists() and bad.exists()


def test_new_feedback_is_detected_until_a_promotion_records_it(tmp_path):
    feedback = tmp_path / "fb"
    feedback.mkdir()
    (feedback / "one.csv").write_text("cell_id,dataset_id,predicted_label,confidence\nc1,d1,B,0.95\n")
    config = load_config(overrides={"storage.base_dir": str(tmp_path / "base"), "retrain.feedback_path": str(feedback),
                                    "manifest.path": str(_manifest(tmp_path))})
    detected = R.detect_changes(config)
    assert detected["new_feedback_files"] == [str(feedback / "one.csv")]
    assert "1 feedback files new" in detected["reason"]
    # feedback alone does not trigger ingest (ingest does not read it); the reason says why not
    assert R.ingest_trigger(config, {**detected, "new_datasets": []}, run_id="x")["trigger"] is False
    write_json_atomic(config.base_dir / "models" / "production.json",
                        {"checkpoint_dir": "x", "feedback_files": detected["feedback_files"]})
    assert R.detect_changes(config)["new_feedback_files"] == []
    (feedback / "one.csv").write_text("cell_id,dataset_id,predicted_label,confidence\nc1,d1,T,0.99\n")  # changed
    assert R.detect_changes(config)["new_feedback_files"] == [str(feedback / "one.csv")]


def _manifest(tmp_path: Path) -> Path:
    from tests.atlasflow.conftest import direct_rows, write_csv

    return write_csv(tmp_path / "m.csv", direct_rows(3))


def test_decide_needs_cells_to_keep_a_production_and_promotes_the_first():
    m = {"loss": 1.0, "masked_acc": 0.5, "baseline_acc": 0.3}
    assert R.decide({"production": None, "splits": {"validation": {"candidate": m}}}, tolerance=0.01).promote
    assert not R.decide({"production": "p", "splits": {}}, tolerance=0.01).promote
    within = {"validation": {"cells": 10, "candidate": {**m, "masked_acc": 0.495}, "production": m}}
    assert R.decide({"production": "p", "splits": within}, tolerance=0.01).promote
    assert not R.decide({"production": "p", "splits": within}, tolerance=0.001).promote
