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
import time
from collections import Counter
from pathlib import Path

import pytest

from atlasflow_testing.demo import build_demo
from atlasflow_testing.disk import PeakDiskSampler
from atlasflow_testing.geo_server import GeoServer, max_concurrent
from atlasflow_testing.local_airflow import LocalAirflow

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture
def airflow_factory(tmp_path):
    started: list[LocalAirflow] = []

    def make(config: Path, parallelism: int = 4) -> LocalAirflow:
        home = tmp_path / f"airflow{len(started)}"
        home.mkdir()
        af = LocalAirflow(home, config, parallelism=parallelism)
        started.append(af)
        af.start()
        return af

    yield make
    for af in started:
        pids = af.pids() if (af.home / "local" / "state.json").exists() else {}
        af.cli("stop", check=False)
        assert not [p for p in pids.values() if _alive(p)], af.log("scheduler")[-2000:]


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone, or went between the listing and the read
        return False


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_pipelined_pooled_budgeted_run(tmp_path, airflow_factory):
    from atlasflow.core.config import load_config

    root = tmp_path / "demo"
    (root / "www").mkdir(parents=True)
    # 5-30 s per file at 5 kB/s: downloads last long enough to overlap the previous batch's training
    with GeoServer(root / "www", rate=5_000) as server:
        build_demo(root, server.url, n_datasets=23, cells=30, batch_size=6, budget_mb=21, missing_at=20,
                   integration_epochs=1)
        with (root / "atlasflow.yaml").open("a") as f:
            f.write("retrain:\n  schedule: null  # only the model Asset triggers atlas_retrain\n")
        config = load_config(root / "atlasflow.yaml")
        base = Path(config.storage.base_dir)
        # A slow mirror for one of batch_0001's files: its last bytes arrive only once batch_0000's
        # training job exists, so batch_0001's downloads certainly overlap batch_0000's training if the
        # DAG lets them (with plan.pipelining off, batch_0001 would not be admitted before that training
        # had ended). Without this, whether they still run then depends on this machine's speed.
        (held,) = _files_of(root, "pbmc_7")
        server.faults[held] = {"hold_until": str(base / "state" / "jobs" / "batch_0000")}
        af = airflow_factory(root / "atlasflow.yaml", parallelism=8)
        af.cli("unpause", "atlas_retrain")
        with PeakDiskSampler([base / a for a in ("data", "models", "cache", "outputs")]) as disk:
            run_id, rc = af.trigger()
        assert rc == 0, af.log("scheduler")[-4000:]
        transfers = server.transfers()

    budget = config.storage.max_storage_bytes
    times = af.task_times(run_id)
    downloads = [(t, m) for t, m in times if t.endswith(".download")]
    concurrent = max_concurrent(transfers)
    running = max_concurrent([{"start": times[d][0], "end": times[d][1]} for d in downloads])
    waits = af.admission_waits(run_id)

    def train(i: int) -> tuple[float, float]:
        return times[(f"batch_{i:04d}.train", -1)][:2]

    def downloads_of(i: int) -> list[tuple[float, float]]:
        return [times[d][:2] for d in downloads if d[0] == f"batch_{i:04d}.download"]

    overlapped = [i for i in range(3) if any(overlaps(d, train(i)) for d in downloads_of(i + 1))]
    print(f"\npeak {disk.peak} B of {budget} B; {concurrent} transfers / {running} download tasks at once; "
          f"waits {waits}; batch i+1 downloading while batch i trains for i in {overlapped}")

    assert len(downloads) == 24
    assert 1 < concurrent <= 5 and running <= 5  # the pool's 5 slots hold back parallelism 8 and 6-12 downloads
    assert 0 < disk.peak <= budget
    # The 8 MB model allowance travels with the model lane: batch_0000 holds it, the others reserve their
    # ~1 MB of data and keep 8 MB free for the hand-over, so all four fit the 21 MB budget at once (each
    # batch used to reserve its own 8 MB, and batch_0002 waited for batch_0000's cleanup). What the budget
    # guarantees is checked where it is decided: at every admission the ledger recorded, what was on
    # disk plus what was reserved stayed within it, and the lane was held by one batch at a time.
    from atlasflow.storage import Ledger

    ledger = Ledger(config.storage)
    admissions = [s for s in ledger.samples() if (s["event"] or "").endswith(" admitted")]
    assert len(admissions) == 4, [s["event"] for s in ledger.samples()]
    for sample in admissions:
        used = sum(sample[a] or 0 for a in ("data", "models", "cache", "outputs"))
        assert used + sample["reserved"] <= budget, sample
    # every batch held the lane before it trained (taken at admission or handed on at a release)
    held = sorted(r.batch_id for r in ledger.reservations(active_only=False) if r.lane_held)
    assert held == [f"batch_{i:04d}" for i in range(4)], held
    assert 0 in overlapped, "batch_0001 did not download while batch_0000 trained"
    gone = json.loads((base / "state" / "quarantine" / "pbmc_gone.json").read_text())
    assert gone["stage"] == "download" and "404" in gone["reason"] and gone["batch_id"] == "batch_0003"
    final = json.loads((base / "models" / "checkpoints" / "batch_0003" / "result.json").read_text())
    assert final["parent_checkpoint"].endswith("batch_0002") and len(final["datasets_seen"]) == 23
    # every dataset file went over the wire exactly once
    served = Counter(t["path"] for t in transfers if t["bytes"] > 0)
    assert len(served) == 23 and set(served.values()) == {1}

    # publish updated the model Asset, which (and only which) scheduled atlas_retrain: the first
    # evaluated candidate becomes production
    retrain = _wait_for(lambda: af.query("SELECT run_type, state FROM dag_run WHERE dag_id = 'atlas_retrain' "
                                         "AND state IN ('success', 'failed')"), 600, "the retrain run", interval=3)
    assert retrain == [("asset_triggered", "success")], af.log("scheduler")[-4000:]
    decision = json.loads((base / "outputs" / "retrain" / "decision.json").read_text())
    print(f"retrain decision: {decision['action']}: {decision['reason']}")
    assert decision["action"] == "promoted"
    production = json.loads((base / "models" / "production.json").read_text())
    assert Path(production["checkpoint_dir"]).name == "batch_0003"
    # the retrain run refreshed the run report, which now says what was decided and why
    page = Path(json.loads((base / "reports" / "latest.json").read_text())["html"]).read_text()
    section = page[page.index("<section id=retrain>"):].split("</section>")[0]
    assert "<td>promoted</td>" in section and "no production checkpoint yet" in section
    assert 'id="ds-pbmc_gone"' in page and "404" in page  # the ingest run's quarantine is in the same report


def _served(server: GeoServer) -> Counter:
    """Bytes sent per path (Range resumes add up; a second full download doubles it)."""
    sent: Counter = Counter()
    for t in server.transfers():
        sent[t["path"]] += t["bytes"]
    return sent


def _job_logs(base: Path) -> Counter:
    """Training jobs launched per batch (one stdout file per job attempt)."""
    return Counter(p.parent.name for p in (base / "state" / "jobs").glob("*/*.out"))


def _wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_kill_clear_append_backfill(tmp_path, airflow_factory):
    import openpyxl

    from atlasflow.core.config import load_config

    root = tmp_path / "demo"
    (root / "www").mkdir(parents=True)
    with GeoServer(root / "www", rate=60_000) as server:
        build_demo(root, server.url, n_datasets=8, cells=80, batch_size=2, budget_mb=500, keep_checkpoints=4,
                   missing_row=False, integration_epochs=1)
        book = openpyxl.load_workbook(root / "manifest.xlsx")
        sheet = book["datasets"]
        later = [[c.value for c in row] for row in sheet.iter_rows(min_row=8, max_row=9)]  # pbmc_7, pbmc_8
        sheet.delete_rows(8, 2)
        book.save(root / "manifest.xlsx")
        config = load_config(root / "atlasflow.yaml")
        base = Path(config.storage.base_dir)
        sizes = {f"/files/{p.name}": p.stat().st_size for p in (root / "www" / "files").iterdir()}
        af = airflow_factory(root / "atlasflow.yaml")

        # 1. SIGKILL the scheduler while batch_0001 is under way, start it again: the run completes
        run_id, _ = af.trigger(wait=False)
        _wait_for(lambda: any(t.startswith("batch_0001.") for t, _ in af.task_times(run_id)), 300, "batch_0001 to start")
        old_scheduler = af.pids()["scheduler"]
        os.kill(old_scheduler, signal.SIGKILL)
        time.sleep(3)
        assert "restarted scheduler" in af.cli("start").stdout
        assert af.pids()["scheduler"] != old_scheduler
        assert af.cli("wait", "atlas_ingest", run_id, "--timeout", "900", check=False).returncode == 0, \
            af.log("scheduler")[-4000:]
        served = _served(server)
        first_files = {p for p in served if p.startswith("/files/")}
        assert {p: served[p] for p in first_files} == {p: sizes[p] for p in first_files}  # no byte twice
        assert _job_logs(base) == {"batch_0000": 1, "batch_0001": 1, "batch_0002": 1}  # no training twice
        trained = {b: json.loads((base / "state" / "trained" / f"{b}.json").read_text())
                   for b in ("batch_0000", "batch_0001", "batch_0002")}
        assert trained["batch_0002"]["parent_checkpoint"] == trained["batch_0001"]["checkpoint_dir"]

        # 2. batch_0001's checkpoint is lost: clearing its group rebuilds it from batch_0000's checkpoint
        import shutil

        shutil.rmtree(trained["batch_0001"]["checkpoint_dir"])
        (base / "state" / "trained" / "batch_0001.json").unlink()
        tries_before = {k: v[2] for k, v in af.task_times(run_id).items()}
        af.cli("clear", "atlas_ingest", run_id, "--group", "batch_0001", "--downstream", "--wait", "--timeout", "900")
        rebuilt = json.loads((base / "state" / "trained" / "batch_0001.json").read_text())
        assert rebuilt["parent_checkpoint"] == trained["batch_0000"]["checkpoint_dir"]
        assert Path(rebuilt["checkpoint_dir"], "model.pt").exists()
        tries_after = {k: v[2] for k, v in af.task_times(run_id).items()}
        assert tries_after[("batch_0000.train", -1)] == tries_before[("batch_0000.train", -1)]  # not cleared
        assert tries_after[("batch_0001.train", -1)] > tries_before[("batch_0001.train", -1)]
        assert tries_after[("batch_0002.train", -1)] > tries_before[("batch_0002.train", -1)]  # cleared, but ...
        assert json.loads((base / "state" / "trained" / "batch_0002.json").read_text()) == trained["batch_0002"]
        assert _job_logs(base) == {"batch_0000": 1, "batch_0001": 2, "batch_0002": 1}  # ... only 0001 trained
        again = _served(server)
        refetched = {p for p in first_files if again[p] > served[p]}
        assert refetched == _files_of(root, "pbmc_4")  # batch_0001 = GSE900001 (pbmc_3) + pbmc_4
        assert again[f"/geo/{_geo_file(root)}"] == 2 * sizes_geo(root)

        # 3. rows appended to the manifest: the next run trains only the new batch, from the newest checkpoint
        book = openpyxl.load_workbook(root / "manifest.xlsx")
        for row in later:
            book["datasets"].append(row)
        book.save(root / "manifest.xlsx")
        _wait_for(lambda: "batch_0003.train" in af.cli("tasks", "atlas_ingest").stdout, 120, "the re-parsed DAG")
        before = _served(server)
        second_run, rc = af.trigger()
        assert rc == 0, af.log("scheduler")[-4000:]
        newest = json.loads((base / "state" / "trained" / "batch_0003.json").read_text())
        assert newest["parent_checkpoint"] == trained["batch_0002"]["checkpoint_dir"]
        assert _job_logs(base) == {"batch_0000": 1, "batch_0001": 2, "batch_0002": 1, "batch_0003": 1}
        fetched = {p for p, n in _served(server).items() if n > before[p]}
        assert fetched == _files_of(root, "pbmc_7", "pbmc_8")

        # 4. with a schedule, `airflow backfill create` works and its runs do no expensive work
        cfg = root / "atlasflow.yaml"
        cfg.write_text(cfg.read_text().replace("schedule: null", "schedule: '@daily'"))
        # Airflow stores the preset expanded ("0 0 * * *").
        _wait_for(lambda: af.query("SELECT timetable_summary FROM dag WHERE dag_id = 'atlas_ingest'")[0][0]
                  in ("@daily", "0 0 * * *"), 120, "the daily schedule to be parsed")
        before = _served(server)
        # On SQLite, Airflow creates each backfill run inside a SAVEPOINT that reads before it writes; if
        # another process holds the write lock at that instant SQLite refuses at once (upgrading a read
        # transaction cannot wait: its snapshot may be stale), whatever the busy timeout. Airflow then
        # removes the half-made backfill so it can be re-run, which is what the README tells users to do.
        for attempt in range(6):
            created = subprocess.run([sys.executable, "-m", "airflow", "backfill", "create", "--dag-id",
                                      "atlas_ingest", "--from-date", "2026-01-01", "--to-date", "2026-01-02"],
                                     env=af.env, capture_output=True, text=True, timeout=300)
            if created.returncode == 0 or "database is locked" not in created.stderr:
                break
            print(f"backfill create attempt {attempt + 1}: database is locked; again")
            time.sleep(2)
        assert created.returncode == 0, created.stdout + created.stderr
        assert af.query("SELECT COUNT(*) FROM backfill WHERE dag_id = 'atlas_ingest'") == [(1,)]  # no orphan left

        def backfill_done():
            states = [s for (s,) in af.query("SELECT state FROM dag_run WHERE dag_id = 'atlas_ingest' "
                                             "AND run_type = 'backfill'")]
            return states if states and all(s in ("success", "failed") for s in states) else None

        states = _wait_for(backfill_done, 600, "the backfill runs", interval=3)
        assert set(states) == {"success"}, af.log("scheduler")[-4000:]
        assert _served(server) == before
        assert _job_logs(base) == {"batch_0000": 1, "batch_0001": 2, "batch_0002": 1, "batch_0003": 1}


def _files_of(root: Path, *dataset_ids: str) -> set[str]:
    """Server paths of the direct-download files written for these datasets (``<id>.h5ad``, ``<id>_counts.csv``…)."""
    return {f"/files/{n}" for n in os.listdir(root / "www" / "files")
            if any(n.startswith((f"{d}.", f"{d}_")) for d in dataset_ids)}


def _geo_file(root: Path) -> str:
    (path,) = [p for p in (root / "www" / "geo").rglob("*") if p.is_file()]
    return str(path.relative_to(root / "www" / "geo"))


def sizes_geo(root: Path) -> int:
    return (root / "www" / "geo" / _geo_file(root)).stat().st_size
