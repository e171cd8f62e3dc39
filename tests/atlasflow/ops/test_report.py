"""The run report, rendered from a real two-batch run of the ingest steps (no Airflow).

The run: four manifest rows from the local stand-in server (real pbmc cells), the 404 row in the
first batch, one epoch per batch. Everything the report says is checked against the files the
steps left (tombstones, quarantine records, stage records, the ledger).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import sqlite3
from pathlib import Path

import pytest

from atlasflow.cli.main import main
from atlasflow.core.config import load_config
from atlasflow.intake.plan import write_batch_spec
from atlasflow.ops.report import STAGES, write_run_report
from atlasflow.steps import ingest as P
from atlasflow_testing.demo import build_demo
from atlasflow_testing.geo_server import GeoServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_ID = "manual__2026-01-02T03:04:05+00:00"


def run_batch(config, batch_id: str, ids: list[str], previous: str | None) -> dict:
    admission = P.admit_batch(config, batch_id, owner="test")
    assert admission["admitted"], admission["reason"]
    processed = [P.process_dataset_step(config, batch_id, P.download_dataset(config, batch_id, d, final_try=True))
                 for d in ids]
    P.integrate_batch_step(config, batch_id, processed)
    trained = P.train_batch_step(config, batch_id, previous_checkpoint=previous)
    P.cleanup_batch(config, batch_id)
    return trained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "www").mkdir()
    with GeoServer(root / "www") as server:
        build_demo(root, server.url, n_datasets=3, cells=60, batch_size=2, budget_mb=40, keep_checkpoints=1,
                   missing_at=1)
        config = load_config(root / "atlasflow.yaml", overrides={"integration.enabled": False, "training.epochs": 1})
        plan = P.prepare_run(config)
        assert plan["batches"] == ["batch_0000", "batch_0001"]
        previous = None
        for b in plan["batches"]:
            ids = [d["dataset_id"] for d in json.loads(Path(write_batch_spec(config, b)).read_text())["datasets"]]
            previous = run_batch(config, b, ids, previous)["checkpoint_dir"]
        yield config


def _state(config, folder: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((config.state_dir / folder).glob("*.json"))}


def _row(page: str, dataset_id: str) -> list[str]:
    """The cells of a dataset's row in the datasets table, unescaped."""
    match = re.search(rf'<tr class="(\w+)" id="ds-{re.escape(dataset_id)}">(.*?)</tr>', page, re.S)
    assert match, f"no row for {dataset_id}"
    return [match.group(1)] + [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", match.group(2), re.S)]


def test_report_shows_what_the_state_files_hold(run):
    config = run
    written = write_run_report(config, RUN_ID)
    base = Path(config.storage.base_dir).resolve()
    folder = base / "reports" / "manual__2026-01-02T03_04_05_00_00"
    assert Path(written["html"]) == folder / "report.html"
    assert Path(written["metrics"]) == folder / "run_metrics.json"
    latest = json.loads((base / "reports" / "latest.json").read_text())
    assert set(latest) == {"run_id", "html", "metrics", "written_at"}
    assert latest["run_id"] == RUN_ID and Path(latest["html"]) == folder / "report.html"
    page = Path(latest["html"]).read_text()

    for section in ("summary", "storage", "datasets", "qc", "training", "model", "stages", "jobs", "lineage"):
        assert f"<section id={section}>" in page, section
    # self-contained: nothing is fetched from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert "<script" not in page and "<link" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 5  # storage, QC, loss, model vs baselines, stage timeline
    assert all(base64.b64decode(i, validate=True).startswith(PNG_MAGIC) for i in images)

    tombstones, quarantine = _state(config, "tombstones"), _state(config, "quarantine")
    assert sorted(tombstones) == ["GSE900001", "pbmc_1", "pbmc_2"] and sorted(quarantine) == ["pbmc_gone"]
    for did, tomb in tombstones.items():
        cells = _row(page, did)
        assert cells[0] == "processed" and cells[3] == "processed" and cells[4] == "yes"
        assert cells[7:10] == [str(tomb["cells_before"]), str(tomb["cells_after"]), str(tomb["genes_after"])]
        assert cells[10] == f"{tomb['coverage']['vocab_fraction']:.1%}"
        # the QC plot's source: every cell before QC, the passing ones after, kept after cleanup
        for metric in ("n_counts", "n_genes", "pct_mito"):
            hist = tomb["qc_histograms"][metric]
            assert (sum(hist["before"]), sum(hist["after"])) == (tomb["cells_before"], tomb["cells_after"])
    qc = page[page.index("<section id=qc>"):page.index("<section id=training>")]
    for did, tomb in tombstones.items():
        assert f"<tr><td>{did}</td>" + "".join(f"<td>{n}</td>" for n in tomb["removed"].values()) + "</tr>" in qc
    gone = _row(page, "pbmc_gone")
    assert gone[0] == "quarantined" and gone[2] == "batch_0000" and gone[4] == "no"
    assert gone[12] == "download" and gone[13] == quarantine["pbmc_gone"]["reason"] and "404" in gone[13]

    budget = config.storage.max_storage_bytes
    assert written["budget_bytes"] == budget == 40_000_000
    budget_line = re.search(r"<li id=budget-line>(.*?)</li>", page, re.S).group(1)
    assert "disk budget 40 MB" in budget_line and "within budget" in budget_line
    assert 0 < written["peak_used_bytes"] <= budget
    cells_after = sum(t["cells_after"] for t in tombstones.values())
    assert f"{cells_after} cells after QC" in page

    trained = _state(config, "trained")
    assert "bottleneck stage: <span class=key>" + written["bottleneck"] in page
    for b, t in trained.items():
        val = "" if t["val_loss"] is None else f"{t['val_loss']:.4f}"
        assert f"<td>{b}</td><td>{t['train_loss']:.4f}</td><td>{val}</td>" in page
    # lineage: batch_0001 grew from batch_0000's checkpoint (pruned since: keep_checkpoints=1)
    lineage = page[page.index("<section id=lineage>"):]
    assert trained["batch_0001"]["checkpoint_dir"] in lineage and "on disk" in lineage
    assert lineage.index(trained["batch_0001"]["checkpoint_dir"]) < lineage.index(trained["batch_0000"]["checkpoint_dir"])
    assert "datasets seen (3)" in lineage
    jobs = page[page.index("<section id=jobs>"):page.index("<section id=lineage>")]
    assert jobs.count("<td>COMPLETED</td>") == 2 and jobs.count("<td>local</td>") == 2


def test_run_metrics_has_a_record_per_dataset_per_stage(run):
    config = run
    written = write_run_report(config, RUN_ID)
    metrics = json.loads(Path(written["metrics"]).read_text())
    assert metrics["run_id"] == RUN_ID and metrics["budget_bytes"] == config.storage.max_storage_bytes
    records = metrics["records"]
    keys = [(r["dataset_id"], r["stage"]) for r in records]
    datasets = ["pbmc_1", "pbmc_gone", "pbmc_2", "GSE900001"]
    assert sorted(keys) == sorted((d, s) for d in datasets for s in STAGES)
    by = {(r["dataset_id"], r["stage"]): r for r in records}
    for did, tomb in _state(config, "tombstones").items():
        down, proc = by[(did, "download")], by[(did, "process")]
        assert down["status"] == "ok" and down["bytes"] == sum(f["bytes"] for f in tomb["downloads"]) > 0
        assert proc["status"] == "ok" and (proc["cells_before"], proc["cells_after"]) == (tomb["cells_before"],
                                                                                          tomb["cells_after"])
        assert proc["started"] <= proc["ended"] and proc["seconds"] >= 0
    assert by[("pbmc_gone", "download")]["status"] == "quarantined" and "404" in by[("pbmc_gone", "download")]["reason"]
    assert by[("pbmc_gone", "process")]["status"] == "not_run"
    for did in datasets:
        train = by[(did, "train")]
        assert train["scope"] == "batch" and train["status"] == "ok" and train["seconds"] > 0
    assert by[("pbmc_1", "train")]["batch_id"] == "batch_0000" and by[("pbmc_2", "train")]["batch_id"] == "batch_0001"
    assert metrics["datasets"] == {"processed": 3, "quarantined": 1, "failed": 0, "pending": 0}
    assert metrics["bottleneck"] in ("download", "process", "integrate", "train", "cleanup")
    summary = metrics["stage_summary"]
    assert summary["train"]["records"] == 2 and summary["download"]["records"] == 4
    assert summary[metrics["bottleneck"]]["wall_seconds"] == max(summary[s]["wall_seconds"] for s in summary if s != "admit")
    assert [j["state"] for j in metrics["jobs"]] == ["COMPLETED", "COMPLETED"]
    assert [b["batch_id"] for b in metrics["batches"]] == ["batch_0000", "batch_0001"]


def test_usage_samples_carry_the_budget_and_a_rerun_keeps_the_work_records(run):
    from atlasflow.storage import Ledger

    config = run
    samples = Ledger(config.storage).samples()
    events = [s["event"] for s in samples]
    for expected in ("batch_0000 admitted", "downloaded pbmc_1", "processed pbmc_1", "trained batch_0000",
                     "batch_0000 released", "batch_0001 released"):
        assert expected in events
    assert all(s["budget"] == config.storage.max_storage_bytes for s in samples)
    process = config.state_dir / "stages" / "batch_0000" / "process" / "pbmc_1.json"
    train = config.state_dir / "stages" / "batch_0000" / "train" / "_batch.json"
    before = process.read_text(), train.read_text()
    # a re-triggered run finds everything done: the records of the work that was done stay
    run_batch(config, "batch_0000", ["pbmc_1", "pbmc_gone"], None)
    assert (process.read_text(), train.read_text()) == before


def test_a_ledger_from_before_the_budget_column_is_migrated(tmp_path):
    from atlasflow.core.config import StorageConfig
    from atlasflow.storage import Ledger

    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    db.execute("CREATE TABLE samples (time REAL NOT NULL, data INTEGER, models INTEGER, cache INTEGER, "
               "outputs INTEGER, reserved INTEGER, free INTEGER)")
    db.execute("INSERT INTO samples VALUES (1.0, 1, 2, 3, 4, 5, 6)")
    db.commit()
    db.close()
    ledger = Ledger(StorageConfig(base_dir=str(tmp_path)))
    ledger.sample("after the upgrade")
    old, new = ledger.samples()
    assert old["data"] == 1 and old["budget"] is None and old["event"] is None
    assert new["budget"] == ledger.config.max_storage_bytes and new["event"] == "after the upgrade"


def test_cli_report(run, tmp_path):
    config = run
    base = Path(config.storage.base_dir).resolve()
    latest = base / "reports" / "latest.json"
    pointer = latest.read_text() if latest.exists() else None
    out = io.StringIO()
    target = tmp_path / "elsewhere" / "report.html"
    assert main(["report", str(base), "--out", str(target), "--json"], out=out) == 0
    written = json.loads(out.getvalue())
    assert Path(written["html"]) == target and "<section id=datasets>" in target.read_text()
    metrics = json.loads((tmp_path / "elsewhere" / "run_metrics.json").read_text())
    assert len(metrics["records"]) == 4 * len(STAGES)
    # no config given: the budget comes from the ledger's samples, not the 550 GB default
    assert metrics["budget_bytes"] == 40_000_000
    # a report written elsewhere does not move the pipeline's latest pointer
    assert (latest.read_text() if latest.exists() else None) == pointer

    out = io.StringIO()
    assert main(["report", str(base), "--run-id", "by-hand"], out=out) == 0
    assert json.loads(latest.read_text())["html"] == str(base / "reports" / "by-hand" / "report.html")
    assert "report " + str(base / "reports" / "by-hand" / "report.html") in out.getvalue()

    assert main(["report", str(tmp_path / "nothing")], out=io.StringIO()) == 2


def test_slurm_training_is_recorded_from_the_trigger_event(tmp_path):
    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    P.slurm_training_submitted(config, "batch_0000")
    stage = config.state_dir / "stages" / "batch_0000" / "train" / "_batch.json"
    assert json.loads(stage.read_text())["status"] == "running"
    P.slurm_training_finished(config, "batch_0000", {"status": "failed", "job_id": "41", "state": "OUT_OF_MEMORY",
                                                     "exit_code": 0, "reason": "OutOfMemory",
                                                     "message": "job 41 OUT_OF_MEMORY", "result": None})
    assert json.loads(stage.read_text())["status"] == "failed"
    P.slurm_training_submitted(config, "batch_0000")
    P.slurm_training_finished(config, "batch_0000", {"status": "success", "job_id": "42", "state": "COMPLETED",
                                                     "exit_code": 0, "result": {"train_loss": 1.5, "global_step": 7}})
    record = json.loads(stage.read_text())
    assert record["status"] == "ok" and record["attempts"] == 2 and record["train_loss"] == 1.5
    written = write_run_report(config, "slurm-run")
    metrics = json.loads(Path(written["metrics"]).read_text())
    assert [(j["job_id"], j["state"], j["backend"]) for j in metrics["jobs"]] == [
        ("41", "OUT_OF_MEMORY", "slurm"), ("42", "COMPLETED", "slurm")]
    page = Path(written["html"]).read_text()
    assert "<td>41</td><td>OUT_OF_MEMORY</td>" in page and "<td>42</td><td>COMPLETED</td>" in page


def test_integration_scores_are_reported_per_batch(tmp_path):
    from atlasflow.core.runlog import record_stage

    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    metrics = {"asw_label": 0.61, "nmi": 0.6, "ari": 0.45, "isolated_label_asw": 0.57, "clisi": 0.97,
               "asw_batch": 0.78, "graph_connectivity": 0.87, "ilisi": 0.79, "bio_conservation": 0.64,
               "batch_correction": 0.81, "total": 0.71}
    for batch_id, mode, earlier in (("batch_0000", "reference", 0), ("batch_0001", "scarches_query", 300)):
        scib = {"cells": 300 + earlier, "unlabelled": 0, "cell_types": 10, "batches": 4, "clustering": "kmeans",
                "cells_this_batch": 300, "cells_earlier_batches": earlier, "batch_unlabelled": 12,
                "scvi": metrics, "pca": {**metrics, "total": 0.7349, "ilisi": None}}
        with record_stage(config.state_dir, "integrate", batch_id) as out:
            out.update({"status": "ok", "integration": {"batch_id": batch_id, "mode": mode, "scib": scib}})
    with record_stage(config.state_dir, "integrate", "batch_0002") as out:  # integration disabled: no row
        out.update({"status": "ok", "integration": None})
    written = write_run_report(config, "integrated")
    page = Path(written["html"]).read_text()
    section = page[page.index("<section id=integration>"):page.index("<section id=stages>")]
    assert section.count("<tr><td>batch_0001</td><td>scarches_query</td>") == 2 and "batch_0002" not in section
    assert ("<tr><td>batch_0001</td><td>scarches_query</td><td>scVI</td><td>600</td><td>300</td><td>12</td>"
            "<td>0.6100</td>") in section
    assert "<td>PCA(50)</td>" in section and "<td>0.7349</td></tr>" in section
    assert 'src="data:image/png;base64,' in section  # the per-batch plot
    run_metrics = json.loads(Path(written["metrics"]).read_text())
    assert [(r["batch_id"], r["scib"]["scvi"]["total"]) for r in run_metrics["integration"]] == [
        ("batch_0000", 0.71), ("batch_0001", 0.71)]


def test_a_run_that_did_nothing_still_gets_a_report(tmp_path):
    # the DAG's report task runs even when prepare failed: no plan, no samples, no checkpoint
    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    written = write_run_report(config, "empty")
    page = Path(written["html"]).read_text()
    assert "No batch trained yet." in page and "No training job recorded." in page
    assert "No integration scored." in page
    assert "bottleneck stage: <span class=key>none yet" in page
    assert json.loads(Path(written["metrics"]).read_text())["records"] == []


def test_retraining_decisions_are_reported_with_their_reasons(tmp_path):
    from atlasflow.steps.retrain import promote_or_keep

    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    first, second = tmp_path / "base" / "models" / "checkpoints" / "batch_0000", tmp_path / "ck" / "batch_0001"

    def split(candidate: float, production: float) -> dict:
        return {"cells": 50, "candidate": {"masked_acc": candidate}, "production": {"masked_acc": production}}

    promote_or_keep(config, {"status": "evaluated", "candidate": str(first), "candidate_sha256": "a" * 64,
                             "production": None, "splits": {"validation": split(0.30, 0.0)}}, run_id="r1")
    kept = promote_or_keep(config, {"status": "evaluated", "candidate": str(second), "candidate_sha256": "b" * 64,
                                    "production": str(first),
                                    "splits": {"validation": split(0.20, 0.30), "canary": split(0.31, 0.30)}},
                           run_id="r2")
    assert kept["action"] == "kept"
    page = Path(write_run_report(config, "after-retrain")["html"]).read_text()
    section = page[page.index("<section id=retrain>"):].split("</section>")[0]
    assert f"production checkpoint <code>{first}</code>" in section
    rows = re.findall(r"<tr>(.*?)</tr>", section, re.S)[1:]  # newest first, after the header
    cells = [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", r, re.S)] for r in rows]
    assert [c[3] for c in cells] == ["kept", "promoted"]
    assert "regressed beyond the tolerance 0.01 on validation" in cells[0][4]
    assert cells[0][5] == "canary +0.0100, validation -0.1000"


def _result(batch_id: str, **over) -> dict:
    """A hand-made training result in the current form (``train_batch``'s ``result.json``)."""
    result = {"batch_id": batch_id, "checkpoint_dir": f"/ck/{batch_id}", "steps": 40, "train_loss": 2.1,
              "val_loss": 2.3, "val_masked_acc": 0.2512, "val_baseline_acc": 0.1391, "val_per_gene_acc": 0.2051,
              "val_expression_mse": 0.31, "val_cells": 500, "val_cells_total": 900,
              "probe": {"cells": 300, "unlabelled_left_out": 12, "classes": 5, "cls_probe_acc": 0.7012,
                        "untrained_probe_acc": 0.5343, "pca50_probe_acc": 0.8093, "majority_acc": 0.3431},
              "forgetting": {"batch_0000": {"at_training": 0.2211, "now": 0.2093, "change": -0.0118},
                             batch_id: {"at_training": 0.2512, "now": 0.2512, "change": 0.0}},
              "replay_cells_per_step": 16, "replay_reservoir_cells": 2000, "gene_ranking": "median",
              "cell_objective": "expression", "cells_seen": 5000, "global_step": 80, "seconds": 12.0}
    result.update(over)
    return result


def _train(config, result: dict) -> None:
    from atlasflow.core.runlog import record_stage

    with record_stage(config.state_dir, "train", result["batch_id"]) as out:
        out.update({"status": "ok", **result})
    P.record_trained(config, result["batch_id"], result)


def _model_section(page: str) -> str:
    return page[page.index("<section id=model>"):].split("</section>")[0]


def test_the_model_section_shows_each_figure_beside_its_baselines(tmp_path):
    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    first = {"batch_id": "batch_0000", "steps": 20, "val_masked_acc": 0.2211, "val_baseline_acc": 0.1402,
             "val_per_gene_acc": 0.2051, "val_cells": 400, "val_cells_total": 400, "probe": None,
             "forgetting": {"batch_0000": {"at_training": 0.2211, "now": 0.2211, "change": 0.0}},
             "replay_cells_per_step": 0, "replay_reservoir_cells": 1000}
    _train(config, first)
    _train(config, _result("batch_0001"))
    written = write_run_report(config, "model")
    section = _model_section(Path(written["html"]).read_text())
    assert "<h2>Model: does it learn cell state?</h2>" in section
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', section)
    assert len(images) == 1 and base64.b64decode(images[0], validate=True).startswith(PNG_MAGIC)

    row = re.search(r'<tr id="model-batch_0001">(.*?)</tr>', section, re.S).group(1)
    cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert cells == ["batch_0001", "40", "500 (900)", "0.2512", "0.1391", "0.2051", "300 (5; 12)", "0.7012", "0.5343",
                     "0.8093", "0.3431", "batch_0000 -0.0118 (0.2211 → 0.2093)", "16 (2000)"]
    assert "<td class=below>0.8093</td>" in row  # the one baseline the model does not beat is marked
    first_row = re.search(r'<tr id="model-batch_0000">(.*?)</tr>', section, re.S).group(1)
    assert "no labelled held-out cells" in first_row and "none earlier" in first_row

    verdicts = [html.unescape(v) for v in re.findall(r"<li[^>]*>(.*?)</li>", section, re.S)]
    assert verdicts[0] == ("batch_0000: beats every baseline: masked-bin accuracy 0.2211 beats the most-frequent bin "
                           "(0.1402), beats the per-gene baseline (0.2051); no labelled held-out cells for the "
                           "cell-type probe")
    assert verdicts[1].startswith("batch_0001: does NOT beat every baseline: masked-bin accuracy 0.2512 beats the "
                                  "most-frequent bin (0.1391), beats the per-gene baseline (0.2051)")
    assert "cell-type probe 0.7012 below PCA(50) (0.8093), beats the untrained network (0.5343), beats the " \
           "majority class (0.3431)" in verdicts[1]

    metrics = json.loads(Path(written["metrics"]).read_text())
    batches = {b["batch_id"]: b for b in metrics["batches"]}
    second = batches["batch_0001"]
    assert (second["val_masked_acc"], second["val_baseline_acc"], second["val_per_gene_acc"]) == (0.2512, 0.1391,
                                                                                                  0.2051)
    assert second["probe"]["pca50_probe_acc"] == 0.8093 and second["probe"]["untrained_probe_acc"] == 0.5343
    assert second["forgetting"]["batch_0000"] == {"at_training": 0.2211, "now": 0.2093, "change": -0.0118}
    assert second["replay_cells_per_step"] == 16 and second["replay_reservoir_cells"] == 2000
    assert second["beats_baselines"] == {"most_frequent_bin": True, "per_gene": True, "pca50": False,
                                         "untrained_network": True, "majority_class": True}
    assert second["verdict"] == verdicts[1] and second["cell_objective"] == "expression"
    assert batches["batch_0000"]["beats_baselines"] == {"most_frequent_bin": True, "per_gene": True}


def test_train_records_in_run_metrics_carry_the_model_figures(run):
    metrics = json.loads(Path(write_run_report(run, RUN_ID)["metrics"]).read_text())
    trained = _state(run, "trained")
    for rec in (r for r in metrics["records"] if r["stage"] == "train"):
        result = trained[rec["batch_id"]]
        assert rec["val_masked_acc"] == result["val_masked_acc"] and rec["val_per_gene_acc"] == result["val_per_gene_acc"]
        assert rec["forgetting"] == result["forgetting"] and isinstance(rec["verdict"], str)
        assert rec["verdict"].startswith(rec["batch_id"] + ": ")
    page = Path(write_run_report(run, RUN_ID)["html"]).read_text()
    assert [m for m in re.findall(r'<tr id="model-(batch_\d+)">', page)] == sorted(trained)


def test_old_style_results_do_not_break_the_model_section(tmp_path):
    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    # written before the per-gene baseline, the untrained probe and stored forgetting existed
    _train(config, {"batch_id": "batch_0000", "steps": 10, "train_loss": 4.0, "val_loss": 4.2, "val_masked_acc": 0.017,
                    "val_baseline_acc": 0.141, "val_cells": 70, "cells_seen": 100, "global_step": 10,
                    "probe": {"cells": 60, "classes": 3, "cls_probe_acc": 0.389, "pca50_probe_acc": 0.809},
                    "forgetting": {"batch_0000": 0.017}})
    _train(config, {"batch_id": "batch_0001", "train_loss": 3.9, "val_loss": None, "val_masked_acc": None,
                    "val_baseline_acc": None, "forgetting": {"batch_0000": 0.016, "batch_0001": None}})
    _train(config, {"batch_id": "batch_0002", "val_masked_acc": float("nan"), "probe": "not a dict",
                    "forgetting": [0.1]})
    written = write_run_report(config, "old")
    section = _model_section(Path(written["html"]).read_text())
    verdicts = [html.unescape(v) for v in re.findall(r"<li[^>]*>(.*?)</li>", section, re.S)]
    assert verdicts == [
        "batch_0000: does NOT beat every baseline: masked-bin accuracy 0.0170 below the most-frequent bin (0.1410); "
        "cell-type probe 0.3890 below PCA(50) (0.8090)",
        "batch_0001: nothing to compare: no held-out cells: masked-bin accuracy not measured; no labelled held-out "
        "cells for the cell-type probe",
        "batch_0002: nothing to compare: no held-out cells: masked-bin accuracy not measured; no labelled held-out "
        "cells for the cell-type probe"]
    row = re.search(r'<tr id="model-batch_0001">(.*?)</tr>', section, re.S).group(1)
    assert "batch_0000 now 0.0160 (at training: not stored)" in html.unescape(row)
    assert "60 (3; n/a)" in section
    metrics = json.loads(Path(written["metrics"]).read_text())
    assert metrics["batches"][1]["forgetting"]["batch_0000"] == {"at_training": None, "now": 0.016, "change": None}
    assert metrics["batches"][0]["beats_baselines"] == {"most_frequent_bin": False, "pca50": False}


def test_dataset_ids_and_reasons_are_escaped(tmp_path):
    # ids and reasons come from manifests and remote servers: the page must show them, never run them
    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    did, reason = "GSE1<script>alert(1)", "HTTP 404 </script><script>alert(2)</script> & more"
    (config.state_dir / "batches").mkdir(parents=True)
    (config.state_dir / "quarantine").mkdir()
    (config.state_dir / "batches" / "batch_0000.json").write_text(json.dumps({"datasets": [{"dataset_id": did}]}))
    (config.state_dir / "quarantine" / f"{did}.json").write_text(json.dumps({"stage": "download", "reason": reason}))
    page = Path(write_run_report(config, "escape<me>")["html"]).read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)" in page
    assert "atlasflow run escape&lt;me&gt;" in page
    cells = _row(page, html.escape(did, quote=False))
    assert cells[0] == "quarantined" and cells[1] == did and cells[12:] == ["download", reason]


def test_the_report_inlines_the_one_shared_stylesheet(tmp_path):
    from atlasflow.ops.templates import environment

    config = load_config(None, overrides={"storage.base_dir": str(tmp_path / "base")})
    page = Path(write_run_report(config, "styled")["html"]).read_text()
    stylesheet = environment().loader.get_source(environment(), "atlasflow.css")[0]
    assert page.count("<style>") == 1 and stylesheet in page and "<link" not in page
