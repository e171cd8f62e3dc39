"""Both DAGs take their retry policy, failure callback and report teardown from one module
(atlasflow_airflow.dag_defaults), so they cannot drift apart."""

from __future__ import annotations

from tests.atlasflow.conftest import direct_rows, write_csv
from tests.dags.test_dag_integrity import DAGS, dagbag, write_config

DAG_IDS = ("atlas_ingest", "atlas_retrain")


def _callbacks(task) -> list:
    cb = task.on_failure_callback  # a list on plain operators, the bare function on mapped ones
    return cb if isinstance(cb, list) else [cb]


def test_default_args_are_the_shared_policy_and_a_fresh_copy():
    from atlasflow_airflow.dag_defaults import RETRY_POLICY, default_args
    from atlasflow_airflow.notify import notify_failure

    args = default_args()
    assert args == {"owner": "atlasflow", **RETRY_POLICY, "on_failure_callback": notify_failure}
    assert args is not default_args()  # a DAG that keeps (or edits) its dict cannot change the other's
    assert RETRY_POLICY["retries"] >= 1


def test_both_dags_get_the_same_retry_policy_and_failure_callback(monkeypatch, tmp_path):
    from atlasflow_airflow.dag_defaults import RETRY_POLICY, default_args
    from atlasflow_airflow.notify import notify_failure

    bag = dagbag(monkeypatch, write_config(tmp_path, write_csv(tmp_path / "m.csv", direct_rows(3))))
    assert bag.import_errors == {}
    for dag_id in DAG_IDS:
        dag = bag.dags[dag_id]
        assert dag.default_args == default_args(), dag_id
        # the shared report teardown, and a task with no retry settings of its own, carry the policy
        for task_id in ("report", "batch_0000.integrate" if dag_id == "atlas_ingest" else "promote"):
            task = dag.get_task(task_id)
            assert notify_failure in _callbacks(task), (dag_id, task_id)
            assert task.retries == RETRY_POLICY["retries"], (dag_id, task_id)
            assert task.retry_delay == RETRY_POLICY["retry_delay"], (dag_id, task_id)
            assert task.retry_exponential_backoff == RETRY_POLICY["retry_exponential_backoff"], (dag_id, task_id)
            assert task.max_retry_delay == RETRY_POLICY["max_retry_delay"], (dag_id, task_id)
        report = dag.get_task("report")
        assert report.is_teardown and report.task_type == "_PythonDecoratedOperator"
        assert report.python_callable.__module__ == "atlasflow_airflow.dag_defaults"
    # the policy is defined in one place: neither DAG file spells out its own
    for path in DAGS.glob("*.py"):
        text = path.read_text()
        assert "retry_delay" not in text and "notify_failure" not in text, path.name


def _niceness_after_callback(config_path: str, queue) -> None:
    """In a forked child (the test process keeps its priority): run the callback, report the change."""
    import os

    from atlasflow.core.config import load_config
    from atlasflow_airflow import dag_defaults

    dag_defaults.task_config = lambda context: load_config(config_path)  # the context's config, without a run
    before = os.getpriority(os.PRIO_PROCESS, 0)
    dag_defaults.lower_cpu_priority({})
    queue.put(os.getpriority(os.PRIO_PROCESS, 0) - before)


def test_lower_cpu_priority_renices_the_task_process_by_qc_nice(tmp_path):
    import multiprocessing
    import os

    fork = multiprocessing.get_context("fork")
    changes = []
    for nice in (7, 0):
        path = tmp_path / f"nice{nice}.yaml"
        path.write_text(f"storage:\n  base_dir: {tmp_path / 'base'}\nqc:\n  nice: {nice}\n")
        queue = fork.Queue()
        child = fork.Process(target=_niceness_after_callback, args=(str(path), queue))
        child.start()
        changes.append(queue.get(timeout=60))
        child.join(timeout=60)
        assert child.exitcode == 0
    # by the configured amount (the OS caps niceness at 19, should the test itself run niced), and not
    # at all with qc.nice: 0
    assert changes == [min(7, 19 - os.getpriority(os.PRIO_PROCESS, 0)), 0]
