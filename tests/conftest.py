"""Test-wide setup.

Airflow reads its configuration when first imported, so the environment for an isolated Airflow
(temporary AIRFLOW_HOME, SQLite, this checkout's dags/ and plugins/) is set here, at collection,
before any test module imports airflow. Tests that need the metadata DB use ``airflow_db``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_server(name: str, *, state_var: str, port_var: str) -> Iterator[str]:
    """Run ``scripts/local-<name>`` on 127.0.0.1 for a session: start, yield its URL, stop by its PID.

    The state folder is not under pytest's tmp dirs: those are private to root, and the server runs as its
    own account (postgres, redis) when we are root.
    """
    state = Path(tempfile.mkdtemp(prefix=f"atlasflow-test-{name}-"))
    os.chmod(state, 0o755)
    env = {**os.environ, state_var: str(state), port_var: str(_free_port())}
    script = str(REPO / "scripts" / f"local-{name}")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=600)
    if started.returncode != 0 and os.geteuid() != 0 and "not root" in started.stderr:
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stdout + started.stderr
    url = subprocess.run([script, "url"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    yield url
    stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True)
    shutil.rmtree(state, ignore_errors=True)
    assert stopped.returncode == 0 and f"stopped {name}" in stopped.stdout


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server (Debian package) on 127.0.0.1, stopped by its PID afterwards; its URL."""
    yield from local_server("postgres", state_var="PG_STATE_DIR", port_var="PG_PORT")


def fresh_postgres_database(server_url: str, prefix: str) -> str:
    """Create an empty database owned by ``airflow`` on the test server; its URL (with the password)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    # scripts/local-postgres gives the postgres superuser the same generated password
    admin = create_engine(url.set(username="postgres", database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" OWNER airflow'))
    admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def postgres_database(postgres_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server (for the ledger tests)."""
    return fresh_postgres_database(postgres_server, "ledger")
