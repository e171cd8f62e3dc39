"""atlas_ingest: manifest → stable batches → per-batch pipeline.

Wiring only. The batches are laid out at parse time from the configured manifest and the saved
plan (a local file read; no Variables, Connections or network). Every task calls one library
function; heavy imports happen inside tasks.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, TaskGroup, dag, task

from atlasflow_airflow.runtime import parse_time_plan

CONFIG, PLAN, PLAN_PROBLEM = parse_time_plan()

DEFAULT_ARGS = {
    "owner": "atlasflow",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=15),
}


@dag(
    dag_id="atlas_ingest",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["atlasflow"],
    params={
        "config_overrides": Param(
            {}, type="object", description="Config overrides for this run, e.g. {\"training.backend\": \"slurm\"}"
        ),
    },
    doc_md=__doc__
    + (f"\n\n**No batches laid out:** {PLAN_PROBLEM}" if PLAN_PROBLEM else "")
    + (f"\n\nPlanned: {len(PLAN.batches)} batches." if PLAN else ""),
)
def atlas_ingest() -> None:
    @task
    def freeze_plan() -> dict:
        """Validate the whole manifest (every problem listed) and save the plan, sealing its batches."""
        from atlasflow.plan import freeze_plan as freeze
        from atlasflow_airflow.runtime import task_config

        return freeze(task_config())

    @task
    def stage_batch(batch_id: str) -> str:
        """Write the batch's datasets to its spec file; later tasks read the batch from there."""
        from atlasflow.plan import write_batch_spec
        from atlasflow_airflow.runtime import task_config

        return write_batch_spec(task_config(), batch_id)

    frozen = freeze_plan()
    for batch in PLAN.batches if PLAN else ():
        with TaskGroup(group_id=batch.batch_id, tooltip=", ".join(batch.dataset_ids)):
            frozen >> stage_batch.override(task_id="stage")(batch.batch_id)


atlas_ingest()
