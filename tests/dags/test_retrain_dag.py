"""atlas_retrain's integrity: its schedule (the ingest DAG's model Asset, or the configured cron), its
tasks and their order, failure notifications, and cheap parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.timetables.assets import AssetOrTimeSchedule

from atlasflow.core.assets import MODEL_CHECKPOINT_URI
from tests.atlasflow.conftest import direct_rows, write_csv
from tests.dags.test_dag_integrity import DAGS, HEAVY, dagbag, write_config


def _asset_uris(timetable) -> list[str]:
    condition = timetable.asset_condition
    if hasattr(condition, "iter_assets"):  # the serialized form (AssetOrTimeSchedule)
        return sorted(key.uri for key, _ in condition.iter_assets())
    return sorted(asset.uri for asset in condition.objects)  # the SDK's AssetAll of a plain asset schedule


def _callbacks(task) -> list:
    cb = task.on_failure_callback  # a list on plain operators, the bare function on mapped ones
    return cb if isinstance(cb, list) else [cb]


def test_retrain_runs_on_the_ingest_asset_or_the_weekly_cron(monkeypatch, tmp_path):
    bag = dagbag(monkeypatch, write_config(tmp_path, write_csv(tmp_path / "m.csv", direct_rows(3))))
    assert bag.import_errors == {}
    dag = bag.dags["atlas_retrain"]
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.timetable.summary == "0 0 * * 0"  # retrain.schedule: @weekly
    publish = bag.dags["atlas_ingest"].get_task("publish")
    assert _asset_uris(dag.timetable) == [o.uri for o in publish.outlets] == [MODEL_CHECKPOINT_URI]
    assert dag.max_active_runs == 1 and not dag.catchup


def test_retrain_schedule_from_config(monkeypatch, tmp_path):
    config = write_config(tmp_path, write_csv(tmp_path / "m.csv", direct_rows(3)))
    config.write_text(config.read_text() + "retrain: {schedule: '30 2 * * 1'}\n")
    dag = dagbag(monkeypatch, config).dags["atlas_retrain"]
    assert dag.timetable.timetable.summary == "30 2 * * 1"
    config.write_text(config.read_text().replace("'30 2 * * 1'", "null"))
    dag = dagbag(monkeypatch, config).dags["atlas_retrain"]
    assert not isinstance(dag.timetable, AssetOrTimeSchedule)  # only the Asset
    assert _asset_uris(dag.timetable) == [MODEL_CHECKPOINT_URI]


def test_retrain_tasks_order_and_notifications(monkeypatch, tmp_path):
    from atlasflow_airflow.notify import notify_failure

    bag = dagbag(monkeypatch, write_config(tmp_path, write_csv(tmp_path / "m.csv", direct_rows(3))))
    dag = bag.dags["atlas_retrain"]
    upstream = {t.task_id: t.upstream_task_ids for t in dag.tasks}
    assert upstream == {"detect": set(), "gate_ingest": {"detect"}, "trigger_ingest": {"gate_ingest"},
                        "build_retrain_set": {"detect"}, "evaluate": {"build_retrain_set"}, "promote": {"evaluate"},
                        "report": {"promote"}}
    assert dag.get_task("report").is_teardown  # runs after a failed promote without hiding it
    trigger = dag.get_task("trigger_ingest")
    assert trigger.trigger_dag_id == "atlas_ingest" and trigger.wait_for_completion is False
    assert "gate_ingest" in str(trigger.conf)  # the gate's XCom: the conf that says why
    assert notify_failure in _callbacks(dag.get_task("promote"))
    ingest = bag.dags["atlas_ingest"]
    assert all(notify_failure in _callbacks(ingest.get_task(f"batch_0000.{t}"))
               for t in ("admit", "download", "process", "integrate", "train", "cleanup"))


def test_a_broken_config_does_not_break_the_retrain_dag(monkeypatch, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("retrain: {confidence_threshold: 2}\n")
    bag = dagbag(monkeypatch, config)
    assert bag.import_errors == {}
    assert "confidence_threshold" in bag.dags["atlas_retrain"].doc_md


def test_retrain_dag_parses_without_heavy_imports(tmp_path):
    config = write_config(tmp_path, write_csv(tmp_path / "m.csv", direct_rows(3)))
    code = (
        "import sys, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS / 'atlas_retrain.py')!r})\n"
        "assert not bag.import_errors and 'atlas_retrain' in bag.dags, bag.import_errors\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    env = {**os.environ, "ATLASFLOW_CONFIG": str(config)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
    assert Path(DAGS / "atlas_retrain.py").exists()


@pytest.mark.slow


def test_retrain_run_triggers_ingest_once_with_a_conf_that_says_why(monkeypatch, tmp_path, airflow_db):
    """A real run (dag.test): untrained manifest rows trigger atlas_ingest; the next run skips the trigger."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    bag = dagbag(monkeypatch, write_config(tmp_path, write_csv(tmp_path / "m.csv", direct_rows(3))))
    dag = bag.dags["atlas_retrain"]
    first = dag.test()
    states = {ti.task_id: ti.state for ti in first.get_task_instances()}
    assert first.state == "success" and states["trigger_ingest"] == "success", states
    with create_session() as session:
        runs = [r for r in session.query(DagRun).filter(DagRun.dag_id == "atlas_ingest")
                if (r.conf or {}).get("retrain_run_id") == first.run_id]
    assert len(runs) == 1
    assert runs[0].conf["new_datasets"] == ["ds000", "ds001", "ds002"]
    assert runs[0].conf["reason"] == "new manifest rows: ds000, ds001, ds002 (batch_0000, batch_0001)"
    decision = next(ti for ti in first.get_task_instances() if ti.task_id == "promote").xcom_pull(task_ids="promote")
    assert decision["action"] == "none" and decision["reason"] == "no trained checkpoint yet"

    second = dag.test()
    states = {ti.task_id: ti.state for ti in second.get_task_instances()}
    assert second.state == "success" and states["gate_ingest"] == states["trigger_ingest"] == "skipped", states


def test_failure_callback_posts_to_the_webhook(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from atlasflow_airflow.notify import notify_failure
    from tests.atlasflow.ops.test_notify import WebhookServer

    config = write_config(tmp_path, write_csv(tmp_path / "m.csv", direct_rows(1)))
    with WebhookServer() as hook:
        config.write_text(config.read_text() + f"notify: {{channel: webhook, webhook_url: '{hook.url}'}}\n")
        monkeypatch.setenv("ATLASFLOW_CONFIG", str(config))
        ti = SimpleNamespace(dag_id="atlas_ingest", task_id="batch_0000.train", run_id="manual__x", try_number=3,
                             log_url="http://127.0.0.1:8080/log")
        notify_failure({"ti": ti, "exception": RuntimeError("job OUT_OF_MEMORY"), "params": {}})
    assert [m["event"] for m in hook.received] == ["task_failed"]
    assert hook.received[0]["details"]["error"] == "RuntimeError: job OUT_OF_MEMORY"
    assert "atlas_ingest.batch_0000.train failed in run manual__x (try 3)" in hook.received[0]["text"]
