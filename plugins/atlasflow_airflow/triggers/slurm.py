"""SlurmJobTrigger: wait for one SLURM job; all triggers of a triggerer share one poller per connection.

A triggerer runs every deferred task's trigger in one asyncio event loop. Polling each job on its own
(``squeue -j ID`` per trigger per poll) costs slurmctld one RPC burst per job per poll; instead, the
triggers of one ``conn_id`` in one event loop register with a :class:`_SharedPoller`, whose single task
holds one SSH connection and runs ONE ``squeue --jobs=a,b,c`` per cycle for every registered job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from atlasflow.slurm import JobInfo, JobState, parse_sacct, parse_scontrol, parse_squeue
from atlasflow.slurm import commands as C

log = logging.getLogger(__name__)

#: Remote commands are bounded; a hung login node must not stall every trigger forever.
COMMAND_TIMEOUT_S = 120.0


class PollFailed(Exception):
    """Polling gave up on a job (too many transient errors in a row); the trigger emits an error event."""


class _Watch:
    """One trigger's registration with a poller: its job, its backoff state and where its result goes.

    Parameters
    ----------
    job_id, poll_min_s, poll_max_s, lost_grace_s, transient_retries
        As on :class:`SlurmJobTrigger`.
    """

    def __init__(self, job_id: str, *, poll_min_s: float, poll_max_s: float, lost_grace_s: float,
                 transient_retries: int) -> None:
        self.job_id = job_id
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        self.lost_grace_s, self.transient_retries = lost_grace_s, transient_retries
        self.interval = poll_min_s
        self.due = time.monotonic()  # a new watch is polled at once, as a lone trigger always was
        self.last_state: JobState | None = None
        self.missing_since: float | None = None
        self.errors = 0
        # Resolved once: the job's final JobInfo, or PollFailed / an unexpected error.
        self.result: asyncio.Future[JobInfo] = asyncio.get_running_loop().create_future()

    def finish(self, info: JobInfo) -> None:
        if not self.result.done():
            self.result.set_result(info)

    def fail(self, exc: BaseException) -> None:
        if not self.result.done():
            self.result.set_exception(exc)

    def observe(self, info: JobInfo | None, now: float) -> None:
        """Apply one poll's answer (``None``: absent everywhere) to this watch's backoff and grace."""
        self.errors = 0
        if info is None:
            self.missing_since = self.missing_since if self.missing_since is not None else now
            info = C.lost_or_none(self.job_id, self.missing_since, now, self.lost_grace_s)
        else:
            self.missing_since = None
        if info is not None and info.state.finished:
            self.finish(info)
            return
        state = info.state if info is not None else None
        if state != self.last_state:
            # Something happened: look again soon.
            self.interval, self.due = self.poll_min_s, now + self.poll_min_s
        elif self.due <= now + 0.05:
            # Due and unchanged: back off. (A watch polled early, because another one was due, keeps its
            # schedule; the extra look was free, it must not speed up this watch's backoff.)
            self.interval = min(self.poll_max_s, self.interval * 2)
            self.due = now + self.interval
        self.last_state = state

    def transient_error(self, exc: Exception, now: float) -> None:
        """Count a transient error; give up after ``transient_retries`` in a row, else retry with backoff."""
        self.errors += 1
        if self.errors > self.transient_retries:
            self.fail(PollFailed(f"{self.errors} transient errors in a row: {exc}"))
        else:
            self.due = now + min(self.poll_max_s, self.poll_min_s * 2**self.errors)


class _SharedPoller:
    """One SSH connection and one polling task for every job watched through ``conn_id`` in one event loop.

    Each cycle runs one ``squeue`` for all registered jobs; jobs that finished or left squeue are resolved
    with scontrol and one batched ``sacct``. The cycle interval is the minimum of the watches' own
    intervals (each starts at ``poll_min_s`` and doubles while its job's state is unchanged, up to
    ``poll_max_s``). When the last watch unregisters, the connection is closed and the task stops.

    Use :meth:`for_conn` (never the constructor) so that triggers of one loop find the same poller.
    """

    _registry: dict[tuple[str, asyncio.AbstractEventLoop], _SharedPoller] = {}

    def __init__(self, conn_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.conn_id = conn_id
        self.loop = loop
        self.watches: list[_Watch] = []
        self.connections_opened = 0
        self.cycles = 0
        self._conn: Any = None
        self._connect_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_conn(cls, conn_id: str) -> _SharedPoller:
        """The running loop's poller for ``conn_id``, created on first use."""
        loop = asyncio.get_running_loop()
        # Forget pollers of loops that ended with watches still registered (asyncio.run torn down).
        for key in [k for k in cls._registry if k[1].is_closed()]:
            del cls._registry[key]
        poller = cls._registry.get((conn_id, loop))
        if poller is None:
            poller = cls._registry[(conn_id, loop)] = cls(conn_id, loop)
        return poller

    # -- registration ------------------------------------------------------------------------------------

    def register(self, watch: _Watch) -> None:
        self.watches.append(watch)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._loop(), name=f"slurm-poller[{self.conn_id}]")
        self._wake.set()  # a sleeping poller polls the newcomer now, not at the end of a 300 s backoff

    def unregister(self, watch: _Watch) -> None:
        """Drop ``watch``; the last one out closes the connection and stops the task.

        Synchronous on purpose: it runs in a trigger's ``finally``, also while that task is being cancelled.
        """
        with contextlib.suppress(ValueError):
            self.watches.remove(watch)
        if not self.watches:
            self.close()

    def close(self) -> None:
        """Leave the registry, stop the task and close the connection (a later trigger gets a new poller)."""
        if self._registry.get((self.conn_id, self.loop)) is self:
            del self._registry[(self.conn_id, self.loop)]
        if self._task is not None and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()
        self._drop()

    # -- the connection ----------------------------------------------------------------------------------

    async def _open(self) -> Any:
        """A new asyncssh connection; SSHHookAsync verifies the host key (``known_hosts`` extra)."""
        from airflow.providers.ssh.hooks.ssh import SSHHookAsync

        return await SSHHookAsync(ssh_conn_id=self.conn_id).get_conn()

    async def _connect(self) -> Any:
        async with self._connect_lock:  # concurrent callers (poll + final events) share one new connection
            if self._conn is None:
                self._conn = await self._open()
                self.connections_opened += 1
            return self._conn

    def _drop(self, conn: Any = None) -> None:
        """Close the held connection (only if it is still ``conn``, when given: a newer one stays)."""
        if self._conn is not None and (conn is None or conn is self._conn):
            self._conn.close()
            self._conn = None

    async def run(self, cmd: str) -> tuple[int, str, str]:
        """Run ``cmd`` over the shared connection; raise ``ConnectionError`` on a transport or transient error.

        Returns
        -------
        tuple of (int, str, str)
            Exit status (-1 when none), stdout, stderr.
        """
        import asyncssh

        conn = None
        try:
            conn = self._conn or await self._connect()
            res = await conn.run(cmd, check=False, timeout=COMMAND_TIMEOUT_S)
        except Exception as exc:
            from atlasflow_airflow.hooks.slurm import SSHPermanentError, permanent_ssh_problem

            if (problem := permanent_ssh_problem(exc)) is not None:
                # not transient: a wrong host key, login or host name fails every waiting trigger at once
                raise SSHPermanentError(f"SSH connection {self.conn_id!r}: {problem}") from exc
            if not isinstance(exc, TimeoutError | OSError | asyncssh.Error):
                raise
            if conn is not None:
                self._drop(conn)  # reconnect on next use
            raise ConnectionError(str(exc)) from exc
        rc = res.exit_status if res.exit_status is not None else -1
        out, err = str(res.stdout or ""), str(res.stderr or "")
        if rc != 0 and C.is_transient(err):
            raise ConnectionError(err.strip())
        return rc, out, err

    # -- polling -----------------------------------------------------------------------------------------

    async def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        """One cycle: the state of each of ``job_ids`` (a job missing from the answer is unknown everywhere).

        Parameters
        ----------
        job_ids
            Jobs to look up (duplicates allowed).

        Returns
        -------
        dict of str to JobInfo
            Live jobs as squeue shows them; finished ones with exit code and reason where known.
        """
        ids = sorted(set(job_ids), key=int)
        rc, out, err = await self.run(C.squeue_cmd(ids))
        # "Invalid job id specified" (rc 1) is how squeue says that none of the jobs exists any more.
        squeue_ok = rc == 0 or "Invalid job id specified" in err
        seen = parse_squeue(out) if rc == 0 else {}
        found = {j: info for j, info in seen.items() if j in ids and not info.state.finished}
        done = [j for j in ids if j in seen and seen[j].state.finished]
        gone = [j for j in ids if j not in seen]
        # Finished jobs are still in slurmctld's memory: scontrol has their exit code and reason. One RPC
        # per job, once in its life, so it is not worth batching (scontrol takes one id anyway).
        for j in done:
            rc, out, _ = await self.run(C.scontrol_cmd(j))
            if rc == 0 and (info := parse_scontrol(out).get(j)):
                found[j] = info
        # Jobs slurmctld no longer holds (or scontrol missed): sacct outlives slurmctld's memory. One
        # query for all of them, and it goes to slurmdbd, not slurmctld.
        ask = [j for j in done + gone if j not in found]
        if ask:
            rc, out, _ = await self.run(C.sacct_cmd(ask))
            if rc == 0:
                found.update((j, info) for j, info in parse_sacct(out).items() if j in ask)
        # scontrol per job only as a fallback when squeue failed otherwise; when it did answer, scontrol
        # reads the same job table and cannot know a job that squeue -t all did not list.
        if not squeue_ok:
            for j in gone:
                if j not in found:
                    rc, out, _ = await self.run(C.scontrol_cmd(j))
                    if rc == 0 and (info := parse_scontrol(out).get(j)):
                        found[j] = info
        for j in done:
            found.setdefault(j, seen[j])  # finished per squeue, details unknown: still final
        return found

    async def _cycle(self, watches: list[_Watch]) -> None:
        """Poll every job of ``watches`` at once and update each watch (errors count per watch)."""
        try:
            infos = await self.poll([w.job_id for w in watches])
        except ConnectionError as exc:
            # One line per failed cycle, not one per job: 50 identical warnings would say nothing more.
            log.warning("transient error polling %d SLURM job(s) via %s: %s", len(watches), self.conn_id, exc)
            now = time.monotonic()
            for w in watches:
                w.transient_error(exc, now)
        else:
            now = time.monotonic()
            for w in watches:
                w.observe(infos.get(w.job_id), now)
        self.cycles += 1

    async def _loop(self) -> None:
        try:
            while self.watches:
                # Resolved watches stay registered until their trigger has built its event (it still needs
                # the connection for log tails) but are not polled again. Newcomers during a cycle wait
                # for the next one, which their registration makes immediate.
                watches = [w for w in self.watches if not w.result.done()]
                if watches:
                    await self._cycle(watches)
                pending = [w for w in self.watches if not w.result.done()]
                self._wake.clear()
                if not pending:
                    await self._wake.wait()
                    continue
                # The shared interval: the earliest of the watches' own schedules.
                delay = min(w.due for w in pending) - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
        except Exception as exc:
            # Anything else (a wrong host key, unparsable output) is the triggers' failure, as it was when
            # each polled alone: each waiting trigger raises it. The task ends; a later register()
            # starts a new one.
            log.error("SLURM poller for %s failed: %r", self.conn_id, exc)
            for w in self.watches:
                w.fail(exc)
        finally:
            if not self.watches:
                self._drop()


class SlurmJobTrigger(BaseTrigger):
    """Wait for ``job_id`` to finish; emit its state, exit code, reason, result JSON and log tails.

    The job is polled by the event loop's shared poller for ``conn_id`` (one SSH connection and one
    batched ``squeue`` per cycle for all triggers); alone, a trigger behaves as it always did. The poll
    interval starts at ``poll_min_s`` and doubles while nothing changes, up to ``poll_max_s``. A job that
    left squeue is looked up in scontrol and sacct, and is LOST only when absent from all of them for
    ``lost_grace_s``.
    """

    def __init__(
        self,
        *,
        job_id: str,
        conn_id: str,
        stdout_path: str,
        stderr_path: str,
        result_path: str,
        poll_min_s: float = 5.0,
        poll_max_s: float = 300.0,
        lost_grace_s: float = 600.0,
        transient_retries: int = 5,
    ) -> None:
        super().__init__()
        self.job_id = str(job_id)
        self.conn_id = conn_id
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.result_path = result_path
        self.poll_min_s = float(poll_min_s)
        self.poll_max_s = float(poll_max_s)
        self.lost_grace_s = float(lost_grace_s)
        self.transient_retries = int(transient_retries)
        # The poller this trigger last used; kept after unregistering so its counters stay readable.
        self.poller: _SharedPoller | None = None

    @property
    def connections_opened(self) -> int:
        """SSH connections opened by this trigger's (shared) poller."""
        return self.poller.connections_opened if self.poller is not None else 0

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "conn_id": self.conn_id,
                "stdout_path": self.stdout_path,
                "stderr_path": self.stderr_path,
                "result_path": self.result_path,
                "poll_min_s": self.poll_min_s,
                "poll_max_s": self.poll_max_s,
                "lost_grace_s": self.lost_grace_s,
                "transient_retries": self.transient_retries,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self.poller = poller = _SharedPoller.for_conn(self.conn_id)
        watch = _Watch(self.job_id, poll_min_s=self.poll_min_s, poll_max_s=self.poll_max_s,
                       lost_grace_s=self.lost_grace_s, transient_retries=self.transient_retries)
        poller.register(watch)
        try:
            try:
                info = await watch.result
            except PollFailed as exc:
                event = {"status": "error", "job_id": self.job_id, "message": str(exc)}
            except Exception as exc:
                from atlasflow_airflow.hooks.slurm import SSHPermanentError

                if not isinstance(exc, SSHPermanentError):
                    raise
                # no retry can cure it: the task fails at once (the job itself may still be running)
                event = {"status": "error", "job_id": self.job_id, "permanent": True,
                         "message": f"{exc} (job {self.job_id} was not cancelled and may still be running)"}
            else:
                event = await self._final_event(poller, info)
        finally:
            # Before the yield: the triggerer may never resume this generator after its event, and a
            # cancelled trigger must not keep the connection open.
            poller.unregister(watch)
        yield TriggerEvent(event)

    async def on_kill(self) -> None:
        """The user killed the deferred task: cancel the SLURM job (the worker's on_kill does not run)."""
        from airflow.providers.ssh.hooks.ssh import SSHHookAsync

        # Own connection: the shared one may be closing as the last trigger's task is cancelled.
        async with await SSHHookAsync(ssh_conn_id=self.conn_id).get_conn() as conn:
            res = await conn.run(C.scancel_cmd([self.job_id]), check=False, timeout=60)
        self.log.info("scancel %s: rc %s %s", self.job_id, res.exit_status, str(res.stderr or "").strip())

    async def _final_event(self, poller: _SharedPoller, info: JobInfo) -> dict[str, Any]:
        event: dict[str, Any] = {
            "status": "success" if info.state is JobState.COMPLETED else "failed",
            "job_id": self.job_id,
            "state": info.state.value,
            "exit_code": info.exit_code,
            "signal": info.signal,
            "reason": info.reason,
            "message": info.describe(),
            "result": None,
        }
        try:
            for key, path in (("stdout_tail", self.stdout_path), ("stderr_tail", self.stderr_path)):
                event[key] = (await poller.run(C.tail_cmd(path)))[1]
            rc, out, _ = await poller.run(C.cat_cmd(self.result_path))
            if rc == 0 and out.strip():
                event["result"] = json.loads(out)
        except (ConnectionError, ValueError) as exc:
            event.setdefault("stdout_tail", "")
            event["result_error"] = str(exc)
        return event
