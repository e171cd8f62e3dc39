"""QuantOperator mapped over download results in a real DAG run (dag.test, SQLite metadata DB):
each reads dataset is quantified and its FASTQ deleted, anything else passes through, and the
map index is labelled with the dataset id."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import uuid
from pathlib import Path

import pytest

from atlasflow.core.config import load_config
from atlasflow.intake.plan import write_batch_spec
from atlasflow.steps import ingest as P
from atlasflow_testing.geo_server import GeoServer
from atlasflow_testing.reads import build_fastq_demo, indexed_reference

pytestmark = pytest.mark.timeout(600)


def _register(dag) -> None:
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=tempfile.mkdtemp())
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)


@pytest.mark.slow


def test_mapped_quant_operator_in_a_dag_run(airflow_db, tmp_path, monkeypatch):
    from airflow.sdk import DAG, task

    from atlasflow_airflow.operators.quant import QuantOperator

    kb = indexed_reference(tmp_path / "ref", n_genes=8, n_barcodes=200, seed=3)
    (tmp_path / "www").mkdir()
    with GeoServer(tmp_path / "www") as server:
        build_fastq_demo(tmp_path, server.url, reference=kb["ref"], index=kb["index"], t2g=kb["t2g"],
                         onlist=kb["onlist"], barcodes=kb["barcodes"], n_samples=1, n_cells=5)
        monkeypatch.setenv("ATLASFLOW_CONFIG", str(tmp_path / "atlasflow.yaml"))
        config = load_config(tmp_path / "atlasflow.yaml")
        P.prepare_run(config)
        write_batch_spec(config, "batch_0000")
        assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
        fetched = P.download_dataset(config, "batch_0000", "fq0", final_try=True)
    gone = {"dataset_id": "gone", "status": "quarantined", "stage": "download", "reason": "HTTP 404"}

    with DAG(f"quant_{uuid.uuid4().hex[:8]}", schedule=None, start_date=dt.datetime(2024, 1, 1)) as dag:
        @task
        def results() -> list[dict]:
            return [fetched, gone]

        QuantOperator.partial(task_id="quant", batch_id="batch_0000", pool="default_pool",
                              map_index_template="{{ dataset_id }}").expand(fetched=results())
    _register(dag)
    run = dag.test()
    tis = sorted((t for t in run.get_task_instances() if t.task_id == "quant"), key=lambda t: t.map_index)
    assert [t.state for t in tis] == ["success", "success"]
    assert [t.rendered_map_index for t in tis] == ["fq0", "gone"]
    out = [t.xcom_pull(task_ids="quant", map_indexes=t.map_index) for t in tis]
    assert out[0]["status"] == "ok" and out[0]["quant"]["reads_pseudoaligned"] > 0
    assert out[1] == gone  # not reads (here: already quarantined): passed through untouched
    raw = config.base_dir / "data" / "raw" / "fq0"
    assert list(raw.glob("*.fastq.gz")) == [] and json.loads((raw / "counts" / "quant.json").read_text())
    assert Path(raw / "counts" / "matrix.mtx.gz").exists()
