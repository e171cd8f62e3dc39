"""SlurmJobOperator: submit (or adopt) a SLURM job over SSH, then defer to SlurmJobTrigger."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator

from atlasflow.core.config import SlurmConfig
from atlasflow.slurm import JobInfo, JobSpec, JobState, job_tag, scale_resources
from atlasflow.slurm import commands as C

log = logging.getLogger(__name__)


class SlurmJobFailed(RuntimeError):
    """The SLURM job ended in a state other than COMPLETED."""


class SlurmJobOperator(BaseOperator):
    """Run ``command`` as a SLURM job and return the JSON the job wrote to ``$ATLASFLOW_RESULT_PATH``.

    Submission is idempotent: the job carries ``--comment=<tag>`` where the tag is derived from
    dag/run/task/map index. A (re)try first adopts a live or COMPLETED job with that tag; it submits
    only when there is none. After an OUT_OF_MEMORY / TIMEOUT job, the retry scales ``--mem`` /
    ``--time`` by ``slurm.retry_mem_factor`` / ``retry_time_factor`` per such failure.
    """

    template_fields: Sequence[str] = ("command", "dataset_id", "batch_id", "output_dir", "env")
    ui_color = "#d9e8f5"

    def __init__(
        self,
        *,
        command: Sequence[str],
        dataset_id: str,
        batch_id: str,
        output_dir: str,
        slurm: SlurmConfig | Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.command = list(command)
        self.dataset_id = dataset_id
        self.batch_id = batch_id
        self.output_dir = output_dir
        self.slurm = slurm if isinstance(slurm, SlurmConfig) else SlurmConfig(**dict(slurm or {}))
        self.env = dict(env or {})
        self.job_id: str | None = None

    # -- helpers -----------------------------------------------------------------------------------
    def _hook(self):
        from atlasflow_airflow.hooks.slurm import SlurmHook

        return SlurmHook(self.slurm.conn_id, transient_retries=self.slurm.transient_retries)

    def _spec(self, tag: str, attempt: int, previous: list[JobInfo]) -> JobSpec:
        cfg = self.slurm
        spec = JobSpec(
            dataset_id=self.dataset_id, batch_id=self.batch_id, command=tuple(self.command),
            output_dir=self.output_dir, tag=tag, attempt=attempt, partition=cfg.partition,
            account=cfg.account, qos=cfg.qos, time_limit=cfg.time_limit, mem_gb=cfg.mem_gb, cpus=cfg.cpus,
            gpus=cfg.gpus, constraint=cfg.constraint, workdir=cfg.remote_workdir, env_activate=cfg.env_activate,
        )
        n_oom = sum(j.state is JobState.OUT_OF_MEMORY for j in previous)
        n_timeout = sum(j.state is JobState.TIMEOUT for j in previous)
        spec = scale_resources(
            spec, mem_factor=cfg.retry_mem_factor**n_oom, time_factor=cfg.retry_time_factor**n_timeout
        )
        env = {**self.env, "ATLASFLOW_RESULT_PATH": C.result_path_for(spec.stdout_path)}
        return dataclasses.replace(spec, env=env)

    # -- Airflow API -------------------------------------------------------------------------------
    def execute(self, context: Any) -> Any:
        from atlasflow_airflow.triggers.slurm import SlurmJobTrigger

        ti = context["ti"]
        tag = job_tag(ti.dag_id, ti.run_id, ti.task_id, ti.map_index if ti.map_index is not None else -1)
        hook = self._hook()
        tagged = hook.find_by_tag(tag)
        adopt = [j for j in tagged if not j.state.finished] or [j for j in tagged if j.state is JobState.COMPLETED]
        if adopt:
            job = adopt[-1]
            info = hook.job_info(job.job_id)
            stdout = (info.stdout if info else None) or ""
            stderr = (info.stderr if info else None) or stdout
            self.log.info("adopting SLURM job %s (%s) tagged %s instead of submitting", job.job_id,
                          job.state.value, tag)
        else:
            spec = self._spec(tag, int(ti.try_number or 1), [hook.job_info(j.job_id) or j for j in tagged])
            job_id = hook.submit(spec)
            job = JobInfo(job_id, JobState.PENDING)
            stdout, stderr = spec.stdout_path, spec.stderr_path
            self.log.info("submitted SLURM job %s (tag %s, mem %.3g GB, time %s)", job_id, tag, spec.mem_gb,
                          spec.time_limit)
        self.job_id = job.job_id
        self.defer(
            trigger=SlurmJobTrigger(
                job_id=job.job_id, conn_id=self.slurm.conn_id, stdout_path=stdout, stderr_path=stderr,
                result_path=C.result_path_for(stdout), poll_min_s=self.slurm.poll_min_s,
                poll_max_s=self.slurm.poll_max_s, lost_grace_s=self.slurm.lost_grace_s,
                transient_retries=self.slurm.transient_retries,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        self.job_id = event.get("job_id")
        # A failed job's output is what the user needs first: log it at WARNING so it is never filtered.
        level = logging.INFO if event.get("status") == "success" else logging.WARNING
        for key in ("stdout_tail", "stderr_tail"):
            if event.get(key):
                self.log.log(level, "SLURM job %s %s:\n%s", self.job_id, key.replace("_tail", " (tail)"), event[key])
        if event.get("status") != "success":
            raise SlurmJobFailed(f"SLURM {event.get('message') or event}")
        if event.get("result") is None:
            raise SlurmJobFailed(
                f"SLURM job {self.job_id} COMPLETED but wrote no result JSON at "
                f"{C.result_path_for('<stdout>')} ({event.get('result_error', 'missing')})"
            )
        return event["result"]

    def on_kill(self) -> None:
        if self.job_id:
            self.log.info("task killed: cancelling SLURM job %s", self.job_id)
            self._hook().cancel([self.job_id])
