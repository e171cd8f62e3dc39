"""SSH errors are sorted into permanent (fail the task at once, say what to fix) and transient (retry)."""

from __future__ import annotations

import json
import socket
import time

import asyncssh
import paramiko
import pytest

from atlasflow_airflow.hooks.slurm import (
    SlurmCommandError,
    SlurmHook,
    SSHPermanentError,
    permanent_ssh_problem,
)


@pytest.mark.parametrize(("exc", "fragment"), [
    (paramiko.AuthenticationException("Authentication failed."), "authentication failed"),
    (paramiko.BadAuthenticationType("Bad authentication type", ["publickey"]), "authentication failed"),
    (paramiko.SSHException("Server '[127.0.0.1]:2222' not found in known_hosts"), "host key is not known"),
    (paramiko.SSHException("No authentication methods available"), "authentication failed"),
    (asyncssh.PermissionDenied("Permission denied for user x on host y"), "authentication failed"),
    (asyncssh.HostKeyNotVerifiable("Host key is not trusted for host 127.0.0.1"), "host key is not known"),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "does not resolve"),
])
def test_permanent_errors_name_what_to_fix(exc, fragment):
    assert fragment in permanent_ssh_problem(exc)


def test_changed_host_key_is_permanent():
    key = paramiko.RSAKey.generate(1024)
    other = paramiko.RSAKey.generate(1024)
    assert "host key changed" in permanent_ssh_problem(paramiko.BadHostKeyException("h", key, other))


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(111, "Connection refused"), TimeoutError("timed out"), ConnectionResetError(104, "reset"),
    EOFError(), paramiko.SSHException("Error reading SSH protocol banner"),
    asyncssh.ConnectionLost("Connection lost"), socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
    paramiko.ssh_exception.NoValidConnectionsError({("127.0.0.1", 22): ConnectionRefusedError(111, "refused")}),
])
def test_transient_errors_are_retried(exc):
    assert permanent_ssh_problem(exc) is None


def _conn(monkeypatch, name: str, host: str, port: int) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{name.upper()}", json.dumps(
        {"conn_type": "ssh", "host": host, "port": port, "login": "nobody", "extra": {"conn_timeout": 5}}))


def test_unknown_host_fails_at_once(monkeypatch):
    _conn(monkeypatch, "slurm_nowhere", "no-such-host.invalid", 22)
    started = time.monotonic()
    with pytest.raises(SSHPermanentError, match="'slurm_nowhere' to no-such-host.invalid:22: the host name does not"):
        SlurmHook("slurm_nowhere", transient_retries=5).run("true")
    assert time.monotonic() - started < 5  # no 2 + 4 + 8 + 16 + 30 s of retries


def test_refused_connection_is_retried_then_reported(monkeypatch, caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _conn(monkeypatch, "slurm_closed", "127.0.0.1", port)
    with pytest.raises(SlurmCommandError, match="Connection reset"):
        SlurmHook("slurm_closed", transient_retries=1).run("true")
    assert "transient error from `true` (try 1)" in caplog.text
