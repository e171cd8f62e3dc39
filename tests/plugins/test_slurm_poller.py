"""The shared SLURM poller against a fake cluster behind a fake async SSH connection (counts commands)."""

from __future__ import annotations

import asyncio
import math
import shlex
import time
from dataclasses import dataclass

import pytest

from atlasflow_airflow.triggers import slurm as T

FAST = {"conn_id": "fake", "stdout_path": "/o", "stderr_path": "/e", "result_path": "/o.result.json",
        "poll_min_s": 0.05, "poll_max_s": 0.4, "lost_grace_s": 0.5, "transient_retries": 3}


@dataclass
class _Res:
    exit_status: int
    stdout: str = ""
    stderr: str = ""


class FakeCluster:
    """Answers squeue / scontrol / sacct / tail / cat like slurm 22.05 does (see tests/atlasflow/slurm)."""

    def __init__(self, jobs: dict[str, str], *, accounting: bool = False) -> None:
        self.jobs = dict(jobs)  # id -> state, while slurmctld remembers the job
        self.exit: dict[str, str] = {}  # id -> ExitCode, "0:0" when unset
        self.sacct: dict[str, str] = {}  # id -> state, once slurmctld forgot the job
        self.accounting = accounting
        self.commands: list[str] = []
        self.conns: list[FakeConn] = []
        self.faults: list[object] = []  # next commands fail: an exception (transport) or (rc, stderr)

    def answer(self, cmd: str) -> _Res:
        self.commands.append(cmd)
        if self.faults:
            fault = self.faults.pop(0)
            if isinstance(fault, BaseException):
                raise fault
            return _Res(fault[0], "", fault[1])
        argv = shlex.split(cmd)
        if argv[0] == "squeue":
            ids = next(a for a in argv if a.startswith("--jobs=")).split("=", 1)[1].split(",")
            known = [j for j in ids if j in self.jobs]
            if len(ids) == 1 and not known:
                return _Res(1, "", "slurm_load_jobs error: Invalid job id specified\n")
            return _Res(0, "".join(f"{j}|{self.jobs[j]}|None|(null)\n" for j in known))
        if argv[0] == "scontrol":
            j = argv[-1]
            if j not in self.jobs:
                return _Res(1, "", "slurm_load_jobs error: Invalid job id specified\n")
            reason = "NonZeroExitCode" if self.jobs[j] == "FAILED" else "None"
            code = self.exit.get(j, "0:0")
            return _Res(0, f"JobId={j} JobName=x JobState={self.jobs[j]} Reason={reason} ExitCode={code}\n")
        if argv[0] == "sacct":
            if not self.accounting:
                return _Res(1, "", "Slurm accounting storage is disabled\n")
            ids = next(a for a in argv if a.startswith("--jobs=")).split("=", 1)[1].split(",")
            return _Res(0, "".join(f"{j}|{self.sacct[j]}|0:0||\n" for j in ids if j in self.sacct))
        if argv[0] == "cat":
            return _Res(0, '{"checkpoint": "/ckpt"}')
        return _Res(0, "tail\n")

    def of(self, prog: str) -> list[str]:
        return [c for c in self.commands if c.startswith(prog + " ")]


class FakeConn:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster, self.closed = cluster, False

    async def run(self, cmd: str, check: bool = False, timeout: float | None = None) -> _Res:
        assert not self.closed, "command on a closed connection"
        await asyncio.sleep(0.001)
        return self.cluster.answer(cmd)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def cluster(monkeypatch) -> FakeCluster:
    c = FakeCluster({})

    async def _open(self):
        conn = FakeConn(c)
        c.conns.append(conn)
        return conn

    monkeypatch.setattr(T._SharedPoller, "_open", _open)
    return c


def _trigger(job_id: str, **kw) -> T.SlurmJobTrigger:
    return T.SlurmJobTrigger(job_id=job_id, **{**FAST, **kw})


def _start(trigger: T.SlurmJobTrigger) -> asyncio.Task:
    return asyncio.create_task(anext(trigger.run()))


def _squeue_ids(cmd: str) -> list[str]:
    return next(a for a in shlex.split(cmd) if a.startswith("--jobs=")).split("=", 1)[1].split(",")


def test_n_triggers_share_one_connection_and_one_squeue_per_cycle(cluster):
    ids = [str(i) for i in range(1, 6)]
    cluster.jobs.update({j: "RUNNING" for j in ids})

    async def scenario():
        triggers = [_trigger(j) for j in ids]
        tasks = [_start(t) for t in triggers]
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(0.05)
        poller = triggers[0].poller
        # wait for three cycles however loaded the machine is (no timing assumption), then compare counts
        while poller.cycles < 3 and loop.time() - started < 30:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        elapsed = loop.time() - started
        assert all(t.poller is poller for t in triggers)
        assert poller.cycles >= 3
        squeues = cluster.of("squeue")
        assert len(squeues) == poller.cycles
        assert all(_squeue_ids(c) == ids for c in squeues)
        assert len(cluster.conns) == 1 and all(t.connections_opened == 1 for t in triggers)
        # Backoff: unchanged states double the shared interval (0.05, 0.1, 0.2, 0.4 ...): after t seconds at
        # most ~log2(t / 0.05) cycles, where a fixed 0.05 s interval would have made t / 0.05.
        assert poller.cycles <= 3 + math.log2(elapsed / 0.05 + 1), (poller.cycles, elapsed)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_finished_job_is_reported_to_its_trigger_only(cluster):
    cluster.jobs.update({"1": "RUNNING", "2": "RUNNING", "3": "RUNNING"})

    async def scenario():
        triggers = {j: _trigger(j) for j in ("1", "2", "3")}
        tasks = {j: _start(t) for j, t in triggers.items()}
        await asyncio.sleep(0.1)
        cluster.jobs["2"], cluster.exit["2"] = "FAILED", "3:0"
        event = await asyncio.wait_for(tasks["2"], 5)
        assert event.payload["job_id"] == "2" and event.payload["state"] == "FAILED"
        assert event.payload["message"] == "job 2 FAILED, exit code 3, reason NonZeroExitCode"
        assert event.payload["stdout_tail"] == "tail\n"  # built over the shared connection
        assert not tasks["1"].done() and not tasks["3"].done()
        n = len(cluster.of("squeue"))
        await asyncio.sleep(0.5)
        later = cluster.of("squeue")[n:]
        assert later and all(_squeue_ids(c) == ["1", "3"] for c in later)
        assert cluster.of("scontrol") == ["scontrol show job -o 2"]  # the finished job only, once
        cluster.jobs["1"] = cluster.jobs["3"] = "COMPLETED"
        for j in ("1", "3"):
            assert (await asyncio.wait_for(tasks[j], 5)).payload["status"] == "success"
        assert len(cluster.conns) == 1 and cluster.conns[0].closed
        assert not T._SharedPoller._registry

    asyncio.run(scenario())


def test_cancelling_triggers_closes_the_connection_when_the_last_one_leaves(cluster):
    cluster.jobs.update({"1": "PENDING", "2": "PENDING"})

    async def scenario():
        t1, t2 = _trigger("1"), _trigger("2")
        a, b = _start(t1), _start(t2)
        await asyncio.sleep(0.1)
        poller = t1.poller
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        assert poller.watches and not cluster.conns[0].closed  # t2 still polls
        n = len(cluster.of("squeue"))
        await asyncio.sleep(0.2)
        assert all(_squeue_ids(c) == ["2"] for c in cluster.of("squeue")[n:])
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        assert cluster.conns[0].closed and not poller.watches
        assert not T._SharedPoller._registry
        await asyncio.wait([poller._task], timeout=1)
        assert poller._task.cancelled()
        # A later trigger gets a fresh poller and connection.
        cluster.jobs["3"] = "COMPLETED"
        assert (await asyncio.wait_for(_start(_trigger("3")), 5)).payload["state"] == "COMPLETED"
        assert len(cluster.conns) == 2 and cluster.conns[1].closed

    asyncio.run(scenario())


def test_transient_errors_are_retried_and_counted(cluster):
    cluster.jobs["7"] = "RUNNING"

    async def scenario():
        t = _trigger("7")
        task = _start(t)
        await asyncio.sleep(0.1)
        # slurmctld busy (the SSH connection is fine), then the connection itself drops.
        cluster.faults += [(1, "slurm_load_jobs error: Socket timed out on send/recv operation"),
                           ConnectionResetError("Connection reset by peer")]
        cluster.jobs["7"] = "COMPLETED"
        event = await asyncio.wait_for(task, 5)
        assert event.payload["state"] == "COMPLETED", event.payload
        assert event.payload["result"] == {"checkpoint": "/ckpt"}
        assert len(cluster.conns) == 2  # reopened after the reset only
        assert cluster.conns[0].closed and cluster.conns[1].closed

    asyncio.run(scenario())


def test_too_many_transient_errors_in_a_row_is_an_error_event(cluster):
    cluster.jobs["8"] = "RUNNING"
    cluster.faults += [(1, "Socket timed out")] * 10

    async def scenario():
        t0 = time.monotonic()
        event = await asyncio.wait_for(_start(_trigger("8", transient_retries=2)), 10)
        assert event.payload["status"] == "error"
        assert event.payload["message"].startswith("3 transient errors in a row")
        assert len(cluster.of("squeue")) == 3
        # backed off 0.1 then 0.2 s between tries
        assert time.monotonic() - t0 >= 0.3

    asyncio.run(scenario())


def test_job_gone_from_squeue_is_looked_up_in_one_sacct_then_lost_after_grace(cluster):
    cluster.accounting = True
    cluster.jobs.update({"1": "RUNNING", "2": "RUNNING", "3": "RUNNING"})

    async def scenario():
        tasks = {j: _start(_trigger(j)) for j in ("1", "2", "3")}
        await asyncio.sleep(0.1)
        # slurmctld forgets all three; accounting knows two of them.
        cluster.sacct.update({"1": "COMPLETED", "2": "TIMEOUT"})
        cluster.jobs.clear()
        assert (await asyncio.wait_for(tasks["1"], 5)).payload["state"] == "COMPLETED"
        assert (await asyncio.wait_for(tasks["2"], 5)).payload["state"] == "TIMEOUT"
        assert shlex.split(cluster.of("sacct")[0])[4] == "--jobs=1,2,3"  # one query for all
        assert not tasks["3"].done()
        lost = await asyncio.wait_for(tasks["3"], 5)
        assert lost.payload["state"] == "LOST"
        assert not cluster.of("scontrol")  # squeue answered: scontrol could not know more

    asyncio.run(scenario())


def test_lone_trigger_falls_back_to_scontrol_when_squeue_refuses_the_id(cluster):
    # squeue failed for an unknown reason: it tells nothing, so scontrol is asked after sacct.
    cluster.jobs["4"] = "COMPLETED"

    async def scenario():
        poller = T._SharedPoller.for_conn("fake")
        cluster.faults.append((1, "squeue: error: unexpected"))
        infos = await poller.poll(["4"])
        assert infos["4"].state.value == "COMPLETED" and infos["4"].exit_code == 0
        assert [c.split()[0] for c in cluster.commands] == ["squeue", "sacct", "scontrol"]
        poller.close()
        assert cluster.conns[0].closed

    asyncio.run(scenario())


def test_watch_backoff_doubles_only_when_due_and_unchanged():
    async def scenario():
        from atlasflow.slurm import JobInfo, JobState

        w = T._Watch("1", poll_min_s=1, poll_max_s=4, lost_grace_s=60, transient_retries=1)
        running = JobInfo("1", JobState.RUNNING)
        w.observe(running, 100.0)
        assert (w.interval, w.due) == (1, 101.0)
        w.observe(running, 100.5)  # polled early because another watch was due: schedule kept
        assert (w.interval, w.due) == (1, 101.0)
        for now, interval in ((101.0, 2), (103.0, 4), (107.0, 4)):
            w.observe(running, now)
            assert w.interval == interval
        w.observe(JobInfo("1", JobState.COMPLETING), 111.0)  # changed: look again soon
        assert (w.interval, w.due) == (1, 112.0)
        w.transient_error(ConnectionError("x"), 112.0)
        assert w.due == 114.0 and not w.result.done()
        w.transient_error(ConnectionError("x"), 114.0)
        assert isinstance(w.result.exception(), T.PollFailed)

    asyncio.run(scenario())


def test_serialize_round_trip_has_no_poller_state():
    t = _trigger("12")
    path, kwargs = t.serialize()
    assert path == "atlasflow_airflow.triggers.slurm.SlurmJobTrigger"
    assert kwargs == {"job_id": "12", **{k: v for k, v in FAST.items()}}
    assert T.SlurmJobTrigger(**kwargs).serialize() == (path, kwargs)


def test_unexpected_poller_error_fails_every_waiting_trigger(cluster, monkeypatch):
    class WrongHostKey(Exception):
        pass

    async def _open(self):
        raise WrongHostKey("host key mismatch")

    monkeypatch.setattr(T._SharedPoller, "_open", _open)

    async def scenario():
        results = await asyncio.gather(_start(_trigger("1")), _start(_trigger("2")), return_exceptions=True)
        assert [type(r) for r in results] == [WrongHostKey, WrongHostKey]
        assert not T._SharedPoller._registry

    asyncio.run(scenario())


def test_permanent_ssh_error_fails_every_trigger_at_once_without_retrying(cluster):
    """An authentication failure (asyncssh's own exception) is not retried transient_retries times."""
    import asyncssh

    cluster.jobs = {"1": "RUNNING"}
    cluster.faults = [asyncssh.PermissionDenied("Permission denied")] * 10

    async def scenario():
        return await asyncio.wait_for(_start(_trigger("1")), 5)

    event = asyncio.run(scenario()).payload
    assert event["status"] == "error" and event["permanent"] is True
    assert "authentication failed" in event["message"] and "may still be running" in event["message"]
    assert len(cluster.of("squeue")) == 1  # failed on the first error, no backoff and retries


def test_transient_ssh_error_is_retried(cluster):
    cluster.jobs = {"1": "COMPLETED"}
    cluster.faults = [ConnectionRefusedError(111, "Connection refused"), TimeoutError()]

    async def scenario():
        return await asyncio.wait_for(_start(_trigger("1")), 5)

    event = asyncio.run(scenario()).payload
    assert event["status"] == "success" and len(cluster.of("squeue")) == 3
