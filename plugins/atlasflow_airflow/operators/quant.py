"""QuantOperator: quantify one downloaded reads dataset (kb count), locally or as a SLURM job."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from atlasflow_airflow.operators.slurm import SlurmJobRunner, slurm_job_runner


class QuantOperator(BaseOperator):
    """Mapped over a batch's download results (``fetched``), in pool ``quant``.

    ``quant.backend`` decides at run time: ``local`` runs kb count in this task (a hard time
    limit, the process group killed on expiry), ``slurm`` submits ``atlasflow quant run`` to the
    CPU partition through a :class:`SlurmJobRunner` and defers, exactly as training does. Either
    way the FASTQ files are deleted (and the ledger records the bytes) on this side once the counts
    are written; a bad sample is quarantined. Datasets that are not raw reads pass through untouched.

    Parameters
    ----------
    batch_id
        The batch the dataset belongs to.
    fetched
        One download result (mapped over the batch's ``download`` XComs).
    """

    template_fields = ()
    ui_color = "#e3f0d8"

    def __init__(self, *, batch_id: str, fetched: dict[str, Any], **kwargs: Any) -> None:
        kwargs.setdefault("pool", "quant")
        super().__init__(**kwargs)
        self.batch_id = batch_id
        self.fetched = fetched
        self.runner: SlurmJobRunner | None = None

    @property
    def job_id(self) -> str | None:
        """The SLURM job this task submitted or adopted (``None`` with the local backend)."""
        return self.runner.job_id if self.runner else None

    def execute(self, context: Any) -> Any:
        from atlasflow.steps.ingest import quant_dataset_step, quant_job, reads_to_quantify
        from atlasflow_airflow.runtime import task_config

        fetched = dict(self.fetched)
        context["dataset_id"] = fetched.get("dataset_id")  # the map index label in the UI
        config = task_config(context)
        if config.quant.backend == "local" or not reads_to_quantify(config, self.batch_id, fetched):
            return quant_dataset_step(config, self.batch_id, fetched)
        job = quant_job(config, self.batch_id, fetched["dataset_id"], python=config.slurm.remote_python)
        self.runner = slurm_job_runner(command=job["command"], dataset_id=fetched["dataset_id"],
                                       batch_id=self.batch_id, output_dir=job["log_dir"], slurm=job["slurm"])
        self.runner.defer(self, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from atlasflow.steps.ingest import finish_quant
        from atlasflow_airflow.runtime import task_config

        outcome = SlurmJobRunner.resume(event, self.log)
        return finish_quant(task_config(context), self.batch_id, outcome["dataset_id"], outcome)

    def on_kill(self) -> None:
        if self.runner:
            self.runner.cancel(self.log)
