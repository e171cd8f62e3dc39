"""SlurmJobOperator / SlurmJobTrigger / SlurmHook against a real SLURM cluster through a real sshd."""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
import time
import uuid

import pytest

from .conftest import conn_uri, ssh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FAST = {"poll_min_s": 0.5, "poll_max_s": 2.0, "lost_grace_s": 20.0, "gpus": 0, "cpus": 1, "mem_gb": 0.1,
        "time_limit": "00:05:00"}


def _dag(task_kwargs: dict, *, retries: int = 0):
    from airflow.sdk import DAG

    from atlasflow_airflow.operators.slurm import SlurmJobOperator

    with DAG(f"slurm_{uuid.uuid4().hex[:8]}", schedule=None, start_date=dt.datetime(2024, 1, 1)) as dag:
        SlurmJobOperator(task_id="train", retries=retries, **task_kwargs)
    _register(dag)
    return dag


def _register(dag) -> None:
    """dag.test() needs the DAG serialized in the DB; these DAGs live only in the test."""
    import tempfile

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=tempfile.mkdtemp())
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)


def _ti(dr):
    return next(t for t in dr.get_task_instances() if t.task_id == "train")


def _squeue_all(cluster) -> list[list[str]]:
    out = ssh(cluster, "squeue -h -t all -o '%i|%T|%k'").stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def test_job_completes_and_returns_result(slurm_airflow, job_command, tmp_path):
    dag = _dag(dict(command=job_command("ok", "b1"), dataset_id="GSE1", batch_id="b1",
                    output_dir=str(tmp_path / "out"), slurm=FAST))
    dr = dag.test()
    ti = _ti(dr)
    assert ti.state == "success"
    result = ti.xcom_pull(task_ids="train")
    assert result["checkpoint"] == str(tmp_path / "out" / "ckpt-b1")


def test_job_exit_3_fails_task_with_exit_code(slurm_airflow, job_command, tmp_path, capfd):
    dag = _dag(dict(command=job_command("exit", "3"), dataset_id="GSE1", batch_id="b2",
                    output_dir=str(tmp_path / "out"), slurm=FAST))
    dr = dag.test()
    assert _ti(dr).state == "failed"
    log = "".join(capfd.readouterr())
    assert "FAILED, exit code 3, reason NonZeroExitCode" in log
    # the job's stdout tail was copied into the task log
    assert "about to fail" in log


def _wait_job(cluster, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in ssh(cluster, "squeue -h -t all -o '%i|%j|%T'").stdout.splitlines():
            job_id, job_name, state = line.split("|")
            if job_name == name and state == "RUNNING":
                return job_id
        time.sleep(0.5)
    raise AssertionError(f"job {name} never ran")


def test_scancel_from_outside_surfaces_cancelled(slurm_airflow, job_command, tmp_path, capfd):
    batch = f"c{uuid.uuid4().hex[:6]}"
    dag = _dag(dict(command=job_command("sleep", "120"), dataset_id="GSE1", batch_id=batch,
                    output_dir=str(tmp_path / "out"), slurm=FAST))

    def cancel():
        job_id = _wait_job(slurm_airflow, f"atlasflow-GSE1-{batch}")
        ssh(slurm_airflow, f"scancel {job_id}")

    t = threading.Thread(target=cancel)
    t.start()
    dr = dag.test()
    t.join()
    assert _ti(dr).state == "failed"
    assert "CANCELLED" in "".join(capfd.readouterr())


class _TI:
    def __init__(self, dag_id: str, try_number: int) -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index, self.try_number = dag_id, "r1", "train", 0, try_number


def _operator(job_command, tmp_path, batch, mode="sleep", arg="120", **slurm):
    from atlasflow_airflow.operators.slurm import SlurmJobOperator

    return SlurmJobOperator(task_id="train", command=job_command(mode, arg), dataset_id="GSE1", batch_id=batch,
                            output_dir=str(tmp_path / "out"), slurm={**FAST, **slurm})


def test_retry_after_worker_death_adopts_running_job(slurm_airflow, job_command, tmp_path):
    from airflow.sdk.exceptions import TaskDeferred

    from atlasflow.slurm import job_tag

    dag_id = f"adopt_{uuid.uuid4().hex[:6]}"
    op = _operator(job_command, tmp_path, "a1")
    with pytest.raises(TaskDeferred) as first:
        op.execute({"ti": _TI(dag_id, 1)})
    job_id = first.value.trigger.job_id
    # The worker dies here (the deferred state is lost); Airflow retries the task: try 2.
    op2 = _operator(job_command, tmp_path, "a1")
    with pytest.raises(TaskDeferred) as second:
        op2.execute({"ti": _TI(dag_id, 2)})
    assert second.value.trigger.job_id == job_id
    tag = job_tag(dag_id, "r1", "train", 0)
    tagged = [row for row in _squeue_all(slurm_airflow) if row[2] == tag]
    assert len(tagged) == 1, tagged
    # operator.on_kill (worker side) cancels the SLURM job
    op2.on_kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {row[0]: row[1] for row in _squeue_all(slurm_airflow)}
        if states[job_id] == "CANCELLED":
            break
        time.sleep(0.5)
    assert states[job_id] == "CANCELLED"


def test_retry_never_adopts_another_users_job_with_our_tag(slurm_airflow, job_command, tmp_path):
    """A job of another cluster user carrying this task's tag (held, so it stays live) is not adopted."""
    from airflow.sdk.exceptions import TaskDeferred

    from atlasflow.slurm import job_tag

    dag_id = f"foreign_{uuid.uuid4().hex[:6]}"
    tag = job_tag(dag_id, "r1", "train", 0)
    foreign = ssh(slurm_airflow, f"sbatch --parsable --hold --uid=nobody --comment={tag} --output=/tmp/{tag}.out "
                                 "--wrap='sleep 60'").stdout.strip()
    try:
        assert [row[1] for row in _squeue_all(slurm_airflow) if row[0] == foreign] == ["PENDING"]
        op = _operator(job_command, tmp_path, "f1")
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": _TI(dag_id, 2)})
        ours = deferred.value.trigger.job_id
        assert ours != foreign
        owner = ssh(slurm_airflow, f"scontrol show job -o {ours}").stdout
        assert " UserId=nobody(" not in owner
        op.on_kill()
    finally:
        ssh(slurm_airflow, f"scancel {foreign}")


def test_trigger_on_kill_cancels_job(slurm_airflow, job_command, tmp_path):
    import asyncio

    from airflow.sdk.exceptions import TaskDeferred

    op = _operator(job_command, tmp_path, "k1")
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": _TI(f"kill_{uuid.uuid4().hex[:6]}", 1)})
    trigger = deferred.value.trigger

    async def scenario():
        poller = asyncio.create_task(anext(trigger.run()))
        await asyncio.sleep(2)
        poller.cancel()  # what the triggerer does when the user kills the task, then on_kill
        with pytest.raises(asyncio.CancelledError):
            await poller
        await trigger.on_kill()

    asyncio.run(scenario())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {row[0]: row[1] for row in _squeue_all(slurm_airflow)}
        if states[trigger.job_id] == "CANCELLED":
            break
        time.sleep(0.5)
    assert states[trigger.job_id] == "CANCELLED"


def test_sshd_restart_mid_poll_is_survived(slurm_airflow, job_command, tmp_path):
    import asyncio
    import subprocess
    import sys

    from airflow.sdk.exceptions import TaskDeferred

    from .conftest import LOCAL_SLURM

    op = _operator(job_command, tmp_path, "s1", mode="sleep", arg="8")
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": _TI(f"sshd_{uuid.uuid4().hex[:6]}", 1)})
    trigger = deferred.value.trigger

    async def scenario():
        poller = asyncio.create_task(anext(trigger.run()))
        await asyncio.sleep(2)
        assert trigger.connections_opened == 1
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(LOCAL_SLURM), "restart-sshd", "--down", "3",
            "--state-dir", slurm_airflow["state_dir"])
        assert await proc.wait() == 0
        return await asyncio.wait_for(poller, 60)

    event = asyncio.run(scenario())
    assert event.payload["state"] == "COMPLETED", event.payload
    assert event.payload["result"]["checkpoint"].endswith("ckpt-8")
    assert trigger.connections_opened >= 2  # the connection really broke and was reopened
    assert subprocess.run([sys.executable, str(LOCAL_SLURM), "status", "--state-dir",
                           slurm_airflow["state_dir"]]).returncode == 0


def test_wrong_host_key_is_refused(slurm_airflow, tmp_path, monkeypatch):
    import asyncio
    import subprocess

    import asyncssh

    from atlasflow_airflow.hooks.slurm import SlurmHook, SSHPermanentError

    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kt, key = (other.with_suffix(".pub")).read_text().split()[:2]
    bad = tmp_path / "known_hosts"
    bad.write_text(f"[127.0.0.1]:{slurm_airflow['port']} {kt} {key}\n")
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_BAD", json.loads(json.dumps(conn_uri(slurm_airflow))).replace(
        slurm_airflow["known_hosts"], str(bad)))
    with pytest.raises(SSHPermanentError, match="host key changed"):
        SlurmHook("slurm_bad", transient_retries=5).run("true")  # permanent: not retried 5 times

    from airflow.providers.ssh.hooks.ssh import SSHHookAsync

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(SSHHookAsync(ssh_conn_id="slurm_bad").get_conn())
    # Control: the right known_hosts file connects (so the refusals above are about the key).
    assert SlurmHook("slurm_ssh").run("true")[0] == 0


def test_authentication_failure_and_unknown_host_key_fail_at_once(slurm_airflow, tmp_path, monkeypatch):
    import subprocess

    from atlasflow_airflow.hooks.slurm import SlurmHook, SSHPermanentError

    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_NOAUTH", conn_uri(slurm_airflow, key_file=str(stranger)))
    started = time.monotonic()
    with pytest.raises(SSHPermanentError, match="authentication failed .*check the connection's login and key_file"):
        SlurmHook("slurm_noauth", transient_retries=5).run("true")
    assert time.monotonic() - started < 10, "an authentication failure was retried"
    no_known = json.loads(conn_uri(slurm_airflow))
    del no_known["extra"]["known_hosts"]
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_NOKEY", json.dumps(no_known))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/known_hosts that might know the test sshd
    with pytest.raises(SSHPermanentError, match="host key is not known .*ssh-keyscan"):
        SlurmHook("slurm_nokey", transient_retries=5).run("true")


def test_system_validation_reaches_slurm_and_refuses_a_wrong_host_key(slurm_airflow, tmp_path, monkeypatch):
    import subprocess

    from atlasflow_airflow.operators.validate import slurm_reachability

    up = slurm_reachability("slurm_ssh")
    assert up.status == "ok" and "is UP" in up.detail, up
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kt, key = (other.with_suffix(".pub")).read_text().split()[:2]
    bad = tmp_path / "known_hosts"
    bad.write_text(f"[127.0.0.1]:{slurm_airflow['port']} {kt} {key}\n")
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_BAD", conn_uri(slurm_airflow).replace(slurm_airflow["known_hosts"], str(bad)))
    refused = slurm_reachability("slurm_bad")
    assert refused.status == "fail" and "'slurm_bad'" in refused.detail, refused


def _deferred_trigger(op, dag_id: str):
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": _TI(dag_id, 1)})
    return deferred.value.trigger


def test_concurrent_triggers_share_one_connection_and_one_squeue_per_cycle(slurm_airflow, job_command, tmp_path,
                                                                         monkeypatch):
    """Five deferred tasks in one triggerer loop: one SSH connection, one squeue per cycle, all complete."""
    import asyncio

    from atlasflow_airflow.triggers.slurm import _SharedPoller

    commands: list[str] = []
    real_run = _SharedPoller.run

    async def recording_run(self, cmd):
        commands.append(cmd)
        return await real_run(self, cmd)

    monkeypatch.setattr(_SharedPoller, "run", recording_run)
    triggers = [
        _deferred_trigger(_operator(job_command, tmp_path, f"p{i}", arg=str(1 + i % 3)), f"pool_{uuid.uuid4().hex[:6]}")
        for i in range(5)
    ]

    async def scenario():
        return await asyncio.wait_for(asyncio.gather(*(anext(t.run()) for t in triggers)), 120)

    events = asyncio.run(scenario())
    assert [e.payload["state"] for e in events] == ["COMPLETED"] * 5, [e.payload for e in events]
    assert all(e.payload["result"]["mode"] == "sleep" for e in events)
    pollers = {id(t.poller): t.poller for t in triggers}
    assert len(pollers) == 1
    poller = next(iter(pollers.values()))
    assert poller.connections_opened == 1
    squeues = [c for c in commands if c.startswith("squeue ")]
    assert len(squeues) == poller.cycles >= 2
    ids = ",".join(sorted((t.job_id for t in triggers), key=int))
    assert f"--jobs={ids}" in squeues[0]  # the first cycle asked about all five at once


def test_time_limit_surfaces_timeout(slurm_airflow, job_command, tmp_path):
    """A job over its --time is killed by SLURM; the task fails with state TIMEOUT (~1.5 min: one such test)."""
    import asyncio

    from atlasflow_airflow.operators.slurm import SlurmJobFailed

    op = _operator(job_command, tmp_path, "t1", arg="600", time_limit="00:01:00", poll_max_s=5.0)
    trigger = _deferred_trigger(op, f"timeout_{uuid.uuid4().hex[:6]}")
    event = asyncio.run(asyncio.wait_for(anext(trigger.run()), 200))
    assert event.payload["state"] == "TIMEOUT", event.payload
    with pytest.raises(SlurmJobFailed, match="TIMEOUT"):
        op.execute_complete({}, event.payload)


def test_local_and_slurm_backends_give_identical_checkpoints(slurm_airflow, tmp_path):
    """The same batch trained by the local backend and as a real SLURM job: bit-identical weights."""
    import shutil
    from pathlib import Path

    import torch

    from atlasflow.core.config import load_config
    from atlasflow.intake.plan import write_batch_spec
    from atlasflow.steps import ingest as P
    from atlasflow_testing.demo import build_demo
    from atlasflow_testing.geo_server import GeoServer

    (tmp_path / "www").mkdir()
    with GeoServer(tmp_path / "www") as server:
        build_demo(tmp_path, server.url, n_datasets=3, cells=60, batch_size=3, budget_mb=100, missing_row=False)
        # bit-identical at the same thread count (the local backend's default is half the CPUs, the job's all)
        local = load_config(tmp_path / "atlasflow.yaml", overrides={"integration.enabled": False,
                                                                   "training.epochs": 1, "training.threads": 1})
        P.prepare_run(local)
        ids = [d["dataset_id"] for d in json.loads(Path(write_batch_spec(local, "batch_0000")).read_text())["datasets"]]
        assert P.admit_batch(local, "batch_0000", owner="test")["admitted"]
        for d in ids:
            P.process_dataset_step(local, "batch_0000", P.download_dataset(local, "batch_0000", d, final_try=True))
    other = tmp_path / "base_slurm"
    shutil.copytree(local.storage.base_dir, other)  # the same processed batch, before any training
    by_local = P.train_batch_step(local, "batch_0000", previous_checkpoint=None)

    slurm = load_config(tmp_path / "atlasflow.yaml", overrides={"integration.enabled": False, "training.epochs": 1,
                                                               "training.threads": 1, "storage.base_dir": str(other)})
    job = P.training_job(slurm, "batch_0000", previous_checkpoint=None)
    dag = _dag(dict(command=job["command"], dataset_id="train", batch_id="batch_0000", output_dir=job["log_dir"],
                    slurm={**FAST, "time_limit": "00:10:00", "mem_gb": 2}))
    ti = _ti(dag.test())
    assert ti.state == "success"
    by_slurm = ti.xcom_pull(task_ids="train")
    assert by_slurm["checkpoint_dir"] == str(other / "models" / "checkpoints" / "batch_0000")
    for key in ("global_step", "cells_seen", "train_loss", "val_loss", "val_masked_acc"):
        assert by_slurm[key] == by_local[key], key
    weights_a = torch.load(Path(by_local["checkpoint_dir"]) / "model.pt", map_location="cpu")
    weights_b = torch.load(Path(by_slurm["checkpoint_dir"]) / "model.pt", map_location="cpu")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


def test_quantification_runs_as_a_cpu_slurm_job(slurm_airflow, tmp_path):
    """quant.backend slurm: `atlasflow quant run` as a real job (no GPU asked for), its result read by
    the operator; the FASTQ files are deleted on the Airflow side afterwards."""

    from atlasflow.core.config import load_config
    from atlasflow.intake.plan import write_batch_spec
    from atlasflow.steps import ingest as P
    from atlasflow_testing.geo_server import GeoServer
    from atlasflow_testing.reads import build_fastq_demo, indexed_reference

    kb = indexed_reference(tmp_path / "ref", n_genes=8, n_barcodes=200, seed=5)
    (tmp_path / "www").mkdir()
    with GeoServer(tmp_path / "www") as server:
        build_fastq_demo(tmp_path, server.url, reference=kb["ref"], index=kb["index"], t2g=kb["t2g"],
                         onlist=kb["onlist"], barcodes=kb["barcodes"], n_samples=1, n_cells=5)
        config = load_config(tmp_path / "atlasflow.yaml", overrides={"quant.backend": "slurm"})
        P.prepare_run(config)
        write_batch_spec(config, "batch_0000")
        assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
        P.download_dataset(config, "batch_0000", "fq0", final_try=True)
    job = P.quant_job(config, "batch_0000", "fq0")
    assert job["slurm"].gpus == 0
    dag = _dag(dict(command=job["command"], dataset_id="fq0", batch_id="batch_0000", output_dir=job["log_dir"],
                    slurm={**FAST, "time_limit": job["slurm"].time_limit, "mem_gb": 2}))
    ti = _ti(dag.test())
    assert ti.state == "success"
    outcome = ti.xcom_pull(task_ids="train")
    assert outcome["status"] == "ok" and outcome["dataset_id"] == "fq0" and outcome["reads_pseudoaligned"] > 0
    done = P.finish_quant(config, "batch_0000", "fq0", outcome)
    assert done["status"] == "ok" and done["fastq_freed"] > 0
    assert not list((config.base_dir / "data" / "raw" / "fq0").glob("*.fastq.gz"))


DDP_JOB = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT come from torchrun
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
if dist.get_rank() == 0:
    path = os.environ["ATLASFLOW_RESULT_PATH"]
    with open(path + ".tmp", "w") as fh:
        json.dump({"world_size": dist.get_world_size(), "rank_sum": total.item(), "tag": sys.argv[1],
                   "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"])}, fh)
    os.replace(path + ".tmp", path)
dist.destroy_process_group()
"""


def test_two_cpu_ranks_run_under_torchrun_in_one_job(slurm_airflow, tmp_path):
    """slurm.ranks_per_node: 2 on a CPU partition renders torchrun; the two gloo ranks meet and all-reduce."""
    script = tmp_path / "ddp_job.py"
    script.write_text(DDP_JOB)
    slurm = {**FAST, "ranks_per_node": 2, "mem_gb": 2.0}
    dag = _dag(dict(command=[sys.executable, str(script), "ddp"], dataset_id="GSE1", batch_id="b9",
                    output_dir=str(tmp_path / "out"), slurm=slurm))
    dr = dag.test()
    assert _ti(dr).state == "success"
    result = _ti(dr).xcom_pull(task_ids="train")
    assert result == {"world_size": 2, "rank_sum": 3.0, "tag": "ddp", "local_world_size": 2}
