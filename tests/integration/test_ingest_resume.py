"""atlas_ingest under the real scheduler (SQLite, LocalExecutor): pools, budget, pipelining, resume.

Two scenarios, each a real Airflow started by scripts/airflow_local.py on 127.0.0.1:

- ``test_pipelined_pooled_budgeted_run``: four batches of six datasets behind a throttled stand-in
  server. The server's transfer log gives how many downloads ran at once (the `downloads` pool has 5
  slots, LocalExecutor parallelism is 8, so only the pool can hold them back); a sampler records the
  bytes under the base dir; the metadata DB gives when each task ran.
- ``test_kill_clear_append_backfill``: the scheduler is SIGKILLed mid-run and restarted; a batch whose
  checkpoint is lost is rebuilt by clearing its group (REST API) from the previous checkpoint; rows
  appended to the manifest train only the new batch; ``airflow backfill create`` runs do no work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from atlasflow.testing.demo import build_demo
from atlasflow.testing.geo_server import GeoServer, max_concurrent

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "airflow_local.py"
pytestmark = pytest.mark.timeout(1500)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalAirflow:
    """scripts/airflow_local.py driven from a test, with the metadata DB at hand."""

    def __init__(self, home: Path, config: Path, parallelism: int) -> None:
        self.home = home
        self.env = {**os.environ, "AIRFLOW_HOME": str(home), "ATLASFLOW_CONFIG": str(config),
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
                    "PYTHONPATH": str(REPO / "plugins"), "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    # the manifest (not the DAG file) changes in these tests: re-parse often
                    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5"}

    def cli(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"airflow_local {' '.join(args)}: {done.stdout}{done.stderr}\n"
                                 + self.log("scheduler")[-4000:])
        return done

    def log(self, component: str) -> str:
        path = self.home / "local" / f"{component}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        self.cli("start", "--api-port", str(free_port()))
        subprocess.run([sys.executable, "-m", "atlasflow_airflow.settings", "apply",
                        str(REPO / "airflow_settings.yaml")], env=self.env, check=True, capture_output=True)

    def trigger(self, *, wait: bool = True) -> tuple[str, int]:
        done = self.cli("trigger", "atlas_ingest", *(["--wait", "--timeout", "900"] if wait else []), check=False)
        run_id = done.stdout.split("triggered atlas_ingest run ", 1)[1].split()[0]
        return run_id, done.returncode

    def pids(self) -> dict[str, int]:
        return json.loads((self.home / "local" / "state.json").read_text())["pids"]

    def query(self, sql: str, **params) -> list[tuple]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(sql), params).all()]
        finally:
            engine.dispose()

    def task_times(self, run_id: str) -> dict[tuple[str, int], tuple[float, float, int]]:
        rows = self.query("SELECT task_id, map_index, start_date, end_date, try_number FROM task_instance "
                          "WHERE dag_id = 'atlas_ingest' AND run_id = :r AND start_date IS NOT NULL", r=run_id)

        def ts(v):
            return (v if isinstance(v, datetime) else datetime.fromisoformat(str(v))).timestamp()

        return {(t, m): (ts(s), ts(e) if e else time.time(), n) for t, m, s, e, n in rows}


@pytest.fixture
def airflow_factory(tmp_path):
    started: list[LocalAirflow] = []

    def make(config: Path, parallelism: int = 4) -> LocalAirflow:
        home = tmp_path / f"airflow{len(started)}"
        home.mkdir()
        af = LocalAirflow(home, config, parallelism)
        started.append(af)
        af.start()
        return af

    yield make
    for af in started:
        pids = af.pids() if (af.home / "local" / "state.json").exists() else {}
        af.cli("stop", check=False)
        assert not any(Path(f"/proc/{p}").exists() and "State:\tZ" not in Path(f"/proc/{p}/status").read_text()
                       for p in pids.values())


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_pipelined_pooled_budgeted_run(tmp_path, airflow_factory):
    from atlasflow.config import load_config
    from atlasflow.storage import tree_bytes

    root = tmp_path / "demo"
    (root / "www").mkdir(parents=True)
    # ~2 s per file at 20 kB/s: six downloads of a batch are queued at once
    with GeoServer(root / "www", rate=20_000) as server:
        build_demo(root, server.url, n_datasets=23, cells=30, batch_size=6, budget_mb=21, missing_at=20,
                   integration_epochs=1)
        config = load_config(root / "atlasflow.yaml")
        base = Path(config.storage.base_dir)
        af = airflow_factory(root / "atlasflow.yaml", parallelism=8)
        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], sum(tree_bytes(base / a) for a in ("data", "models", "cache", "outputs")))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            run_id, rc = af.trigger()
        finally:
            stop.set()
            sampler.join()
        assert rc == 0, af.log("scheduler")[-4000:]
        transfers = server.transfers()

    budget = config.storage.max_storage_bytes
    times = af.task_times(run_id)
    downloads = [(t, m) for t, m in times if t.endswith(".download")]
    concurrent = max_concurrent(transfers)
    waits = dict(af.query("SELECT ti.task_id, COUNT(tr.id) FROM task_instance ti LEFT JOIN task_reschedule tr "
                          "ON tr.ti_id = ti.id WHERE ti.task_id LIKE '%.admit' AND ti.run_id = :r GROUP BY ti.task_id",
                          r=run_id))
    pipelined = [i for i in range(3)
                 if any(overlaps(times[d][:2], times[(f"batch_{i:04d}.train", -1)][:2])
                        for d in downloads if d[0] == f"batch_{i + 1:04d}.download")]
    print(f"\npeak {peak[0]} B of {budget} B; {concurrent} downloads at once; waits {waits}; "
          f"batch i+1 downloading while batch i trains for i in {pipelined}")

    assert len(downloads) == 24
    assert 1 < concurrent <= 5  # the pool's 5 slots hold back parallelism 8 and 6-12 ready downloads
    assert 0 < peak[0] <= budget
    assert sum(1 for w in waits.values() if w > 0) >= 2  # the budget made at least two batches wait
    assert pipelined, "no batch downloaded while the one before it trained"
    gone = json.loads((base / "state" / "quarantine" / "pbmc_gone.json").read_text())
    assert gone["stage"] == "download" and "404" in gone["reason"] and gone["batch_id"] == "batch_0003"
    final = json.loads((base / "models" / "checkpoints" / "batch_0003" / "result.json").read_text())
    assert final["parent_checkpoint"].endswith("batch_0002") and len(final["datasets_seen"]) == 23
    # every dataset file went over the wire exactly once
    served = Counter(t["path"] for t in transfers if t["bytes"] > 0)
    assert len(served) == 23 and set(served.values()) == {1}
