"""What every atlasflow DAG shares, in one place so the DAGs cannot drift apart.

- :func:`default_args`: the owner, the retry policy (:data:`RETRY_POLICY`) and the failure
  callback (:func:`~atlasflow_airflow.notify.notify_failure`, which goes to ``notify.channel``);
- :func:`run_config`: the config a running task uses (file, overrides Variable, run Params);
- :func:`report`: the run-report teardown task (task id ``report``);
- :func:`lower_cpu_priority`: the ``on_execute_callback`` of the worker's parallel CPU stages.

Imported on every DAG parse: nothing heavy at module level (ruff TID253).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from airflow.sdk import get_current_context, task

from atlasflow_airflow.notify import notify_failure
from atlasflow_airflow.runtime import task_config

if TYPE_CHECKING:
    from atlasflow.core.config import AtlasConfig

OWNER = "atlasflow"

#: Every task's retries unless it says otherwise: transient failures (a network blip, a busy
#: cluster) get three tries, backing off from 30 s to at most 15 minutes. Read-only: a DAG that
#: needs another policy for one task passes it to that task, never edits the shared one.
RETRY_POLICY: Mapping[str, Any] = MappingProxyType({
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=15),
})


def default_args() -> dict[str, Any]:
    """The ``default_args`` of every atlasflow DAG: owner, :data:`RETRY_POLICY` and the failure callback.

    Returns
    -------
    dict
        A new dict per call, since Airflow keeps (and may update) the one a DAG is given.
    """
    return {
        "owner": OWNER,
        **RETRY_POLICY,
        "on_failure_callback": notify_failure,  # notify.channel: log (default), webhook or smtp
    }


def lower_cpu_priority(context: Any) -> None:
    """Raise this task process's niceness by ``qc.nice`` (an ``on_execute_callback``; runs in the task process).

    For ``process`` and ``quant``: many run at once and nothing waits on one of them alone, while each
    batch's ``train`` and ``integrate`` wait for the previous batch's. On a worker that also trains
    (local backend, few cores) the chains then keep their pace and QC fills the idle cores; with
    ``qc.nice: 0`` or training on SLURM nothing changes. Children (a quant job's ``kb``) inherit it.
    """
    nice = task_config(context).qc.nice
    if nice:
        os.nice(nice)


def run_config() -> AtlasConfig:
    """The config of the running task (inside a task only: it reads the task context)."""
    return task_config(get_current_context())


@task(task_id="report")
def report() -> dict:
    """Write the run report (reports/<run_id>/report.html, run_metrics.json, reports/latest.json).

    Used as a teardown with no setups (``report().as_teardown()``): it runs once everything
    upstream is done, whatever their states (``all_done``), and, unlike a plain ``all_done`` leaf,
    its success does not mark a run with failed tasks successful. In atlas_retrain it refreshes the
    report so it shows the retraining decision and why.
    """
    from atlasflow.ops.report import write_run_report

    return write_run_report(run_config(), get_current_context()["run_id"])
