"""Fixtures for the SLURM integration tests: a real cluster + sshd (scripts/local-slurm) and Airflow.

The cluster is started by a session fixture (idempotent; reused when already up, e.g. started by hand)
and stopped at the end only if this session started it. Not root → every SLURM test is skipped, with
the reason printed by scripts/local-slurm.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fresh_postgres_database, local_server

REPO = Path(__file__).resolve().parents[2]
_HOME = Path(tempfile.mkdtemp(prefix="atlasflow-slurm-airflow-"))
atexit.register(shutil.rmtree, _HOME, True)
# Must precede any airflow import (a tests/conftest.py, when present, sets the same keys first).
for _k, _v in {
    "AIRFLOW_HOME": str(_HOME),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_k, _v)

LOCAL_SLURM = REPO / "scripts" / "local-slurm"


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty metadata database on the shared server for one test (its own Airflow install)."""
    return fresh_postgres_database(postgres_server, "airflow")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis server (Debian ``redis-server``) on 127.0.0.1 as the Celery broker, stopped by its PID."""
    yield from local_server("redis", state_var="REDIS_STATE_DIR", port_var="REDIS_PORT")


def _slurm_state() -> Path:
    return Path(os.environ.get("LOCAL_SLURM_STATE", REPO / ".local-slurm"))


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """Connection details of a running local cluster (dict from connection.json)."""
    if os.geteuid() != 0:
        pytest.skip("SLURM integration tests need root (munge/slurmd/sshd); see scripts/local-slurm")
    state = _slurm_state()
    was_up = subprocess.run([sys.executable, LOCAL_SLURM, "status", "--state-dir", state],
                            capture_output=True).returncode == 0
    subprocess.run([sys.executable, LOCAL_SLURM, "start", "--state-dir", state], check=True)
    conn = json.loads((state / "connection.json").read_text())
    yield conn
    if not was_up:
        subprocess.run([sys.executable, LOCAL_SLURM, "stop", "--state-dir", state], check=False)


def conn_uri(cluster: dict, **extra) -> str:
    return json.dumps({
        "conn_type": "ssh", "host": cluster["host"], "port": cluster["port"], "login": cluster["user"],
        "extra": {"key_file": cluster["key_file"], "known_hosts": cluster["known_hosts"], **extra},
    })


@pytest.fixture(scope="session")
def slurm_airflow(slurm_cluster) -> Iterator[dict]:
    """Migrated Airflow DB + the `slurm_ssh` connection pointing at the local cluster."""
    home = Path(os.environ["AIRFLOW_HOME"])
    if not (home / ".migrated").exists():
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
        (home / ".migrated").touch()
    os.environ["AIRFLOW_CONN_SLURM_SSH"] = conn_uri(slurm_cluster)
    yield slurm_cluster
    os.environ.pop("AIRFLOW_CONN_SLURM_SSH", None)


def ssh(cluster: dict, cmd: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` on the cluster through the real sshd, verifying its host key."""
    return subprocess.run(
        ["ssh", "-p", str(cluster["port"]), "-i", cluster["key_file"], "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={cluster['known_hosts']}", "-o", "StrictHostKeyChecking=yes",
         f"{cluster['user']}@{cluster['host']}", cmd],
        capture_output=True, text=True, timeout=60,
    )


JOB_SCRIPT = r'''
import json, os, sys, time
mode, arg = sys.argv[1], sys.argv[2]
if mode == "sleep":
    time.sleep(float(arg))
elif mode == "exit":
    print("about to fail", flush=True)
    sys.exit(int(arg))
path = os.environ["ATLASFLOW_RESULT_PATH"]
ckpt = os.path.join(os.path.dirname(path), "ckpt-" + arg)
with open(path + ".tmp", "w") as f:
    json.dump({"checkpoint": ckpt, "mode": mode}, f)
os.replace(path + ".tmp", path)
print("wrote", path, flush=True)
'''


@pytest.fixture
def job_command(tmp_path) -> callable:
    """argv for a small real job: ("ok", tag) writes a result; ("exit", N) exits N; ("sleep", s) then ok."""
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT)

    def make(mode: str, arg: str) -> list[str]:
        return [sys.executable, str(script), mode, arg]

    return make
