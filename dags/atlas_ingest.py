"""atlas_ingest: manifest → stable batches → admit → download → quant → process → (integrate ∥ train) → cleanup.

Wiring only: every task calls one library function (``atlasflow.steps.ingest``), heavy imports
happen inside tasks, and the batches are laid out at parse time from the configured manifest
and the saved plan (a local file read; no Variables, Connections or network). Batch *i+1* is
admitted after batch *i* and trains after it, so it downloads and processes while *i* trains,
as far as the disk budget allows. A batch's ``integrate`` (scVI, for evaluation) and ``train`` run
side by side; each chains to the previous batch's own step (scArches surgery, checkpoint resume).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, Param, TaskGroup, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from atlasflow.core.assets import MODEL_CHECKPOINT_URI
from atlasflow_airflow.dag_defaults import default_args, lower_cpu_priority, report, run_config
from atlasflow_airflow.operators.quant import QuantOperator
from atlasflow_airflow.operators.train import TrainBatchOperator
from atlasflow_airflow.operators.validate import SystemValidationOperator
from atlasflow_airflow.runtime import parse_time_plan
from atlasflow_airflow.sensors.storage import StorageAdmissionSensor

CONFIG, PLAN, PLAN_PROBLEM = parse_time_plan()
MODEL_ASSET = Asset(MODEL_CHECKPOINT_URI)

DOWNLOAD_RETRIES = CONFIG.download.retries if CONFIG else 3
PIPELINING = CONFIG.plan.pipelining if CONFIG else True
ADMISSION_POKE_S = CONFIG.storage.admission_poke_s if CONFIG else 30.0
ADMISSION_MAX_WAIT = timedelta(seconds=CONFIG.storage.admission_max_wait_s if CONFIG else 300.0)
# kb count has its own limit (quant.timeout_s, process group killed); Airflow's is the backstop
QUANT_TIMEOUT = timedelta(seconds=(CONFIG.quant.timeout_s if CONFIG else 600.0) + 120)


@task
def prepare() -> dict:
    """Validate the whole manifest (every problem listed), seal the plan, pin the vocabulary."""
    from atlasflow.steps.ingest import prepare_run

    return prepare_run(run_config())


@task(pool="downloads", retries=DOWNLOAD_RETRIES, map_index_template="{{ dataset_id }}",
      execution_timeout=timedelta(seconds=CONFIG.download.timeout_s) if CONFIG else None)
def download(batch_id: str, dataset_id: str) -> dict:
    """Fetch one dataset; after the last retry a dataset that still fails is quarantined."""
    from atlasflow.steps.ingest import download_dataset

    context = get_current_context()
    context["dataset_id"] = dataset_id
    ti = context["ti"]
    return download_dataset(run_config(), batch_id, dataset_id, final_try=ti.try_number > ti.max_tries)


@task(map_index_template="{{ dataset_id }}", on_execute_callback=lower_cpu_priority)  # yields to the chains
def process(batch_id: str, fetched: dict) -> dict:
    """Read → QC → gene harmonisation → processed h5ad; a bad dataset is quarantined, not fatal."""
    from atlasflow.steps.ingest import process_dataset_step

    get_current_context()["dataset_id"] = fetched["dataset_id"]
    return process_dataset_step(run_config(), batch_id, fetched)


@task(trigger_rule="none_failed")  # after the previous batch's integrate, which skips for an empty batch
def integrate(batch_id: str, processed: list[dict]) -> dict:
    """scVI on the batch (scArches surgery onto the previous batch's model); skips an empty batch."""
    from atlasflow.steps.ingest import integrate_batch_step

    result = integrate_batch_step(run_config(), batch_id, list(processed))
    if result["status"] == "skipped":
        raise AirflowSkipException(result["reason"])
    return result


@task
def cleanup(batch_id: str) -> dict:
    """Free what the policy says (raw, processed, old checkpoints, cache); release the reservation."""
    from atlasflow.steps.ingest import cleanup_batch

    return cleanup_batch(run_config(), batch_id)


@task(outlets=[MODEL_ASSET], trigger_rule="none_failed")
def publish(last_train: str) -> dict | None:
    """Announce the newest checkpoint as the model Asset (the retraining DAG listens to it)."""
    return get_current_context()["ti"].xcom_pull(task_ids=last_train)


@dag(
    dag_id="atlas_ingest",
    schedule=CONFIG.plan.schedule if CONFIG else None,
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),  # retry policy and failure callback: atlasflow_airflow.dag_defaults
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
    prepared = prepare()
    # Fails the run before any download when the budget exceeds the disk or a tool is missing. Beside
    # prepare, not before it: neither reads the other's output, and a run with a bad manifest and a
    # bad system names both at once.
    validated = SystemValidationOperator(task_id="validate_system", retries=1)
    reported = report().as_teardown()
    cleanups = []
    previous_admit = previous_train = previous_cleanup = previous_integrate = None
    previous_train_id: str | None = None
    for batch in PLAN.batches if PLAN else ():
        bid = batch.batch_id
        with TaskGroup(group_id=bid, tooltip=", ".join(batch.dataset_ids)):
            admit = StorageAdmissionSensor(task_id="admit", batch_id=bid, poke_interval=ADMISSION_POKE_S,
                                           max_wait=ADMISSION_MAX_WAIT)
            # The sealed plan fixes a batch's datasets, so the map is known at parse time; it is
            # still a dynamic map (one instance per dataset, named by its id in the UI).
            fetched = download.partial(batch_id=bid).expand(dataset_id=list(batch.dataset_ids))
            counts = fetched
            if PLAN.has_reads(bid):
                # raw reads → counts (pool quant; FASTQ deleted once quantified); count files pass through
                counts = QuantOperator.partial(task_id="quant", batch_id=bid, pool="quant",
                                                map_index_template="{{ dataset_id }}",
                                                on_execute_callback=lower_cpu_priority,
                                                execution_timeout=QUANT_TIMEOUT).expand(fetched=fetched).output
            processed = process.partial(batch_id=bid).expand(fetched=counts)
            integrated = integrate(bid, processed)
            # training reads the processed files, not the integration (its latent is for evaluation):
            # the two run side by side, and cleanup (which deletes the processed files) waits for both
            trained = TrainBatchOperator(task_id="train", batch_id=bid, previous_train_task_id=previous_train_id,
                                         processed=processed)
            done = cleanup(bid)
            [validated, prepared] >> admit >> fetched
            [integrated, trained] >> done
            done.as_teardown(setups=admit)
            cleanups.append(done)
        if previous_admit is not None:
            previous_admit >> admit  # admission in plan order: no batch starves
            previous_train >> trained  # training in plan order, each resuming the last checkpoint
            previous_integrate >> integrated  # scArches surgery onto the previous batch's scVI model
            if not PIPELINING:
                previous_cleanup >> admit
        previous_admit, previous_train, previous_cleanup, previous_train_id = admit, trained, done, f"{bid}.train"
        previous_integrate = integrated
    if previous_train is not None:
        published = publish(previous_train_id)
        previous_train >> published
        [published, *cleanups] >> reported
    else:
        [validated, prepared] >> reported


atlas_ingest()
