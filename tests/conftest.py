"""Test-wide setup.

Airflow reads its configuration when first imported, so the environment for an isolated Airflow
(temporary AIRFLOW_HOME, SQLite, this checkout's dags/ and plugins/) is set here, at collection,
before any test module imports airflow. Tests that need the metadata DB use ``airflow_db``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="atlasflow-test-airflow-"))
atexit.register(shutil.rmtree, _AIRFLOW_HOME, True)

AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(_AIRFLOW_HOME),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    "AIRFLOW__API__HOST": "127.0.0.1",
}
for _key, _value in AIRFLOW_ENV.items():
    os.environ.setdefault(_key, _value)
# The DAG files read their config from here at parse time; tests point it at their own files.
os.environ.pop("ATLASFLOW_CONFIG", None)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata DB in the session's temporary AIRFLOW_HOME (~4 s, once)."""
    home = Path(os.environ["AIRFLOW_HOME"])
    if not (home / ".migrated").exists():
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            check=True,
            capture_output=True,
            env={**os.environ},
        )
        (home / ".migrated").touch()
    return home


@pytest.fixture
def repo() -> Path:
    return REPO
