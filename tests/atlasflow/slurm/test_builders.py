from __future__ import annotations

import shlex
import subprocess

import pytest

from atlasflow.slurm import (
    JobSpec,
    JobState,
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


def test_parse_sacct():
    out = "11|CANCELLED by 0|0:15|None|af-1\n11.batch|CANCELLED|0:15||\n12|OUT_OF_MEMORY|0:125|None|\n13|TIMEOUT|0:0|None|\n"
    jobs = parse_sacct(out)
    assert jobs["11"].state is JobState.CANCELLED and jobs["11"].signal == 15
    assert jobs["12"].state is JobState.OUT_OF_MEMORY and jobs["13"].state is JobState.TIMEOUT


def test_unknown_state_maps_to_lost():
    assert JobState.from_slurm("WEIRD") is JobState.LOST
    assert JobState.from_slurm("OOM") is JobState.OUT_OF_MEMORY
