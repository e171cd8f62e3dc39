"""Parsers against output captured verbatim from slurm 22.05.8 (scripts/local-slurm cluster)."""

from __future__ import annotations

from atlasflow.slurm import JobState, parse_scontrol, parse_squeue

SCONTROL_22_05 = (
    "JobId=1 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901759 Nice=0 "
    "Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=3:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A "
    "SubmitTime=2026-11-22T17:30:58 EligibleTime=2026-11-22T17:30:58 AccrueTime=2026-11-22T17:30:58 "
    "StartTime=2026-11-22T17:31:01 EndTime=2026-11-22T17:31:01 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-22T17:31:01 Scheduler=Main Partition=debug AllocNode:Sid=localhost:17201 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 "
    "CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* "
    "CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 "
    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/root Comment=af-x  "
    "StdErr=/tmp/j1.out StdIn=/dev/null StdOut=/tmp/j1.out Power= \n"
)


def test_scontrol_captured():
    j = parse_scontrol(SCONTROL_22_05)["1"]
    assert (j.state, j.exit_code, j.reason, j.comment) == (JobState.FAILED, 3, "NonZeroExitCode", "af-x")
    assert j.stdout == "/tmp/j1.out" and j.stderr == "/tmp/j1.out" and j.user == "root"


def test_squeue_captured():
    assert parse_squeue("1|PENDING|None|af-x\n")["1"].state is JobState.PENDING
    assert parse_squeue("1|FAILED|NonZeroExitCode|af-x\n")["1"].reason == "NonZeroExitCode"
