"""DAG integrity (as in the Astro template): every DAG imports, has retries, uses known pools,
and parsing stays cheap (no heavy science imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.atlasflow.conftest import direct_rows, write_csv, write_xlsx

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
KNOWN_POOLS = {"default_pool", "downloads", "gpu", "quant"}
HEAVY = ("scanpy", "anndata", "scvi", "torch", "numpy", "pandas", "lightning")


def write_config(tmp_path: Path, manifest: Path, batch_size: int = 2, pipelining: bool = True) -> Path:
    path = tmp_path / "atlasflow.yaml"
    path.write_text(f"storage: {{base_dir: {tmp_path / 'base'}}}\nmanifest: {{path: {manifest}}}\n"
                    f"plan: {{batch_size: {batch_size}, pipelining: {str(pipelining).lower()}}}\n")
    return path


def dagbag(monkeypatch, config: Path | None):
    from airflow.dag_processing.dagbag import DagBag

    if config is None:
        monkeypatch.delenv("ATLASFLOW_CONFIG", raising=False)
    else:
        monkeypatch.setenv("ATLASFLOW_CONFIG", str(config))
    return DagBag(dag_folder=str(DAGS), known_pools=KNOWN_POOLS)


def test_default_project_dags_import_cleanly(monkeypatch):
    bag = dagbag(monkeypatch, None)
    assert bag.import_errors == {}
    assert "atlas_ingest" in bag.dags
    assert not bag.captured_warnings


def test_every_task_has_retries_and_a_known_pool(monkeypatch, tmp_path):
    bag = dagbag(monkeypatch, write_config(tmp_path, write_csv(tmp_path / "m.csv", direct_rows(5))))
    assert bag.import_errors == {}
    for dag in bag.dags.values():
        for t in dag.tasks:
            assert t.retries >= 1, f"{dag.dag_id}.{t.task_id} has no retries"
            assert t.pool in KNOWN_POOLS, f"{dag.dag_id}.{t.task_id} uses unknown pool {t.pool!r}"


def test_batches_are_laid_out_from_the_manifest(monkeypatch, tmp_path):
    bag = dagbag(monkeypatch, write_config(tmp_path, write_xlsx(tmp_path / "m.xlsx", direct_rows(5))))
    dag = bag.dags["atlas_ingest"]
    groups = sorted({t.task_id.split(".")[0] for t in dag.tasks if "." in t.task_id})
    assert groups == ["batch_0000", "batch_0001", "batch_0002"]
    per_batch = sorted(t.task_id.split(".")[1] for t in dag.tasks if t.task_id.startswith("batch_0001."))
    # no raw reads in this manifest, so no batch has a quant step
    assert per_batch == ["admit", "cleanup", "download", "integrate", "process", "train"]
    assert dag.get_task("batch_0000.admit").upstream_task_ids == {"prepare", "validate_system"}
    # pipelining: admission, integration and training chain batch to batch, nothing else does
    assert dag.get_task("batch_0001.admit").upstream_task_ids == {"prepare", "validate_system", "batch_0000.admit"}
    # train runs beside integrate (it reads the processed files, not the scVI latent); each chains to the
    # previous batch's own step, and cleanup, which deletes the processed files, waits for both
    assert dag.get_task("batch_0001.train").upstream_task_ids == {"batch_0001.process", "batch_0000.train"}
    assert dag.get_task("batch_0001.integrate").upstream_task_ids == {"batch_0001.process", "batch_0000.integrate"}
    assert dag.get_task("batch_0001.integrate").trigger_rule == "none_failed"  # an empty batch 0 skips its integrate
    assert dag.get_task("batch_0001.cleanup").upstream_task_ids == {"batch_0001.integrate", "batch_0001.train",
                                                                    "batch_0001.admit"}
    assert dag.get_task("batch_0001.download").pool == "downloads"
    assert dag.get_task("batch_0001.train").pool == "gpu"
    assert dag.get_task("batch_0001.process").upstream_task_ids == {"batch_0001.download"}
    assert dag.get_task("batch_0001.admit").mode == "reschedule"
    assert dag.get_task("batch_0001.cleanup").is_teardown
    assert dag.get_task("batch_0001.download").map_index_template == "{{ dataset_id }}"
    assert dag.get_task("batch_0001.download").op_kwargs_expand_input.value["dataset_id"] == ["ds002", "ds003"]
    publish = dag.get_task("publish")
    assert publish.upstream_task_ids == {"batch_0002.train"}
    assert [o.uri for o in publish.outlets] == ["atlasflow://model/checkpoint"]
    # the run report comes last and runs whatever happened, without deciding the run's state
    report = dag.get_task("report")
    assert report.upstream_task_ids == {"publish", "batch_0000.cleanup", "batch_0001.cleanup", "batch_0002.cleanup"}
    assert not report.downstream_task_ids
    assert report.is_teardown and report.trigger_rule == "all_done_setup_success"
    assert not any(t.is_setup for t in report.upstream_list)  # so all_done_setup_success acts as all_done
    assert report.retries >= 1
    # Airflow's own rule for the run's state: a failed batch still fails the run (the leaves are publish, at
    # the end of the training chain, and the last integrate, at the end of the integration chain)
    from typing import NamedTuple

    from airflow.models.dagrun import DagRun

    class TI(NamedTuple):
        task_id: str
        state: None

    tis = [TI(t.task_id, None) for t in dag.tasks]
    assert {ti.task_id for ti in DagRun._tis_for_dagrun_state(None, dag=dag, tis=tis)} == {"publish", "batch_0002.integrate"}


def test_pipelining_off_chains_each_batch_after_the_previous_cleanup(monkeypatch, tmp_path):
    bag = dagbag(monkeypatch, write_config(tmp_path, write_csv(tmp_path / "m.csv", direct_rows(5)), pipelining=False))
    dag = bag.dags["atlas_ingest"]
    assert dag.get_task("batch_0001.admit").upstream_task_ids == {"prepare", "validate_system", "batch_0000.admit", "batch_0000.cleanup"}
    assert dag.get_task("batch_0000.admit").upstream_task_ids == {"prepare", "validate_system"}


def test_broken_manifest_does_not_break_the_dag(monkeypatch, tmp_path):
    rows = direct_rows(2)
    rows[0][2] = "nonsense"
    bag = dagbag(monkeypatch, write_config(tmp_path, write_csv(tmp_path / "m.csv", rows)))
    assert bag.import_errors == {}
    dag = bag.dags["atlas_ingest"]
    assert sorted(t.task_id for t in dag.tasks) == ["prepare", "report", "validate_system"]
    assert dag.get_task("report").upstream_task_ids == {"prepare", "validate_system"}
    assert "manifest invalid (1 problems)" in dag.doc_md


def test_parsing_imports_no_heavy_modules(tmp_path):
    config = write_config(tmp_path, write_xlsx(tmp_path / "m.xlsx", direct_rows(9)))
    code = (
        "import sys, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "before = set(sys.modules)\n"
        f"bag = DagBag(dag_folder={str(DAGS)!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    env = {**os.environ, "ATLASFLOW_CONFIG": str(config)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_only_batches_with_raw_reads_get_a_quant_step(monkeypatch, tmp_path):
    rows = direct_rows(4)
    rows[3] = ["fq003", "https://example.org/r/S_R1.fastq.gz;https://example.org/r/S_R2.fastq.gz", "direct", "", 1_000_000,
               "10xv3"]
    header = ["dataset_id", "download_url", "type", "format", "expected_bytes", "technology"]
    bag = dagbag(monkeypatch, write_config(tmp_path, write_csv(tmp_path / "m.csv", [r + [""] * (6 - len(r)) for r in rows],
                                                               header)))
    assert bag.import_errors == {}
    dag = bag.dags["atlas_ingest"]
    assert "batch_0000.quant" not in dag.task_dict  # ds000, ds001: count files only
    # raw reads are quantified between download and process, two at a time (pool quant)
    quant = dag.get_task("batch_0001.quant")
    assert quant.pool == "quant" and quant.map_index_template == "{{ dataset_id }}"
    assert quant.upstream_task_ids == {"batch_0001.download"}
    assert dag.get_task("batch_0001.process").upstream_task_ids == {"batch_0001.quant"}
    assert quant.execution_timeout.total_seconds() == 600 + 120
    # the parallel CPU stages yield the cores to the train/integrate chains (qc.nice); the chains do not
    from atlasflow_airflow.dag_defaults import lower_cpu_priority

    def execute_callbacks(task_id: str) -> list:
        cb = dag.get_task(task_id).on_execute_callback
        return cb if isinstance(cb, list) else [cb]

    for task_id in ("batch_0001.quant", "batch_0001.process", "batch_0000.process"):
        assert lower_cpu_priority in execute_callbacks(task_id), task_id
    for task_id in ("batch_0001.train", "batch_0001.integrate", "batch_0001.download"):
        assert lower_cpu_priority not in execute_callbacks(task_id), task_id
