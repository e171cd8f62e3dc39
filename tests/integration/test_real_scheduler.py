"""atlas_ingest under the real scheduler (api-server + scheduler + dag-processor + triggerer),
started and stopped by scripts/airflow_local.py exactly as `make demo` does, on the embedded
SQLite metadata DB and on a real PostgreSQL server with LocalExecutor parallelism 4."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.atlasflow.conftest import direct_rows, write_xlsx

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "airflow_local.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server (Debian package) on 127.0.0.1, stopped by its PID afterwards."""
    # not under pytest's tmp dirs: they are private to root, and the server runs as postgres
    state = Path(tempfile.mkdtemp(prefix="atlasflow-test-pg-"))
    os.chmod(state, 0o755)
    env = {**os.environ, "PG_STATE_DIR": str(state), "PG_PORT": str(free_port())}
    script = str(REPO / "scripts" / "local-postgres")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    url = subprocess.run([script, "url"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    yield url
    stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True)
    shutil.rmtree(state, ignore_errors=True)
    assert stopped.returncode == 0 and "stopped postgres" in stopped.stdout


@pytest.fixture(params=["sqlite", "postgres"])
def local_airflow(request, tmp_path):
    home = tmp_path / "airflow"
    home.mkdir()
    db = f"sqlite:///{home}/airflow.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    manifest = write_xlsx(tmp_path / "m.xlsx", direct_rows(5))
    config = tmp_path / "atlasflow.yaml"
    config.write_text(f"storage: {{base_dir: {tmp_path / 'base'}}}\nmanifest: {{path: {manifest}}}\nplan: {{batch_size: 2}}\n")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "ATLASFLOW_CONFIG": str(config),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db,
           "PYTHONPATH": str(REPO / "plugins"), "AIRFLOW__CORE__PARALLELISM": "4"}

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                              check=check, timeout=600)

    yield cli, home, tmp_path / "base"
    cli("stop", check=False)


@pytest.mark.parametrize("local_airflow", ["sqlite"], indirect=True)
def test_busy_port_is_refused(local_airflow):
    cli, _, _ = local_airflow
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli("start", "--api-port", str(busy.getsockname()[1]), check=False)
    assert result.returncode != 0 and "is busy" in result.stderr


def test_run_under_real_scheduler_then_stop_by_pid(local_airflow):
    cli, home, base = local_airflow
    started = cli("start", "--api-port", str(free_port()))
    assert "Airflow UI: http://127.0.0.1:" in started.stdout
    pids = json.loads((home / "local" / "state.json").read_text())["pids"]
    assert set(pids) == {"api-server", "scheduler", "dag-processor", "triggerer"}
    assert all(alive(p) for p in pids.values())

    run = cli("trigger", "atlas_ingest", "--wait", "--timeout", "300", check=False)
    assert run.returncode == 0, run.stdout + run.stderr + (home / "local" / "scheduler.log").read_text()[-3000:]
    plan = json.loads((base / "state" / "plan.json").read_text())
    assert [b["batch_id"] for b in plan["batches"]] == ["batch_0000", "batch_0001", "batch_0002"]
    assert len(list((base / "state" / "batches").glob("batch_*.json"))) == 3

    cli("stop")
    assert not any(alive(p) for p in pids.values())
    assert cli("status", check=False).returncode == 3
