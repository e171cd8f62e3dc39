"""atlas_retrain: new rows → ingest; feedback → pseudo-labels; candidate checkpoint → promote or keep.

Runs whenever atlas_ingest's ``publish`` updates the model Asset, and on ``retrain.schedule``
(weekly by default). Wiring only: every task calls one function of ``atlasflow.steps.retrain``.

- ``detect``: manifest rows no run has trained yet, feedback files new since the last promotion;
- ``gate_ingest`` → ``trigger_ingest``: atlas_ingest is triggered (its conf says why) only when
  there are untrained rows, else skipped with the reason;
- ``build_retrain_set``: predictions with confidence above ``retrain.confidence_threshold``
  become pseudo-labels in ``outputs/retrain/retrain.csv``, with their provenance (the next training
  reads it when ``retrain.train_on_pseudo_labels`` is on);
- ``evaluate``: the newest checkpoint and production, on the same held-out validation and canary
  cells (split by dataset id): masked-bin accuracy, and the cell-type head's accuracy on the
  cells with a curated label;
- ``promote``: the ``models/production.json`` pointer moves to the candidate unless it regresses
  by more than ``retrain.tolerance``; the decision and its numbers are in the log, the XCom and
  ``outputs/retrain/decision.json``, and go to the ``notify`` channel.
"""

from __future__ import annotations

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable

from atlasflow.core.assets import MODEL_CHECKPOINT_URI
from atlasflow.core.config import ConfigError
from atlasflow_airflow.dag_defaults import default_args, report, run_config
from atlasflow_airflow.runtime import parse_time_config

try:
    CONFIG = parse_time_config()
    CONFIG_PROBLEM = None
except ConfigError as exc:  # shown on the DAG, never an import error that hides it
    CONFIG, CONFIG_PROBLEM = None, str(exc)

MODEL_ASSET = Asset(MODEL_CHECKPOINT_URI)  # the Asset atlas_ingest's publish task updates
RETRAIN_CRON = CONFIG.retrain.schedule if CONFIG else "@weekly"
SCHEDULE = (AssetOrTimeSchedule(timetable=CronTriggerTimetable(RETRAIN_CRON, timezone="UTC"), assets=[MODEL_ASSET])
            if RETRAIN_CRON else [MODEL_ASSET])

@task
def detect() -> dict:
    """Untrained manifest rows and feedback files new since the last promoted checkpoint."""
    from atlasflow.steps.retrain import detect_changes

    return detect_changes(run_config())


@task
def gate_ingest(detected: dict) -> dict:
    """The conf for atlas_ingest when there are untrained rows; skipped (with the reason) otherwise."""
    from atlasflow.steps.retrain import ingest_trigger

    decision = ingest_trigger(run_config(), detected, run_id=get_current_context()["run_id"])
    if not decision["trigger"]:
        raise AirflowSkipException(decision["reason"])
    return decision["conf"]


@task
def build_retrain_set(detected: dict) -> dict:
    """Feedback predictions above the confidence threshold → outputs/retrain/retrain.csv (with provenance)."""
    from atlasflow.steps.retrain import build_retrain_set as build

    return build(run_config())


@task
def evaluate(retrain_set: dict) -> dict:
    """Score the newest checkpoint and production on the same validation and canary cells."""
    from atlasflow.steps.retrain import evaluate_candidate

    return evaluate_candidate(run_config())


@task
def promote(evaluation: dict) -> dict:
    """Move the production pointer to the candidate unless it regresses beyond retrain.tolerance."""
    from atlasflow.steps.retrain import promote_or_keep
    from atlasflow_airflow.notify import smtp_sender

    return promote_or_keep(run_config(), evaluation, run_id=get_current_context()["run_id"], smtp=smtp_sender)


@dag(
    dag_id="atlas_retrain",
    schedule=SCHEDULE,
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),  # the same retry policy and failure callback as atlas_ingest
    tags=["atlasflow"],
    params={
        "config_overrides": Param(
            {}, type="object", description="Config overrides for this run, e.g. {\"retrain.tolerance\": 0.02}"
        ),
    },
    doc_md=__doc__ + (f"\n\n**Config problem:** {CONFIG_PROBLEM}" if CONFIG_PROBLEM else ""),
)
def atlas_retrain() -> None:
    detected = detect()
    conf = gate_ingest(detected)
    TriggerDagRunOperator(task_id="trigger_ingest", trigger_dag_id="atlas_ingest", conf=conf,
                          wait_for_completion=False)
    promote(evaluate(build_retrain_set(detected))) >> report().as_teardown()


atlas_retrain()
