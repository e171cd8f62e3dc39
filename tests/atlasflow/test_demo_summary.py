"""``scripts/demo_summary.py``'s model and retraining lines, from a hand-made base dir (no Airflow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from atlasflow.core.config import load_config
from atlasflow.core.fsutil import write_json_atomic

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("demo_summary", REPO / "scripts" / "demo_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(batch_id: str, *, masked: float, per_gene: float, probe: dict | None, forgetting: dict) -> dict:
    return {"batch_id": batch_id, "steps": 4, "val_masked_acc": masked, "val_baseline_acc": 0.141,
            "val_per_gene_acc": per_gene, "val_cells": 70, "val_cells_total": 70, "probe": probe,
            "forgetting": forgetting, "replay_cells_per_step": 16 if batch_id != "batch_0000" else 0,
            "replay_reservoir_cells": 200}


def _base(tmp_path: Path, results: list[dict]) -> Path:
    base = tmp_path / "base"
    for r in results:
        write_json_atomic(base / "state" / "trained" / f"{r['batch_id']}.json", r)
    write_json_atomic(base / "models" / "checkpoints" / results[-1]["batch_id"] / "progress.json",
                      {"global_step": 8, "cells_seen": 400, "datasets_seen": ["pbmc_1", "pbmc_2"],
                       "batches": [{**r, "train_cells": 200} for r in results]})
    return base


PROBE = {"cells": 60, "unlabelled_left_out": 3, "classes": 4, "cls_probe_acc": 0.41, "untrained_probe_acc": 0.53,
         "pca50_probe_acc": 0.81, "majority_acc": 0.34}


def test_a_model_below_its_baselines_is_called_so_and_the_benchmark_named(summary, tmp_path):
    base = _base(tmp_path, [
        _result("batch_0000", masked=0.017, per_gene=0.205, probe=None,
                forgetting={"batch_0000": {"at_training": 0.017, "now": 0.017, "change": 0.0}}),
        _result("batch_0001", masked=0.15, per_gene=0.205, probe=PROBE,
                forgetting={"batch_0000": {"at_training": 0.017, "now": 0.02, "change": 0.003},
                            "batch_0001": {"at_training": 0.15, "now": 0.15, "change": 0.0}})])
    lines = summary.model_lines(base)
    assert lines[0] == "  trained batch_0000: 4 steps on 200 cells"
    assert lines[1] == ("    held-out masked-bin accuracy 0.017 vs most-frequent bin 0.141 and per-gene baseline "
                        "0.205 (70 held-out cells) → below the most-frequent bin and the per-gene baseline")
    assert lines[2] == "    cell-type probe: no labelled held-out cells"
    assert lines[3] == "  trained batch_0001: 4 steps on 200 cells; replay 16 cells per step (reservoir 200)"
    assert lines[4].endswith("→ below the per-gene baseline")
    assert lines[5] == ("    cell-type probe on the cls embedding 0.410 vs PCA(50) 0.810 vs untrained 0.530 (majority "
                        "class 0.340; 60 labelled cells, 4 classes) → below PCA(50) and the untrained network")
    assert lines[6] == "    forgetting since trained: batch_0000 +0.0030 (0.0170 → 0.0200)"
    assert lines[7].startswith("final checkpoint ") and "step 8, 400 cells seen, datasets pbmc_1, pbmc_2" in lines[7]
    verdict = summary.model_verdict(base)
    assert verdict.startswith("model: the final model (batch_0001) does not beat its baselines (below the per-gene "
                              "baseline, PCA(50), the untrained network)")
    assert "too small for the model to learn" in verdict and "make bench BENCH=science" in verdict
    assert "README" in verdict
    assert summary.retrain_lines(base) == []  # atlas_retrain has not decided: nothing said about it


def test_a_model_that_beats_its_baselines_says_so(summary, tmp_path):
    better = {**PROBE, "cls_probe_acc": 0.85}
    base = _base(tmp_path, [_result("batch_0000", masked=0.3, per_gene=0.205, probe=better, forgetting={}),
                            _result("batch_0001", masked=None, per_gene=None, probe=None, forgetting={})])
    verdict = summary.model_verdict(base)
    assert verdict == ("model: the model at batch_0000 (the newest batch with held-out figures) beats every baseline "
                       "it was measured against on held-out cells (the most-frequent bin, the per-gene baseline, "
                       "PCA(50), the untrained network, the majority class)")
    assert "    no held-out dataset: masked-bin accuracy not measured" in summary.model_lines(base)


def test_old_style_results_and_an_empty_run(summary, tmp_path):
    old = {"batch_id": "batch_0000", "steps": 3, "val_masked_acc": 0.017, "val_baseline_acc": 0.141,
           "probe": {"cells": 60, "classes": 3, "cls_probe_acc": 0.389, "pca50_probe_acc": 0.809}}
    newer = {"batch_id": "batch_0001", "steps": 3, "val_masked_acc": 0.02, "val_baseline_acc": 0.141,
             "forgetting": {"batch_0000": 0.016, "batch_0001": 0.02}}
    base = _base(tmp_path, [old, newer])
    lines = summary.model_lines(base)
    assert lines[1] == ("    held-out masked-bin accuracy 0.017 vs most-frequent bin 0.141 and per-gene baseline n/a "
                        "→ below the most-frequent bin")
    assert lines[2] == ("    cell-type probe on the cls embedding 0.389 vs PCA(50) 0.809 vs untrained n/a (majority "
                        "class n/a; 60 labelled cells, 3 classes) → below PCA(50)")
    assert "    forgetting since trained: batch_0000 now 0.0160 (at training: not stored)" in lines
    assert "below the most-frequent bin" in summary.model_verdict(base)
    empty = tmp_path / "empty"
    assert summary.model_lines(empty) == []
    assert summary.model_verdict(empty).startswith("model: no held-out figures")


def test_the_retraining_decision_is_printed_when_there_is_one(summary, tmp_path):
    from atlasflow.steps.retrain import promote_or_keep

    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    base = Path(config.storage.base_dir)
    first, second = base / "models" / "checkpoints" / "batch_0000", base / "models" / "checkpoints" / "batch_0001"

    def split(candidate: float, production: float | None) -> dict:
        return {"cells": 50, "candidate": {"loss": 2.0, "masked_acc": candidate, "baseline_acc": 0.14},
                "production": None if production is None else {"loss": 2.1, "masked_acc": production,
                                                               "baseline_acc": 0.14}}

    promote_or_keep(config, {"status": "evaluated", "candidate": str(first), "candidate_sha256": "a" * 64,
                             "production": None, "splits": {"validation": split(0.30, None)}}, run_id="r1")
    lines = summary.retrain_lines(base)
    assert lines[0].startswith("retraining decision (atlas_retrain run r1, ")
    assert lines[0].endswith("PROMOTED batch_0000 to production (production before: none yet)")
    assert lines[1].startswith("    reason: no production checkpoint yet")
    assert lines[2] == ("    validation (50 cells), candidate vs production: masked-bin accuracy 0.3000; most-frequent "
                        "bin 0.1400; loss 2.0000 (no production checkpoint yet)")

    promote_or_keep(config, {"status": "evaluated", "candidate": str(second), "candidate_sha256": "b" * 64,
                             "production": str(first),
                             "splits": {"validation": split(0.20, 0.30), "canary": split(0.31, 0.30)}}, run_id="r2")
    lines = summary.retrain_lines(base)
    assert lines[0].endswith("KEPT production batch_0000; candidate batch_0001 not promoted")
    assert "regressed beyond the tolerance" in lines[1]
    assert lines[2] == ("    canary (50 cells), candidate vs production: masked-bin accuracy 0.3100 vs 0.3000 (+0.0100); "
                        "most-frequent bin 0.1400 vs 0.1400 (+0.0000); loss 2.0000 vs 2.1000 (-0.1000)")
    assert lines[3].startswith("    validation (50 cells), candidate vs production: masked-bin accuracy 0.2000 vs "
                               "0.3000 (-0.1000)")
    json.loads((base / "outputs" / "retrain" / "decision.json").read_text())  # the file the lines came from
