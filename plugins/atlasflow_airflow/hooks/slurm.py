"""SlurmHook: sbatch / squeue / scontrol / sacct / scancel over the provider's SSHHook.

Host keys are verified by default. SSHHook 7.0.1 rejects unknown hosts (paramiko RejectPolicy) and
trusts ``~/.ssh/known_hosts`` plus a ``host_key`` extra; it ignores a ``known_hosts`` extra (only the
async hook reads it). We read that extra here too, so one connection definition (``known_hosts``
pointing at a file) verifies the host in both the worker and the triggerer. ``no_host_key_check``
is honoured only when the connection says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from airflow.providers.ssh.hooks.ssh import SSHHook

from atlasflow.slurm import (
    JobInfo,
    JobSpec,
    JobState,
    parse_sacct,
    parse_sbatch,
    parse_scontrol,
    parse_squeue,
    render_sbatch,
)
from atlasflow.slurm import commands as C

log = logging.getLogger(__name__)


class SSHPermanentError(RuntimeError):
    """An SSH failure that no retry can cure (authentication, host key, unknown host): fail at once."""


def permanent_ssh_problem(exc: BaseException) -> str | None:
    """What is permanently wrong when ``exc`` ended an SSH attempt, or None when retrying may help.

    Permanent: authentication refused, a host key that is unknown or changed, a host name that does
    not resolve. Everything else (refused, reset, timed out, lost connection) is transient: the login
    node may be restarting. Covers both clients in use: paramiko (workers) and asyncssh (triggerer).
    """
    import socket

    import asyncssh
    import paramiko

    if isinstance(exc, paramiko.BadHostKeyException) or (
            isinstance(exc, asyncssh.HostKeyNotVerifiable) and "mismatch" in str(exc).lower()):
        return (f"the server's host key changed ({exc}); if the change is expected, replace its line in the "
                "known_hosts file (ssh-keyscan), otherwise suspect a man-in-the-middle")
    if isinstance(exc, asyncssh.HostKeyNotVerifiable) or (
            isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc)):
        return (f"the server's host key is not known ({exc}): add it to the file named by the connection's "
                "known_hosts extra (`ssh-keyscan -p PORT HOST >> FILE`; atlasflow validate-system prints it)")
    if isinstance(exc, paramiko.AuthenticationException | asyncssh.PermissionDenied) or (
            isinstance(exc, paramiko.SSHException) and "No authentication methods available" in str(exc)):
        return f"authentication failed ({exc}): check the connection's login and key_file (or password)"
    if isinstance(exc, socket.gaierror) and exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
        # EAI_AGAIN (the resolver did not answer) stays transient
        return f"the host name does not resolve ({exc}): check the connection's host"
    return None


class SlurmCommandError(RuntimeError):
    def __init__(self, cmd: str, rc: int, stderr: str) -> None:
        super().__init__(f"`{cmd}` failed (rc {rc}): {stderr.strip()[:500]}")
        self.rc, self.stderr = rc, stderr

    @property
    def transient(self) -> bool:
        return C.is_transient(self.stderr)


class SlurmHook(SSHHook):
    """Run SLURM client commands on the cluster's login node over one reused SSH connection."""

    conn_name_attr = "ssh_conn_id"
    default_conn_name = "slurm_ssh"
    hook_name = "SLURM over SSH"

    def __init__(self, ssh_conn_id: str = "slurm_ssh", *, transient_retries: int = 5, **kwargs: Any) -> None:
        # one connect per attempt: run() classifies the error and backs off itself (SSHHook's own
        # 3 attempts would retry an authentication failure too)
        kwargs.setdefault("conn_retry_attempts", 1)
        super().__init__(ssh_conn_id=ssh_conn_id, **kwargs)
        self.transient_retries = transient_retries
        self._remote_user: str | None = None
        self._load_known_hosts_extra()

    def _load_known_hosts_extra(self) -> None:
        if self.host_key is not None or self.no_host_key_check or not self.ssh_conn_id:
            return
        path = self.get_connection(self.ssh_conn_id).extra_dejson.get("known_hosts")
        if not path:
            return
        import paramiko

        entry = f"[{self.remote_host}]:{self.port}" if self.port and self.port != 22 else self.remote_host
        keys = paramiko.HostKeys(str(path)).lookup(entry)
        if not keys:
            raise ValueError(f"known_hosts file {path} has no key for {entry}")
        self.host_key = next(iter(keys.values()))

    def run(self, cmd: str, *, stdin: str | None = None, check: bool = True) -> tuple[int, str, str]:
        """Run ``cmd``; reconnect and retry on transient SSH or slurmctld errors."""
        attempt = 0
        while True:
            try:
                client = self.get_conn()
                chan_in, chan_out, chan_err = client.exec_command(cmd, timeout=self.cmd_timeout or 120)
                if stdin is not None:
                    chan_in.write(stdin)
                    chan_in.channel.shutdown_write()
                out = chan_out.read().decode()
                err = chan_err.read().decode()
                rc = chan_out.channel.recv_exit_status()
            except Exception as exc:
                import paramiko

                if (problem := permanent_ssh_problem(exc)) is not None:
                    raise SSHPermanentError(f"SSH connection {self.ssh_conn_id!r} to {self.remote_host}:{self.port}: "
                                            f"{problem}") from exc
                if not isinstance(exc, OSError | EOFError | paramiko.SSHException):
                    raise
                rc, out, err = -1, "", f"Connection reset: {exc}"  # refused, reset, timed out: retried below
                self.client = None
            if rc == 0 or not C.is_transient(err) or attempt >= self.transient_retries:
                break
            attempt += 1
            log.warning("transient error from `%s` (try %d): %s", cmd, attempt, err.strip()[:200])
            time.sleep(min(30.0, 2.0**attempt))
        if check and rc != 0:
            raise SlurmCommandError(cmd, rc, err)
        return rc, out, err

    def submit(self, spec: JobSpec) -> str:
        self.run(f"mkdir -p {C.shlex.quote(spec.output_dir)}")
        _, out, _ = self.run(C.submit_cmd(), stdin=render_sbatch(spec))
        return parse_sbatch(out)

    def remote_user(self) -> str:
        """The user the connection runs as on the cluster (``id -un``, asked once)."""
        if self._remote_user is None:
            self._remote_user = C.user_name(self.run(C.whoami_cmd())[1])
        return self._remote_user

    def find_by_tag(self, tag: str) -> list[JobInfo]:
        """The connection user's jobs in slurmctld's memory whose ``--comment`` is ``tag``, oldest first."""
        _, out, _ = self.run(C.squeue_cmd(user=self.remote_user()))
        jobs = [j for j in parse_squeue(out).values() if j.comment == tag]
        return sorted(jobs, key=lambda j: int(j.job_id))

    def job_info(self, job_id: str) -> JobInfo | None:
        """Full state of one job: scontrol first (exit code, paths), then sacct."""
        rc, out, _ = self.run(C.scontrol_cmd(job_id), check=False)
        if rc == 0 and (info := parse_scontrol(out).get(str(job_id))):
            return info
        rc, out, _ = self.run(C.sacct_cmd(job_id), check=False)
        if rc == 0:
            return parse_sacct(out).get(str(job_id))
        return None

    def ping(self) -> tuple[bool, str]:
        """Whether the login node answers over SSH and slurmctld is up, with the reply for the log."""
        rc, out, err = self.run(C.ping_cmd(), check=False)
        return rc == 0 and C.ping_ok(out), (out or err).strip()

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            self.run(C.scancel_cmd(job_ids), check=False)

    def read_text(self, path: str) -> str | None:
        rc, out, _ = self.run(C.cat_cmd(path), check=False)
        return out if rc == 0 else None

    def tail(self, path: str) -> str:
        return self.run(C.tail_cmd(path), check=False)[1]


__all__ = ["JobState", "SSHPermanentError", "SlurmCommandError", "SlurmHook", "permanent_ssh_problem"]
