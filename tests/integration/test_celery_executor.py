"""atlas_ingest with the CeleryExecutor: the scale-out path of docs/deploy.md, run for real.

A real Redis broker (scripts/local-redis) and a real PostgreSQL metadata DB + Celery result backend
(scripts/local-postgres), Airflow's api-server, scheduler, dag-processor, triggerer and one Celery
worker (scripts/airflow_local.py via LocalAirflow), all on 127.0.0.1 and stopped by PID. A small
2-batch demo keeps it to about a minute.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from atlasflow_testing.demo import build_demo
from atlasflow_testing.geo_server import GeoServer
from atlasflow_testing.local_airflow import LocalAirflow

from .test_real_scheduler import alive, assert_pools_respected

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("airflow.providers.celery", reason="apache-airflow-providers-celery is not installed")


def test_ingest_run_with_celery_worker(tmp_path, postgres_url, redis_url):
    root = tmp_path / "demo"
    (root / "www").mkdir(parents=True)
    with GeoServer(root / "www") as server:
        # 4 datasets in 2 batches; the 15 MB budget still makes batch 2 wait for batch 1's cleanup
        build_demo(root, server.url, n_datasets=4, batch_size=2, missing_row=False, integration_epochs=1)
        airflow = LocalAirflow(tmp_path / "airflow", root / "atlasflow.yaml", parallelism=4, db_url=postgres_url,
                               executor="CeleryExecutor", broker_url=redis_url)
        airflow.start()
        try:
            pids = airflow.pids()
            assert set(pids) == {"api-server", "scheduler", "dag-processor", "triggerer", "celery-worker"}
            run_id, failed = airflow.trigger(timeout=600)
            assert failed == 0, airflow.log("scheduler")[-3000:] + airflow.log("celery-worker")[-3000:]

            states = dict(airflow.query(
                "SELECT task_id || ':' || map_index, state FROM task_instance WHERE run_id = ?", run_id))
            assert states["batch_0001.train:-1"] == "success" and states["publish:-1"] == "success"
            ran = sum(1 for s in states.values() if s == "success")
            # every task ran in the Celery worker: one Celery result per task execution (a rescheduled
            # sensor poke or a retry is one more), all successful. The last ones may still say STARTED
            # for a moment: the task instance succeeds before its Celery task returns.
            deadline = time.time() + 60
            while True:
                results = dict(airflow.query("SELECT status, COUNT(*) FROM celery_taskmeta GROUP BY status"))
                if set(results) != {"SUCCESS", "STARTED"} or time.time() > deadline:
                    break
                time.sleep(1)
            assert results.get("SUCCESS", 0) >= ran and set(results) == {"SUCCESS"}, results

            pools = airflow.query("SELECT task_id, pool, start_date, end_date FROM task_instance "
                                  "WHERE run_id = ? AND start_date IS NOT NULL", run_id)
            slots = {name: (n, d) for name, n, d in airflow.query("SELECT pool, slots, include_deferred FROM slot_pool")}
            assert_pools_respected(pools, slots)
            assert airflow.admission_waits(run_id)["batch_0001.admit"] > 0  # the storage sensor rescheduled

            base = root / "base"
            final = json.loads((base / "models" / "checkpoints" / "batch_0001" / "result.json").read_text())
            assert final["parent_checkpoint"].endswith("batch_0000") and len(final["datasets_seen"]) == 4
        finally:
            airflow.stop()
    assert not any(alive(p) for p in pids.values())


def test_local_redis_refuses_a_busy_port(tmp_path):
    """scripts/local-redis checks the port before installing or starting anything."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**os.environ, "REDIS_STATE_DIR": str(tmp_path), "REDIS_PORT": str(busy.getsockname()[1])}
        done = subprocess.run([str(REPO / "scripts" / "local-redis"), "start"], env=env, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2 and "is busy; set REDIS_PORT" in done.stderr
    assert not (tmp_path / "redis.pid").exists()
