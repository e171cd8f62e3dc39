"""kb count dies with its task, and a retry stops what a killed try left (issue 16 point 6), with real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlasflow.acquire.quant import LOCK_NAME, QuantError, reap_stale_run

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("include", "testing"))}
SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # dead, waiting for its (new) parent to reap it


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_the_child_dies_when_its_task_is_killed(tmp_path):
    task = ("import sys\nfrom pathlib import Path\nfrom atlasflow.acquire.quant import _run\n"
            "work = Path(sys.argv[1])\n"
            f"_run([sys.executable, '-c', {SLEEPER!r}, str(work / 'child.pid')], timeout_s=300,\n"
            "     log_path=work / 'kb.log', lock=work / 'kb.lock.json')\n")
    proc = subprocess.Popen([sys.executable, "-c", task, str(tmp_path)], env=ENV)
    child_pid_file = tmp_path / "child.pid"
    try:
        _wait_for(child_pid_file)
        child = int(child_pid_file.read_text())
        lock = json.loads((tmp_path / LOCK_NAME).read_text())
        assert lock["pgid"] == child and lock["parent_pid"] == proc.pid and lock["host"] == socket.gethostname()
        proc.send_signal(signal.SIGKILL)  # what a worker's OOM killer or a hard timeout does
        proc.wait()
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the child outlived its killed task"
    finally:
        proc.kill()
        if child_pid_file.exists() and child_pid_file.read_text() and not _gone(int(child_pid_file.read_text())):
            os.kill(int(child_pid_file.read_text()), signal.SIGKILL)


def _stale_group(work: Path, *, mention_work: bool = True) -> subprocess.Popen[bytes]:
    """A process group as a killed try leaves it (kb's own children ignore the parent-death signal)."""
    marker = work / "out" if mention_work else work.parent / "elsewhere"
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, str(marker)], start_new_session=True)
    _wait_for(marker)
    return proc


def _lock(work: Path, pgid: int, parent: int, host: str | None = None) -> None:
    (work / LOCK_NAME).write_text(json.dumps({"pgid": pgid, "parent_pid": parent, "host": host or socket.gethostname(),
                                              "program": "kb", "started": time.time()}))


def test_a_retry_stops_the_group_a_killed_try_left(tmp_path):
    work = tmp_path / "quant" / "ds"
    (work / "out").parent.mkdir(parents=True)
    stale = _stale_group(work)
    try:
        _lock(work, stale.pid, _dead_pid())
        assert reap_stale_run(work) == stale.pid
        assert stale.wait(timeout=10) == -signal.SIGTERM
    finally:
        stale.kill()
        stale.wait()
    assert reap_stale_run(work) is None  # nothing left: nothing to do


def test_a_recycled_pid_or_another_host_is_never_killed(tmp_path):
    work = tmp_path / "quant" / "ds"
    work.mkdir(parents=True)
    unrelated = _stale_group(work, mention_work=False)  # the recorded PID now belongs to something else
    try:
        _lock(work, unrelated.pid, _dead_pid())
        assert reap_stale_run(work) is None
        _lock(work, unrelated.pid, _dead_pid(), host="another-node")
        assert reap_stale_run(work) is None
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_live_task_quantifying_in_the_same_folder_is_refused_not_killed(tmp_path):
    work = tmp_path / "quant" / "ds"
    (work / "out").parent.mkdir(parents=True)
    running = _stale_group(work)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(work, running.pid, owner.pid)
        with pytest.raises(QuantError, match=f"another task \\(pid {owner.pid}\\) is still quantifying"):
            reap_stale_run(work)
        assert running.poll() is None
    finally:
        for p in (running, owner):
            p.kill()
            p.wait()
