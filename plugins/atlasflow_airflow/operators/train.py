"""TrainBatchOperator: train one batch on the configured backend, resuming from the previous checkpoint."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from atlasflow_airflow.operators.slurm import SlurmJobRunner, slurm_job_runner, task_tag


class TrainBatchOperator(BaseOperator):
    """``training.backend`` decides at run time: ``local`` trains in a child process of this task,
    ``slurm`` submits the very same command line as a SLURM job and defers (no worker slot held).

    The SLURM side is a :class:`SlurmJobRunner` built from :func:`atlasflow.steps.ingest.training_job`.
    The previous batch's checkpoint comes from ``previous_train_task_id``'s XCom; the XCom of this
    task is the training result (checkpoint path and lineage). A batch trained by any earlier run is
    not trained again. Training reads the processed files only, never the integration's output (the
    scVI latent is for evaluation), so it runs beside ``integrate`` rather than after it.

    Parameters
    ----------
    batch_id
        The batch to train.
    previous_train_task_id
        The previous batch's train task, or ``None`` for the first batch.
    processed
        The batch's process results (an ``XComArg`` of the mapped process task, which also makes it
        upstream); with no usable dataset among them the task skips.
    """

    template_fields = ("processed",)
    ui_color = "#f5e6c8"

    def __init__(self, *, batch_id: str, previous_train_task_id: str | None, processed: Any,
                 **kwargs: Any) -> None:
        kwargs.setdefault("pool", "gpu")
        kwargs.setdefault("trigger_rule", "none_failed")
        super().__init__(**kwargs)
        self.batch_id = batch_id
        self.previous_train_task_id = previous_train_task_id
        self.processed = processed
        self.runner: SlurmJobRunner | None = None

    @property
    def job_id(self) -> str | None:
        """The SLURM job this task submitted or adopted (``None`` with the local backend)."""
        return self.runner.job_id if self.runner else None

    def execute(self, context: Any) -> Any:
        from atlasflow.steps.ingest import (
            batch_trained,
            record_trained,
            slurm_training_submitted,
            train_batch_step,
            training_job,
            usable_datasets,
        )
        from atlasflow_airflow.runtime import task_config

        ti = context["ti"]
        if not usable_datasets(list(self.processed or ())):
            raise AirflowSkipException(f"{self.batch_id} has no usable dataset; nothing to train")
        previous = ti.xcom_pull(task_ids=self.previous_train_task_id) if self.previous_train_task_id else None
        checkpoint = (previous or {}).get("checkpoint_dir")
        config = task_config(context)
        if config.training.backend == "local":
            return train_batch_step(config, self.batch_id, previous_checkpoint=checkpoint,
                                    attempt=int(ti.try_number or 1), tag=task_tag(ti))
        if (done := batch_trained(config, self.batch_id)) is not None:
            self.log.info("%s already trained: %s", self.batch_id, done.get("checkpoint_dir"))
            return record_trained(config, self.batch_id, done)
        job = training_job(config, self.batch_id, previous_checkpoint=checkpoint, python=config.slurm.remote_python)
        # dataset_id "train" names the job atlasflow-train-<batch>, as the run report and logs expect
        self.runner = slurm_job_runner(command=job["command"], dataset_id="train", batch_id=self.batch_id,
                                       output_dir=job["log_dir"], slurm=config.slurm)
        slurm_training_submitted(config, self.batch_id)  # the run report's train stage starts here
        self.runner.defer(self, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from atlasflow.steps.ingest import record_trained, slurm_training_finished
        from atlasflow_airflow.runtime import task_config

        config = task_config(context)
        slurm_training_finished(config, self.batch_id, event)  # job id and state for the run report, failed or not
        return record_trained(config, self.batch_id, SlurmJobRunner.resume(event, self.log))

    def on_kill(self) -> None:
        if self.runner:
            self.runner.cancel(self.log)
