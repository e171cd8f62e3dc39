"""Drive a real local Airflow (scripts/airflow_local.py) from tests and benchmarks.

Starts api-server + scheduler + dag-processor + triggerer on 127.0.0.1 with a SQLite metadata DB
under ``home`` (or the database at ``db_url``; with ``executor="CeleryExecutor"`` and a ``broker_url``
also a Celery worker), applies airflow_settings.yaml (pools), triggers/clears/waits for runs, and reads task
timings straight from the metadata DB. Stopping goes through the script, by recorded PID.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["LocalAirflow", "free_port", "union_seconds"]

REPO = Path(__file__).resolve().parents[2]  # testing/atlasflow_testing/local_airflow.py
SCRIPT = REPO / "scripts" / "airflow_local.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _epoch(value: Any) -> float:
    stamp = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if stamp.tzinfo is None:  # Airflow stores UTC
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: how long at least one was under way."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class LocalAirflow:
    """One local Airflow installation under ``home`` for the config file ``config``."""

    def __init__(self, home: Path, config: Path, *, parallelism: int = 4, db_url: str | None = None,
                 executor: str = "LocalExecutor", broker_url: str | None = None) -> None:
        self.home = home
        self.db = home / "airflow.db"
        self.db_url = db_url or f"sqlite:///{self.db}"
        self.env = {**os.environ, "AIRFLOW_HOME": str(home), "ATLASFLOW_CONFIG": str(config),
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url, "AIRFLOW__CORE__EXECUTOR": executor,
                    # this checkout's library too: the venv's editable install may point at another checkout
                    "PYTHONPATH": f"{REPO / 'plugins'}:{REPO / 'include'}", "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    # this checkout's DAGs and plugins, also when not run under pytest (benchmarks)
                    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
                    # the manifest (not the DAG file) changes between runs: re-parse often
                    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5"}
        if self.db_url.startswith("sqlite"):
            # one writer at a time: wait for the lock instead of failing after 5 s (atlasflow_airflow.sqlite)
            self.env.update(dict.fromkeys(("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS",
                                           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC"),
                                          "atlasflow_airflow.sqlite.CONNECT_ARGS"))
        if executor == "CeleryExecutor":
            if not broker_url or self.db_url.startswith("sqlite"):
                raise ValueError("CeleryExecutor needs a broker_url and a server database (db_url)")
            # task states travel through the metadata DB; Celery's own results go to the same server
            self.env.update({"AIRFLOW__CELERY__BROKER_URL": broker_url,
                             "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.db_url,
                             "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(parallelism)})

    def cli(self, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"airflow_local {' '.join(args)}: {done.stdout}{done.stderr}\n"
                               + self.log("scheduler")[-4000:])
        return done

    def log(self, component: str) -> str:
        path = self.home / "local" / f"{component}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.cli("start", "--api-port", str(free_port()))
        subprocess.run([sys.executable, "-m", "atlasflow_airflow.settings", "apply",
                        str(REPO / "airflow_settings.yaml")], env=self.env, check=True, capture_output=True)

    def stop(self) -> None:
        self.cli("stop", check=False)

    def trigger(self, *, wait: bool = True, timeout: float = 1800) -> tuple[str, int]:
        """Trigger atlas_ingest; returns (run id, 0 on success / 1 on failure; 0 when not waiting)."""
        done = self.cli("trigger", "atlas_ingest", *(["--wait", "--timeout", str(timeout)] if wait else []),
                        check=False, timeout=timeout + 120)
        if "triggered atlas_ingest run " not in done.stdout:
            raise RuntimeError(f"trigger failed: {done.stdout}{done.stderr}")
        return done.stdout.split("triggered atlas_ingest run ", 1)[1].split()[0], done.returncode

    @property
    def api_url(self) -> str:
        state = json.loads((self.home / "local" / "state.json").read_text())
        return f"http://127.0.0.1:{state['api_port']}"

    def token(self) -> str:
        """A JWT for the generated ``admin`` user, as the UI's login form gets one."""
        import urllib.request

        password = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        request = urllib.request.Request(self.api_url + "/auth/token", method="POST",
                                         data=json.dumps({"username": "admin", "password": password}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.load(reply)["access_token"]

    def pids(self) -> dict[str, int]:
        return json.loads((self.home / "local" / "state.json").read_text())["pids"]

    def query(self, sql: str, *params: Any) -> list[tuple]:
        """Run ``sql`` (``?`` placeholders) on the metadata DB."""
        if self.db_url.startswith("sqlite"):
            with sqlite3.connect(self.db, timeout=30) as conn:
                return conn.execute(sql, params).fetchall()
        from sqlalchemy import create_engine, text

        for i in range(len(params)):  # qmark -> named, for SQLAlchemy's text()
            sql = sql.replace("?", f":p{i}", 1)
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(sql), {f"p{i}": v for i, v in enumerate(params)}).all()]
        finally:
            engine.dispose()

    def task_times(self, run_id: str) -> dict[tuple[str, int], tuple[float, float, int]]:
        """``(task_id, map_index) -> (start, end, try_number)`` in epoch seconds (end = now while running)."""
        rows = self.query("SELECT task_id, map_index, start_date, end_date, try_number FROM task_instance "
                          "WHERE dag_id = 'atlas_ingest' AND run_id = ? AND start_date IS NOT NULL", run_id)
        return {(t, m): (_epoch(s), _epoch(e) if e else time.time(), n) for t, m, s, e, n in rows}

    def run_times(self, run_id: str) -> tuple[float, float]:
        ((start, end),) = self.query("SELECT start_date, end_date FROM dag_run WHERE run_id = ?", run_id)
        return _epoch(start), _epoch(end)

    def admission_waits(self, run_id: str) -> dict[str, int]:
        """How many times each batch's storage sensor was rescheduled (waited for room)."""
        return dict(self.query(
            "SELECT ti.task_id, COUNT(tr.id) FROM task_instance ti LEFT JOIN task_reschedule tr ON tr.ti_id = ti.id "
            "WHERE ti.task_id LIKE '%.admit' AND ti.run_id = ? GROUP BY ti.task_id", run_id))


def listening_addresses(sessions: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in the given process groups (Linux /proc only).

    The components start in their own sessions, so their recorded PIDs are the process-group ids of
    everything they fork (log servers, workers, gunicorn/uvicorn children).
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        pgid = int(stat.rsplit(")", 1)[1].split()[2])
        if pgid in sessions:
            members.append(entry)
    inodes: set[str] = set()
    for entry in members:
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(words)), int(port, 16)))
    return found
