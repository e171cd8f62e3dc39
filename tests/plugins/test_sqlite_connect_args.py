"""A SQLite metadata DB waits for its write lock (60 s) instead of failing with "database is locked"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from atlasflow_testing.local_airflow import LocalAirflow

REPO = Path(__file__).resolve().parents[2]
PROBE = "from airflow import settings; print(settings._get_connect_args('sync')['timeout'])"


def _env_from_script(tmp_path: Path, db_url: str | None) -> dict[str, str]:
    preset = f"export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN={db_url}; " if db_url else ""
    done = subprocess.run(["bash", "-c", f"{preset}source {REPO / 'scripts' / 'airflow_env.sh'}; env -0"],
                          env={"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path)}, capture_output=True,
                          text=True, check=True)
    return dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)


def test_demo_environment_gives_sqlite_a_long_lock_wait(tmp_path):
    env = _env_from_script(tmp_path, None)
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite")
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "60"


def test_server_databases_get_no_sqlite_arguments(tmp_path):
    env = _env_from_script(tmp_path, "postgresql+psycopg2://u@127.0.0.1/x")
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in env  # psycopg2 would refuse `timeout`
    harness = LocalAirflow(tmp_path, tmp_path / "c.yaml", db_url="postgresql+psycopg2://u@127.0.0.1/x")
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in harness.env


def test_test_harness_sets_the_same_arguments(tmp_path):
    harness = LocalAirflow(tmp_path, tmp_path / "c.yaml")
    done = subprocess.run([sys.executable, "-c", PROBE], env=harness.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "60"
