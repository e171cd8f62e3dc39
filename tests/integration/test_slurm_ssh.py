"""SlurmJobOperator / SlurmJobTrigger / SlurmHook against a real SLURM cluster through a real sshd."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
import uuid

import pytest

from .conftest import conn_uri, ssh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FAST = {"poll_min_s": 0.5, "poll_max_s": 2.0, "lost_grace_s": 20.0, "gpus": 0, "cpus": 1, "mem_gb": 0.1,
        "time_limit": "00:05:00"}


def _dag(task_kwargs: dict, *, retries: int = 0):
    from airflow.sdk import DAG

    from atlasflow_airflow.operators.slurm import SlurmJobOperator

    with DAG(f"slurm_{uuid.uuid4().hex[:8]}", schedule=None, start_date=dt.datetime(2024, 1, 1)) as dag:
        SlurmJobOperator(task_id="train", retries=retries, **task_kwargs)
    _register(dag)
    return dag


def _register(dag) -> None:
    """dag.test() needs the DAG serialized in the DB; these DAGs live only in the test."""
    import tempfile

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=tempfile.mkdtemp())
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)


def _ti(dr):
    return next(t for t in dr.get_task_instances() if t.task_id == "train")


def _squeue_all(cluster) -> list[list[str]]:
    out = ssh(cluster, "squeue -h -t all -o '%i|%T|%k'").stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def test_job_completes_and_returns_result(slurm_airflow, job_command, tmp_path):
    dag = _dag(dict(command=job_command("ok", "b1"), dataset_id="GSE1", batch_id="b1",
                    output_dir=str(tmp_path / "out"), slurm=FAST))
    dr = dag.test()
    ti = _ti(dr)
    assert ti.state == "success"
    result = ti.xcom_pull(task_ids="train")
    assert result["checkpoint"] == str(tmp_path / "out" / "ckpt-b1")


def test_job_exit_3_fails_task_with_exit_code(slurm_airflow, job_command, tmp_path, capfd):
    dag = _dag(dict(command=job_command("exit", "3"), dataset_id="GSE1", batch_id="b2",
                    output_dir=str(tmp_path / "out"), slurm=FAST))
    dr = dag.test()
    assert _ti(dr).state == "failed"
    log = "".join(capfd.readouterr())
    assert "FAILED, exit code 3, reason NonZeroExitCode" in log
    # the job's stdout tail was copied into the task log
    assert "about to fail" in log
