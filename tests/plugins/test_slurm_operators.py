"""The SLURM side of TrainBatchOperator, QuantOperator and SlurmJobOperator, without a cluster.

A recording stand-in for SlurmHook shows what each operator submits (the JobSpec), adopts, and
defers on (the SlurmJobTrigger, through ``serialize()`` as the triggerer gets it). The expected
specs and triggers are written out field by field from the config, so the composition with
:class:`SlurmJobRunner` is held to what the operators did when they subclassed SlurmJobOperator.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from atlasflow.core.config import load_config
from atlasflow.slurm import JobInfo, JobSpec, JobState, job_tag
from atlasflow.slurm import commands as C

TRIGGER_PATH = "atlasflow_airflow.triggers.slurm.SlurmJobTrigger"


class FakeHook:
    """Stands in for SlurmHook: tagged jobs and job details are given; submissions and cancels recorded."""

    tagged: list[JobInfo] = []
    details: dict[str, JobInfo] = {}
    submitted: list[JobSpec] = []
    cancelled: list[list[str]] = []
    made: list[tuple[str, int]] = []

    def __init__(self, ssh_conn_id: str = "slurm_ssh", *, transient_retries: int = 5) -> None:
        FakeHook.made.append((ssh_conn_id, transient_retries))

    def find_by_tag(self, tag: str) -> list[JobInfo]:
        return list(FakeHook.tagged)

    def remote_user(self) -> str:
        return "alice"

    def job_info(self, job_id: str) -> JobInfo | None:
        return FakeHook.details.get(job_id)

    def submit(self, spec: JobSpec) -> str:
        FakeHook.submitted.append(spec)
        return "4242"

    def cancel(self, job_ids: list[str]) -> None:
        FakeHook.cancelled.append(list(job_ids))


class FakeTI:
    def __init__(self, task_id: str, *, try_number: int = 1, map_index: int = -1, xcom: dict | None = None) -> None:
        self.dag_id, self.run_id, self.task_id = "atlas_ingest", "manual__1", task_id
        self.map_index, self.try_number = map_index, try_number
        self._xcom = xcom or {}

    def xcom_pull(self, task_ids: str):
        return self._xcom.get(task_ids)


@pytest.fixture
def hook(monkeypatch):
    import atlasflow_airflow.hooks.slurm as hooks

    FakeHook.tagged, FakeHook.details, FakeHook.submitted, FakeHook.cancelled, FakeHook.made = [], {}, [], [], []
    monkeypatch.setattr(hooks, "SlurmHook", FakeHook)
    return FakeHook


@pytest.fixture
def config(tmp_path, monkeypatch):
    import atlasflow_airflow.runtime as runtime

    cfg = load_config(overrides={
        "storage.base_dir": str(tmp_path / "base"), "training.backend": "slurm", "quant.backend": "slurm",
        "slurm.conn_id": "cluster", "slurm.partition": "gpu", "slurm.account": "lab", "slurm.qos": "normal",
        "slurm.mem_gb": 8, "slurm.cpus": 2, "slurm.gpus": 1, "slurm.time_limit": "01:00:00",
        "slurm.env_activate": "/opt/venv", "slurm.poll_min_s": 2, "slurm.poll_max_s": 90,
        "slurm.lost_grace_s": 120, "slurm.transient_retries": 3, "quant.slurm_partition": "cpu",
    })
    monkeypatch.setattr(runtime, "task_config", lambda context=None: cfg)
    return cfg


def _deferred(op, ti):
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti, "params": {}})
    assert deferred.value.method_name == "execute_complete"
    return deferred.value.trigger


def _expected_spec(slurm, *, dataset_id, batch_id, command, output_dir, tag, attempt=1, mem_gb=None,
                   time_limit=None) -> JobSpec:
    spec = JobSpec(dataset_id=dataset_id, batch_id=batch_id, command=tuple(command), output_dir=output_dir, tag=tag,
                   attempt=attempt, partition=slurm.partition, account=slurm.account, qos=slurm.qos,
                   time_limit=time_limit or slurm.time_limit, mem_gb=mem_gb or slurm.mem_gb, cpus=slurm.cpus,
                   gpus=slurm.gpus, constraint=slurm.constraint, workdir=slurm.remote_workdir,
                   env_activate=slurm.env_activate)
    return dataclasses.replace(spec, env={"ATLASFLOW_RESULT_PATH": C.result_path_for(spec.stdout_path)})


def _expected_trigger(slurm, job_id, stdout, stderr) -> tuple[str, dict]:
    return TRIGGER_PATH, {
        "job_id": job_id, "conn_id": slurm.conn_id, "stdout_path": stdout, "stderr_path": stderr,
        "result_path": C.result_path_for(stdout), "poll_min_s": float(slurm.poll_min_s),
        "poll_max_s": float(slurm.poll_max_s), "lost_grace_s": float(slurm.lost_grace_s),
        "transient_retries": slurm.transient_retries,
    }


def _round_trip(trigger) -> tuple[str, dict]:
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    assert getattr(importlib.import_module(module), name)(**kwargs).serialize() == (path, kwargs)
    return path, kwargs


def _train_op(processed=({"dataset_id": "ds1", "status": "ok", "path": "/p/ds1.h5ad", "cells_after": 5},)):
    from atlasflow_airflow.operators.train import TrainBatchOperator

    return TrainBatchOperator(task_id="batch_0001.train", batch_id="batch_0001",
                              previous_train_task_id="batch_0000.train", processed=processed)


def _train_ti(**kwargs) -> FakeTI:
    return FakeTI("batch_0001.train", xcom={"batch_0000.train": {"checkpoint_dir": None}}, **kwargs)


def test_train_operator_submits_the_training_job_and_defers(config, hook):
    from atlasflow.steps.ingest import training_job

    op = _train_op()
    assert (op.pool, op.trigger_rule, op.template_fields) == ("gpu", "none_failed", ("processed",))
    trigger = _deferred(op, _train_ti())
    job = training_job(config, "batch_0001", previous_checkpoint=None, python=config.slurm.remote_python)
    tag = job_tag("atlas_ingest", "manual__1", "batch_0001.train", -1)
    expected = _expected_spec(config.slurm, dataset_id="train", batch_id="batch_0001", command=job["command"],
                              output_dir=job["log_dir"], tag=tag)
    assert hook.submitted == [expected]
    assert hook.made[0] == ("cluster", 3)
    assert _round_trip(trigger) == _expected_trigger(config.slurm, "4242", expected.stdout_path, expected.stderr_path)
    assert op.job_id == "4242"


def test_train_retry_after_oom_scales_memory(config, hook):
    hook.tagged = [JobInfo("17", JobState.OUT_OF_MEMORY)]
    hook.details = {"17": JobInfo("17", JobState.OUT_OF_MEMORY)}
    _deferred(_train_op(), _train_ti(try_number=2))
    (spec,) = hook.submitted
    assert spec.attempt == 2 and spec.mem_gb == pytest.approx(8 * config.slurm.retry_mem_factor)
    assert spec.time_limit == "01:00:00"


def _our_output(config, suffix: str) -> str:
    from atlasflow.steps.ingest import training_job

    log_dir = training_job(config, "batch_0001", previous_checkpoint=None, python=None)["log_dir"]
    tag = job_tag("atlas_ingest", "manual__1", "batch_0001.train", -1)
    return f"{log_dir.rstrip('/')}/atlasflow-train-batch_0001.{tag}.try1.{suffix}"


def test_train_retry_adopts_the_running_job(config, hook):
    out, err = _our_output(config, "out"), _our_output(config, "err")
    hook.tagged = [JobInfo("17", JobState.RUNNING)]
    hook.details = {"17": JobInfo("17", JobState.RUNNING, stdout=out, stderr=err, user="alice")}
    trigger = _deferred(_train_op(), _train_ti(try_number=2))
    assert hook.submitted == []
    assert _round_trip(trigger) == _expected_trigger(config.slurm, "17", out, err)


@pytest.mark.parametrize(("user", "stdout", "why"), [
    ("mallory", None, "belongs to user 'mallory', not to the connection's user 'alice'"),
    ("alice", "/home/mallory/x.out", "is not this task's"),
])
def test_train_retry_never_adopts_a_job_it_did_not_submit(config, hook, caplog, user, stdout, why):
    """Another user's job (or one writing elsewhere) carrying our tag is left alone: a new job is submitted."""
    hook.tagged = [JobInfo("17", JobState.RUNNING)]
    hook.details = {"17": JobInfo("17", JobState.RUNNING, stdout=stdout or _our_output(config, "out"), user=user)}
    trigger = _deferred(_train_op(), _train_ti(try_number=2))
    (spec,) = hook.submitted
    assert trigger.job_id == "4242" and spec.attempt == 2
    # the runner says why (through the task's logger; a plain one here, so the test can read it)
    import logging

    from atlasflow_airflow.operators.slurm import slurm_job_runner

    runner = slurm_job_runner(command=["x"], dataset_id="train", batch_id="batch_0001",
                              output_dir=_our_output(config, "out").rpartition("/")[0], slurm=config.slurm)
    with caplog.at_level(logging.WARNING):
        assert runner.submit_or_adopt(_train_ti(try_number=2), logging.getLogger("task")).job_id == "4242"
    assert f"not adopting SLURM job 17 tagged {spec.tag}" in caplog.text and why in caplog.text


def test_train_completion_records_the_job_and_the_result(config, hook, monkeypatch):
    import atlasflow.steps.ingest as steps

    seen = {}
    monkeypatch.setattr(steps, "slurm_training_finished", lambda cfg, bid, event: seen.update(finished=(bid, event)))
    monkeypatch.setattr(steps, "record_trained", lambda cfg, bid, result: {"recorded": bid, **result})
    event = {"status": "success", "job_id": "4242", "result": {"checkpoint_dir": "/c"}}
    assert _train_op().execute_complete({}, event) == {"recorded": "batch_0001", "checkpoint_dir": "/c"}
    assert seen["finished"] == ("batch_0001", event)


def test_train_failed_job_is_recorded_then_raises(config, hook, monkeypatch):
    import atlasflow.steps.ingest as steps
    from atlasflow_airflow.operators.slurm import SlurmJobFailed

    seen = []
    monkeypatch.setattr(steps, "slurm_training_finished", lambda cfg, bid, event: seen.append(event["state"]))
    with pytest.raises(SlurmJobFailed, match="OUT_OF_MEMORY"):
        _train_op().execute_complete({}, {"status": "error", "job_id": "9", "state": "OUT_OF_MEMORY",
                                          "message": "job 9 OUT_OF_MEMORY"})
    assert seen == ["OUT_OF_MEMORY"]


def test_train_skips_without_a_usable_processed_dataset(config, hook):
    from airflow.sdk.exceptions import AirflowSkipException

    quarantined = {"dataset_id": "ds1", "status": "quarantined", "stage": "process", "reason": "no cells"}
    for processed in ((quarantined, None), ()):  # None: a mapped process instance that left no XCom
        with pytest.raises(AirflowSkipException, match="batch_0001 has no usable dataset"):
            _train_op(processed).execute({"ti": _train_ti(), "params": {}})
    assert hook.submitted == []


def _quant_op():
    from atlasflow_airflow.operators.quant import QuantOperator

    return QuantOperator(task_id="batch_0000.quant", batch_id="batch_0000",
                         fetched={"dataset_id": "fq0", "status": "ok", "bytes": 10})


def test_quant_operator_submits_the_quant_job_and_defers(config, hook, monkeypatch):
    import atlasflow.steps.ingest as steps

    monkeypatch.setattr(steps, "reads_to_quantify", lambda cfg, bid, fetched: True)
    op = _quant_op()
    assert (op.pool, op.template_fields) == ("quant", ())
    trigger = _deferred(op, FakeTI("batch_0000.quant", map_index=3))
    job = steps.quant_job(config, "batch_0000", "fq0", python=config.slurm.remote_python)
    assert job["slurm"].partition == "cpu" and job["slurm"].gpus == 0
    tag = job_tag("atlas_ingest", "manual__1", "batch_0000.quant", 3)
    expected = _expected_spec(job["slurm"], dataset_id="fq0", batch_id="batch_0000", command=job["command"],
                              output_dir=job["log_dir"], tag=tag)
    assert hook.submitted == [expected]
    assert _round_trip(trigger) == _expected_trigger(job["slurm"], "4242", expected.stdout_path, expected.stderr_path)


def test_quant_completion_finishes_on_this_side(config, hook, monkeypatch):
    import atlasflow.steps.ingest as steps

    monkeypatch.setattr(steps, "finish_quant", lambda cfg, bid, did, outcome: {"finished": (bid, did), **outcome})
    event = {"status": "success", "job_id": "5", "result": {"dataset_id": "fq0", "status": "ok"}}
    assert _quant_op().execute_complete({}, event) == {"finished": ("batch_0000", "fq0"), "dataset_id": "fq0",
                                                       "status": "ok"}


def test_slurm_job_operator_keeps_its_api(hook, tmp_path):
    from atlasflow.core.config import SlurmConfig
    from atlasflow_airflow.operators.slurm import SlurmJobFailed, SlurmJobOperator

    slurm = {"conn_id": "c2", "mem_gb": 1, "gpus": 0, "time_limit": "00:05:00", "poll_min_s": 0.5}
    op = SlurmJobOperator(task_id="train", command=["echo", "hi"], dataset_id="GSE1", batch_id="b1",
                          output_dir=str(tmp_path), slurm=slurm, env={"A": "1"})
    assert tuple(op.template_fields) == ("command", "dataset_id", "batch_id", "output_dir", "env")
    trigger = _deferred(op, FakeTI("train", map_index=0))
    cfg = SlurmConfig(**slurm)
    expected = _expected_spec(cfg, dataset_id="GSE1", batch_id="b1", command=["echo", "hi"], output_dir=str(tmp_path),
                              tag=job_tag("atlas_ingest", "manual__1", "train", 0))
    expected = dataclasses.replace(expected, env={"A": "1", **expected.env})
    assert hook.submitted == [expected]
    assert _round_trip(trigger) == _expected_trigger(cfg, "4242", expected.stdout_path, expected.stderr_path)
    op.on_kill()
    assert hook.cancelled == [["4242"]]
    assert op.execute_complete({}, {"status": "success", "job_id": "4242", "result": {"x": 1}}) == {"x": 1}
    with pytest.raises(SlurmJobFailed, match="wrote no result JSON"):
        op.execute_complete({}, {"status": "success", "job_id": "4242", "result": None})


def test_operators_compose_the_runner_instead_of_subclassing(config, hook):
    from atlasflow_airflow.operators.quant import QuantOperator
    from atlasflow_airflow.operators.slurm import SlurmJobOperator, SlurmJobRunner
    from atlasflow_airflow.operators.train import TrainBatchOperator

    assert not issubclass(TrainBatchOperator, SlurmJobOperator)
    assert not issubclass(QuantOperator, SlurmJobOperator)
    op = _train_op()
    assert not hasattr(op, "command") and not hasattr(op, "output_dir")  # no dummy arguments left
    assert op.runner is None and op.job_id is None
    _deferred(op, _train_ti())
    assert isinstance(op.runner, SlurmJobRunner) and op.job_id == "4242"
    op.on_kill()  # the worker side of a killed task cancels the job it submitted
    assert hook.cancelled == [["4242"]]


def test_builders_are_pure(config, hook):
    from atlasflow_airflow.operators.slurm import SlurmJob, build_job_spec, build_trigger, slurm_job_runner

    runner = slurm_job_runner(command=["x"], dataset_id="d", batch_id="b", output_dir="/o", slurm=config.slurm)
    assert hook.made == [] and runner.job_id is None  # nothing opened until it submits
    assert runner.job == SlurmJob(command=("x",), dataset_id="d", batch_id="b", output_dir="/o", slurm=config.slurm)
    previous = [JobInfo("1", JobState.TIMEOUT), JobInfo("2", JobState.TIMEOUT)]
    spec = build_job_spec(runner.job, "af-1", 3, previous)
    assert spec == build_job_spec(runner.job, "af-1", 3, previous)
    assert spec.time_limit == "02:15:00" and spec.mem_gb == 8  # 60 min x 1.5 x 1.5; no OOM, memory unchanged
    path, kwargs = _round_trip(build_trigger(config.slurm, "7", spec.stdout_path, spec.stderr_path))
    assert (path, kwargs) == _expected_trigger(config.slurm, "7", spec.stdout_path, spec.stderr_path)
