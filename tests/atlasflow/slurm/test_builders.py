from __future__ import annotations

import dataclasses
import shlex
import subprocess

import pytest

from atlasflow.slurm import (
    JobInfo,
    JobSpec,
    JobState,
    distributed_command,
    job_tag,
    parse_sacct,
    parse_sbatch,
    parse_scontrol,
    parse_squeue,
    render_sbatch,
    scale_resources,
)
from atlasflow.slurm.parse import SlurmOutputError


def _spec(**kw):
    base = dict(
        dataset_id="GSE 1; rm -rf /", batch_id="b0001", command=("atlasflow", "train", "--x", "a b'$(c)"),
        output_dir="/scratch/out", tag=job_tag("d", "r", "t", 3), attempt=2, partition="gpu",
        account="lab", qos="normal", time_limit="1-02:30:00", mem_gb=8, cpus=4, gpus=2,
        constraint="a100", env_activate="/opt/env x",
    )
    base.update(kw)
    return JobSpec(**base)


def test_render_contains_all_directives_and_quotes_values():
    text = render_sbatch(_spec())
    assert "#SBATCH --job-name=atlasflow-GSE_1_rm_-rf-b0001" in text
    for d in ("--partition=gpu", "--account=lab", "--qos=normal", "--constraint=a100", "--gres=gpu:2",
              "--time=1-02:30:00", "--mem=8192M", "--cpus-per-task=4"):
        assert f"#SBATCH {d}" in text
    assert ".try2.out" in text and ".try2.err" in text
    last = text.strip().splitlines()[-1]
    assert shlex.split(last) == ["atlasflow", "train", "--x", "a b'$(c)"]
    # bash accepts the script syntactically
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_tag_is_deterministic_and_per_map_index():
    assert job_tag("d", "r", "t", 1) == job_tag("d", "r", "t", 1) != job_tag("d", "r", "t", 2)


def test_output_paths_unique_per_attempt():
    assert _spec(attempt=1).stdout_path != _spec(attempt=2).stdout_path


def test_scale_resources():
    s = scale_resources(_spec(time_limit="00:10:00", mem_gb=4), mem_factor=2, time_factor=1.5)
    assert s.mem_gb == 8 and s.time_limit == "00:15:00"


@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint", "env_activate", "workdir", "dataset_id"])
def test_render_refuses_control_characters(field):
    with pytest.raises(ValueError, match=f"{field} .* contains the control character U\\+000A"):
        render_sbatch(_spec(**{field: "gpu\ntouch /tmp/pwned"}))
    with pytest.raises(ValueError, match="U\\+000D"):
        render_sbatch(_spec(**{field: "gpu\rx"}))
    with pytest.raises(ValueError, match="command\\[1\\]"):
        render_sbatch(_spec(command=("atlasflow", "a\u2028b")))
    with pytest.raises(ValueError, match="env"):
        render_sbatch(_spec(env={"A": "x\ny"}))


def test_bad_env_name_rejected():
    with pytest.raises(ValueError):
        render_sbatch(_spec(env={"A B": "x"}))


def test_parse_sbatch():
    assert parse_sbatch("42\n") == "42"
    assert parse_sbatch("sbatch: warning: x\n17;cluster\n") == "17"
    with pytest.raises(SlurmOutputError):
        parse_sbatch("sbatch: error: Batch job submission failed\n")


# Captured from slurm 22.05.8 on the local cluster: squeue -h -t all -o '%i|%T|%r|%k'
SQUEUE = "5|PENDING|Resources|af-aaaa\n6|RUNNING|None|af-bbbb\n7|COMPLETED|None|af-cccc\n8|CANCELLED|None|(null)\n"


def test_parse_squeue():
    jobs = parse_squeue(SQUEUE)
    assert jobs["5"].state is JobState.PENDING and jobs["5"].reason == "Resources"
    assert jobs["6"].comment == "af-bbbb" and jobs["7"].state.finished
    assert jobs["8"].state is JobState.CANCELLED


SCONTROL = (
    "JobId=3 JobName=t UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=1 Nice=0 Account=(null) "
    "QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=3:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A Comment=af-x "
    "Command=/tmp/a b.sh WorkDir=/tmp StdErr=/tmp/x.err StdIn=/dev/null StdOut=/tmp/x.out Power=\n"
)


def test_parse_scontrol():
    j = parse_scontrol(SCONTROL)["3"]
    assert (j.state, j.exit_code, j.signal, j.reason) == (JobState.FAILED, 3, 0, "NonZeroExitCode")
    assert j.stdout == "/tmp/x.out" and j.comment == "af-x"
    assert "exit code 3" in j.describe() and "NonZeroExitCode" in j.describe()


def test_squeue_lists_only_the_connection_users_jobs():
    from atlasflow.slurm.commands import squeue_cmd, user_name

    assert squeue_cmd(user="alice") == "squeue -h -t all --user=alice -o '%i|%T|%r|%k'"
    assert user_name("svc.atlas-1\n") == "svc.atlas-1"
    for bad in ("", "a b", "$(id)", "-x", "a;b"):
        with pytest.raises(ValueError, match="not a user name"):
            squeue_cmd(user=bad)


def test_adoption_requires_our_user_and_our_output_folder():
    from atlasflow.slurm.commands import adoption_problem

    ours = JobInfo("5", JobState.RUNNING, stdout="/o/atlasflow-d-b.af-1.try1.out", user="alice")
    assert adoption_problem(ours, user="alice", output_dir="/o/", tag="af-1") is None
    assert "belongs to user 'bob'" in adoption_problem(dataclasses.replace(ours, user="bob"), user="alice",
                                                       output_dir="/o", tag="af-1")
    assert "(unknown)" in adoption_problem(dataclasses.replace(ours, user=None), user="alice", output_dir="/o",
                                           tag="af-1")
    for stdout in ("/elsewhere/atlasflow-d-b.af-1.try1.out", "/o/atlasflow-d-b.af-2.try1.out", None):
        assert "is not this task's" in adoption_problem(dataclasses.replace(ours, stdout=stdout), user="alice",
                                                        output_dir="/o", tag="af-1")
    assert "cannot check its owner" in adoption_problem(None, user="alice", output_dir="/o", tag="af-1")
    assert parse_scontrol(SCONTROL)["3"].user == "root"


def test_parse_sacct():
    out = "11|CANCELLED by 0|0:15|None|af-1\n11.batch|CANCELLED|0:15||\n12|OUT_OF_MEMORY|0:125|None|\n13|TIMEOUT|0:0|None|\n"
    jobs = parse_sacct(out)
    assert jobs["11"].state is JobState.CANCELLED and jobs["11"].signal == 15
    assert jobs["12"].state is JobState.OUT_OF_MEMORY and jobs["13"].state is JobState.TIMEOUT


def test_unknown_state_maps_to_lost():
    assert JobState.from_slurm("WEIRD") is JobState.LOST
    assert JobState.from_slurm("OOM") is JobState.OUT_OF_MEMORY


def test_multi_gpu_single_node_starts_one_rank_per_gpu_under_torchrun():
    text = render_sbatch(_spec(gpus=4, ranks_per_node=4, command=("/env/bin/python", "-m", "atlasflow.cli", "train",
                                                                 "--out", "/m/b 1")))
    assert "#SBATCH --gres=gpu:4" in text and "#SBATCH --nodes=1" in text and "#SBATCH --ntasks=1" in text
    assert "srun" not in text  # one node: torchrun runs in the batch step itself
    assert shlex.split(text.strip().splitlines()[-1]) == [
        "/env/bin/python", "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=4",
        "-m", "atlasflow.cli", "train", "--out", "/m/b 1"]
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_multi_node_job_runs_one_torchrun_per_node_meeting_on_the_first_node():
    spec = _spec(gpus=8, nodes=2, ranks_per_node=8, rdzv_port=29611,
                 command=("python", "-m", "atlasflow.cli", "train", "--batch-dir", "x; rm -rf /"))
    assert spec.world_size == 16
    text = render_sbatch(spec)
    lines = text.strip().splitlines()
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --gres=gpu:8" in lines
    assert "#SBATCH --ntasks=1" not in lines
    assert lines[-2] == 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    launch = shlex.split(lines[-1])
    assert launch[:6] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m"]
    assert "--nproc_per_node=8" in launch and "--nnodes=2" in launch and "--rdzv_backend=c10d" in launch
    assert "--rdzv_endpoint=$head_node:29611" in launch and "--rdzv_id=$SLURM_JOB_ID" in launch
    assert launch[-5:] == ["-m", "atlasflow.cli", "train", "--batch-dir", "x; rm -rf /"]  # still one quoted argument
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_one_rank_keeps_the_plain_command():
    text = render_sbatch(_spec(gpus=1))
    assert "torch.distributed.run" not in text and "srun" not in text and "#SBATCH --ntasks=1" in text
    assert distributed_command(["py", "-m", "m"], ranks_per_node=1) == ["py", "-m", "m"]


def test_slurm_config_gives_one_rank_per_gpu_unless_told():
    from atlasflow.core.config import load_config

    assert load_config(overrides={"slurm.gpus": 4}).slurm.ranks() == 4
    assert load_config(overrides={"slurm.gpus": 0}).slurm.ranks() == 1
    assert load_config(overrides={"slurm.gpus": 0, "slurm.ranks_per_node": 2}).slurm.ranks() == 2
