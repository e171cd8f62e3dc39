"""The storage sensor: a batch starts only when its bytes fit the disk budget."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException


class StorageAdmissionSensor(BaseSensorOperator):
    """Reserve ``batch_id``'s footprint in the storage ledger, waiting until it fits.

    Runs in ``reschedule`` mode, so a waiting batch holds no worker slot between pokes. Batches
    are admitted in plan order (the ledger refuses batch *i+1* before batch *i*). A batch larger
    than the whole budget fails at once with the reason instead of waiting forever. The XCom is
    the admission record (bytes reserved, footprint per dataset).
    """

    template_fields = ("batch_id",)
    ui_color = "#e8d8f5"

    def __init__(self, *, batch_id: str, **kwargs: Any) -> None:
        kwargs.setdefault("mode", "reschedule")
        kwargs.setdefault("poke_interval", 10)
        kwargs.setdefault("exponential_backoff", True)
        kwargs.setdefault("max_wait", timedelta(minutes=5))
        kwargs.setdefault("timeout", timedelta(days=7))
        super().__init__(**kwargs)
        self.batch_id = batch_id

    def poke(self, context: Any) -> PokeReturnValue:
        from atlasflow.steps.ingest import BudgetExceededError, admit_batch
        from atlasflow_airflow.runtime import task_config

        ti = context["ti"]
        owner = f"{ti.dag_id}/{ti.run_id}/{ti.task_id}"
        try:
            admission = admit_batch(task_config(context), self.batch_id, owner=owner)
        except BudgetExceededError as exc:
            raise AirflowFailException(str(exc)) from exc
        self.log.info(admission["reason"])
        return PokeReturnValue(is_done=admission["admitted"], xcom_value=admission)
