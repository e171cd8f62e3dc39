"""SlurmJobTrigger: poll one SLURM job over ONE reused async SSH connection, with backoff."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from atlasflow.slurm import JobInfo, JobState, parse_sacct, parse_scontrol, parse_squeue
from atlasflow.slurm import commands as C

log = logging.getLogger(__name__)


class SlurmJobTrigger(BaseTrigger):
    """Wait for ``job_id`` to finish; emit its state, exit code, reason, result JSON and log tails.

    One SSH connection is opened per trigger and reused for every poll; it is reopened only after a
    transport error. The poll interval starts at ``poll_min_s`` and doubles while nothing changes, up to
    ``poll_max_s``. A job that left squeue is looked up in scontrol, then sacct, and is LOST only when
    absent from all three for ``lost_grace_s``.
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
        self._conn: Any = None
        self.connections_opened = 0

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

    async def _connect(self) -> Any:
        from airflow.providers.ssh.hooks.ssh import SSHHookAsync

        self._conn = await SSHHookAsync(ssh_conn_id=self.conn_id).get_conn()
        self.connections_opened += 1
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    async def _run(self, cmd: str) -> tuple[int, str, str]:
        """Run over the held connection; raise ``ConnectionError`` on a transport failure."""
        import asyncssh

        try:
            conn = self._conn or await self._connect()
            res = await conn.run(cmd, check=False, timeout=120)
        except asyncssh.HostKeyNotVerifiable:
            raise
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            self._drop()
            raise ConnectionError(str(exc)) from exc
        rc = res.exit_status if res.exit_status is not None else -1
        out, err = str(res.stdout or ""), str(res.stderr or "")
        if rc != 0 and C.is_transient(err):
            raise ConnectionError(err.strip())
        return rc, out, err

    async def poll_once(self, missing_since: float | None) -> tuple[JobInfo | None, float | None]:
        """One poll. Returns (info or None while unknown-but-in-grace, updated missing_since)."""
        rc, out, err = await self._run(C.squeue_cmd([self.job_id]))
        info = parse_squeue(out).get(self.job_id) if rc == 0 else None
        if info is not None and not info.state.finished:
            return info, None
        # Finished or vanished: scontrol has exit code and reason; sacct outlives slurmctld's memory.
        rc, out, _ = await self._run(C.scontrol_cmd(self.job_id))
        full = parse_scontrol(out).get(self.job_id) if rc == 0 else None
        if full is None:
            rc, out, _ = await self._run(C.sacct_cmd(self.job_id))
            full = parse_sacct(out).get(self.job_id) if rc == 0 else None
        if full is None:
            full = info
        if full is not None:
            return full, None
        missing_since = missing_since if missing_since is not None else time.monotonic()
        return C.lost_or_none(self.job_id, missing_since, time.monotonic(), self.lost_grace_s), missing_since

    async def run(self) -> AsyncIterator[TriggerEvent]:
        interval = self.poll_min_s
        missing_since: float | None = None
        errors = 0
        last_state: JobState | None = None
        try:
            while True:
                try:
                    info, missing_since = await self.poll_once(missing_since)
                    errors = 0
                except ConnectionError as exc:
                    errors += 1
                    if errors > self.transient_retries:
                        yield TriggerEvent({"status": "error", "job_id": self.job_id,
                                            "message": f"{errors} transient errors in a row: {exc}"})
                        return
                    self.log.warning("transient error polling job %s (%d): %s", self.job_id, errors, exc)
                    await asyncio.sleep(min(self.poll_max_s, self.poll_min_s * 2**errors))
                    continue
                if info is not None and info.state.finished:
                    yield TriggerEvent(await self._final_event(info))
                    return
                state = info.state if info else None
                interval = self.poll_min_s if state != last_state else min(self.poll_max_s, interval * 2)
                last_state = state
                await asyncio.sleep(interval)
        finally:
            self._drop()

    async def on_kill(self) -> None:
        """The user killed the deferred task: cancel the SLURM job (the worker's on_kill does not run)."""
        from airflow.providers.ssh.hooks.ssh import SSHHookAsync

        # Own connection: the poll loop's may be closing concurrently as its task is cancelled.
        async with await SSHHookAsync(ssh_conn_id=self.conn_id).get_conn() as conn:
            res = await conn.run(C.scancel_cmd([self.job_id]), check=False, timeout=60)
        self.log.info("scancel %s: rc %s %s", self.job_id, res.exit_status, str(res.stderr or "").strip())

    async def _final_event(self, info: JobInfo) -> dict[str, Any]:
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
                event[key] = (await self._run(C.tail_cmd(path)))[1]
            rc, out, _ = await self._run(C.cat_cmd(self.result_path))
            if rc == 0 and out.strip():
                event["result"] = json.loads(out)
        except (ConnectionError, ValueError) as exc:
            event.setdefault("stdout_tail", "")
            event["result_error"] = str(exc)
        return event
