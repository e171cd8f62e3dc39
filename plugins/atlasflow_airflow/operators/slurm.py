"""Run one command as a SLURM job over SSH: a :class:`SlurmJobRunner` that the operators compose.

The runner owns the SLURM side of a task (adopt a job already tagged for this task instance or
submit one, defer to :class:`~atlasflow_airflow.triggers.slurm.SlurmJobTrigger`, read the trigger's
final event, cancel on kill); operators decide *what* to run and hand it a :class:`SlurmJob`. The
Airflow SSH provider is the model: the operator submits then defers, the trigger polls, and what
is submitted comes from pure builders (:func:`build_job_spec`, :func:`build_trigger`).

:class:`SlurmJobOperator` is the generic operator (a command line given up front, templated);
``TrainBatchOperator`` and ``QuantOperator`` build their command at run time and compose the same
runner, so none of them carries arguments it does not use.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk import BaseOperator

from atlasflow.core.config import SlurmConfig
from atlasflow.slurm import JobInfo, JobSpec, JobState, job_tag, scale_resources
from atlasflow.slurm import commands as C

if TYPE_CHECKING:
    from atlasflow_airflow.hooks.slurm import SlurmHook
    from atlasflow_airflow.triggers.slurm import SlurmJobTrigger

log = logging.getLogger(__name__)


class SlurmJobFailed(RuntimeError):
    """The SLURM job ended in a state other than COMPLETED."""


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """What one task runs on the cluster, before the try-specific parts (tag, attempt, scaling).

    Parameters
    ----------
    command
        The argv the job runs.
    dataset_id, batch_id
        Name the job (``atlasflow-<dataset_id>-<batch_id>``) and its output files.
    output_dir
        Where the job's stdout, stderr and result JSON go.
    slurm
        Partition, resources, retry scaling and polling settings.
    env
        Extra environment for the job (``ATLASFLOW_RESULT_PATH`` is always added).
    """

    command: tuple[str, ...]
    dataset_id: str
    batch_id: str
    output_dir: str
    slurm: SlurmConfig
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


def slurm_config(slurm: SlurmConfig | Mapping[str, Any] | None) -> SlurmConfig:
    """A :class:`SlurmConfig` from a config, a mapping of its fields (DAG authors, tests) or nothing (defaults)."""
    return slurm if isinstance(slurm, SlurmConfig) else SlurmConfig(**dict(slurm or {}))


def build_job_spec(job: SlurmJob, tag: str, attempt: int, previous: Sequence[JobInfo]) -> JobSpec:
    """The sbatch spec for one try: ``job`` with its tag, and resources scaled per earlier OOM / TIMEOUT.

    Parameters
    ----------
    job
        What to run.
    tag
        :func:`atlasflow.slurm.job_tag` of the task instance (``--comment``; stable across tries).
    attempt
        The task's try number (names this try's output files).
    previous
        The jobs already tagged for this task instance, with their final states.

    Returns
    -------
    JobSpec
        Pure: the same arguments always give the same spec.
    """
    cfg = job.slurm
    spec = JobSpec(
        dataset_id=job.dataset_id, batch_id=job.batch_id, command=tuple(job.command),
        output_dir=job.output_dir, tag=tag, attempt=attempt, partition=cfg.partition,
        account=cfg.account, qos=cfg.qos, time_limit=cfg.time_limit, mem_gb=cfg.mem_gb, cpus=cfg.cpus,
        gpus=cfg.gpus, constraint=cfg.constraint, workdir=cfg.remote_workdir, env_activate=cfg.env_activate,
        nodes=cfg.nodes, ranks_per_node=cfg.ranks(), rdzv_port=cfg.rdzv_port,
    )
    n_oom = sum(j.state is JobState.OUT_OF_MEMORY for j in previous)
    n_timeout = sum(j.state is JobState.TIMEOUT for j in previous)
    spec = scale_resources(
        spec, mem_factor=cfg.retry_mem_factor**n_oom, time_factor=cfg.retry_time_factor**n_timeout
    )
    env = {**job.env, "ATLASFLOW_RESULT_PATH": C.result_path_for(spec.stdout_path)}
    return dataclasses.replace(spec, env=env)


def build_trigger(slurm: SlurmConfig, job_id: str, stdout_path: str, stderr_path: str) -> SlurmJobTrigger:
    """The trigger that waits for ``job_id`` and reads its result JSON next to ``stdout_path``."""
    # Imported here: the trigger module is only needed once a task runs, never at DAG parse time.
    from atlasflow_airflow.triggers.slurm import SlurmJobTrigger

    return SlurmJobTrigger(
        job_id=job_id, conn_id=slurm.conn_id, stdout_path=stdout_path, stderr_path=stderr_path,
        result_path=C.result_path_for(stdout_path), poll_min_s=slurm.poll_min_s, poll_max_s=slurm.poll_max_s,
        lost_grace_s=slurm.lost_grace_s, transient_retries=slurm.transient_retries,
    )


def task_tag(ti: Any) -> str:
    """The SLURM tag of a task instance (dag/run/task/map index), the same on every try."""
    return job_tag(ti.dag_id, ti.run_id, ti.task_id, ti.map_index if ti.map_index is not None else -1)


class SlurmJobRunner:
    """Submit (or adopt) one task instance's SLURM job, defer its operator, and read the outcome.

    Submission is idempotent: the job carries ``--comment=<tag>`` where the tag is derived from
    dag/run/task/map index. A (re)try first adopts a live or COMPLETED job with that tag, listed among
    the connection user's jobs only and checked (:func:`atlasflow.slurm.commands.adoption_problem`)
    to belong to that user and to write where this task would; it submits only when there is none. After an OUT_OF_MEMORY / TIMEOUT job, the retry scales ``--mem`` /
    ``--time`` by ``slurm.retry_mem_factor`` / ``retry_time_factor`` per such failure.

    Parameters
    ----------
    job
        What to run; build it with :func:`slurm_job_runner` or :class:`SlurmJob`.
    """

    def __init__(self, job: SlurmJob) -> None:
        self.job = job
        self.job_id: str | None = None  # set once a job is submitted or adopted (on_kill cancels it)

    def hook(self) -> SlurmHook:
        # Imported here: the SSH provider costs DAG parsing time and is needed only by a running task.
        from atlasflow_airflow.hooks.slurm import SlurmHook

        return SlurmHook(self.job.slurm.conn_id, transient_retries=self.job.slurm.transient_retries)

    def submit_or_adopt(self, ti: Any, task_log: logging.Logger | logging.LoggerAdapter = log) -> SlurmJobTrigger:
        """Adopt this task instance's live (or COMPLETED) job, else submit one; the trigger that waits for it."""
        tag = task_tag(ti)
        hook = self.hook()
        tagged = hook.find_by_tag(tag)
        candidates = [j for j in tagged if not j.state.finished] or [j for j in tagged if j.state is JobState.COMPLETED]
        adopted: tuple[JobInfo, JobInfo] | None = None
        for candidate in reversed(candidates):
            info = hook.job_info(candidate.job_id)
            problem = C.adoption_problem(info, user=hook.remote_user(), output_dir=self.job.output_dir, tag=tag)
            if problem is None and info is not None:
                adopted = (candidate, info)
                break
            task_log.warning("not adopting SLURM job %s tagged %s: %s", candidate.job_id, tag, problem)
        if adopted is not None:
            job, info = adopted
            stdout = info.stdout or ""
            stderr = info.stderr or stdout
            task_log.info("adopting SLURM job %s (%s) tagged %s instead of submitting", job.job_id,
                          job.state.value, tag)
        else:
            spec = build_job_spec(self.job, tag, int(ti.try_number or 1),
                                  [hook.job_info(j.job_id) or j for j in tagged])
            job_id = hook.submit(spec)
            job = JobInfo(job_id, JobState.PENDING)
            stdout, stderr = spec.stdout_path, spec.stderr_path
            task_log.info("submitted SLURM job %s (tag %s, mem %.3g GB, time %s)", job_id, tag, spec.mem_gb,
                          spec.time_limit)
        self.job_id = job.job_id
        return build_trigger(self.job.slurm, job.job_id, stdout, stderr)

    def defer(self, operator: BaseOperator, context: Any, method_name: str = "execute_complete") -> NoReturn:
        """Submit or adopt, then defer ``operator`` to the trigger (no worker slot held while the job runs)."""
        from airflow.sdk.exceptions import AirflowFailException

        from atlasflow_airflow.hooks.slurm import SSHPermanentError

        try:
            trigger = self.submit_or_adopt(context["ti"], operator.log)
        except SSHPermanentError as exc:
            raise AirflowFailException(str(exc)) from exc  # authentication, host key, host name: no retry
        operator.defer(trigger=trigger, method_name=method_name)
        raise AssertionError("BaseOperator.defer returned")  # it raises TaskDeferred; keeps NoReturn honest

    @staticmethod
    def resume(event: Mapping[str, Any], task_log: logging.Logger | logging.LoggerAdapter = log) -> Any:
        """The JSON the job wrote to ``$ATLASFLOW_RESULT_PATH``, from the trigger's final event.

        Raises
        ------
        SlurmJobFailed
            The job did not complete, or completed without writing its result.
        AirflowFailException
            The trigger lost the cluster for good (authentication, host key, host name): no retry.
        """
        job_id = event.get("job_id")
        # A failed job's output is what the user needs first: log it at WARNING so it is never filtered.
        level = logging.INFO if event.get("status") == "success" else logging.WARNING
        for key in ("stdout_tail", "stderr_tail"):
            if event.get(key):
                task_log.log(level, "SLURM job %s %s:\n%s", job_id, key.replace("_tail", " (tail)"), event[key])
        if event.get("permanent"):
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"SLURM job {job_id}: {event.get('message')}")
        if event.get("status") != "success":
            raise SlurmJobFailed(f"SLURM {event.get('message') or event}")
        if event.get("result") is None:
            raise SlurmJobFailed(
                f"SLURM job {job_id} COMPLETED but wrote no result JSON at "
                f"{C.result_path_for('<stdout>')} ({event.get('result_error', 'missing')})"
            )
        return event["result"]

    def cancel(self, task_log: logging.Logger | logging.LoggerAdapter = log) -> None:
        """Cancel the submitted or adopted job, if any (the task was killed)."""
        if self.job_id:
            task_log.info("task killed: cancelling SLURM job %s", self.job_id)
            self.hook().cancel([self.job_id])


def slurm_job_runner(
    *,
    command: Sequence[str],
    dataset_id: str,
    batch_id: str,
    output_dir: str,
    slurm: SlurmConfig | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> SlurmJobRunner:
    """The runner for one job (pure: no connection is opened until the runner submits)."""
    return SlurmJobRunner(SlurmJob(command=tuple(command), dataset_id=dataset_id, batch_id=batch_id,
                                   output_dir=output_dir, slurm=slurm_config(slurm), env=dict(env or {})))


class SlurmJobOperator(BaseOperator):
    """Run ``command`` as a SLURM job and return the JSON the job wrote to ``$ATLASFLOW_RESULT_PATH``.

    The generic operator over :class:`SlurmJobRunner` (see there for adoption and retry scaling);
    every argument but ``slurm`` is templated.
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
        self.slurm = slurm_config(slurm)
        self.env = dict(env or {})
        self.runner: SlurmJobRunner | None = None

    @property
    def job_id(self) -> str | None:
        """The SLURM job this task submitted or adopted (``None`` before ``execute``)."""
        return self.runner.job_id if self.runner else None

    def execute(self, context: Any) -> Any:
        # Built here, not in __init__: the templated fields are rendered by now.
        self.runner = slurm_job_runner(command=self.command, dataset_id=self.dataset_id, batch_id=self.batch_id,
                                       output_dir=self.output_dir, slurm=self.slurm, env=self.env)
        self.runner.defer(self, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        return SlurmJobRunner.resume(event, self.log)

    def on_kill(self) -> None:
        if self.runner:
            self.runner.cancel(self.log)
