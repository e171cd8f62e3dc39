from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from atlasflow.core.config import StorageConfig
from atlasflow.core.layout import StorageLayout
from atlasflow.intake.manifest import Dataset
from atlasflow.storage import BudgetExceededError, Cleaner, Ledger, batch_footprint
from atlasflow.storage import ledger as ledger_module
from atlasflow.storage.ledger import LedgerURLError

KB = 1000


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def url(request) -> str | None:
    """Every ledger test runs on both backends: the SQLite file (None) and a fresh PostgreSQL database on a real
    local server (slow: the session starts one; `make test-fast` keeps to SQLite)."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_database")


def storage(base: Path, budget_kb: float = 100, **kw) -> StorageConfig:
    gb = budget_kb * KB / 1e9
    # ledger_url_env=None: an ATLASFLOW_LEDGER_URL in the caller's environment must not redirect the tests
    return StorageConfig(base_dir=str(base), max_storage_gb=gb, data_gb=gb * 0.4, models_gb=gb * 0.4,
                         cache_gb=gb * 0.1, outputs_gb=gb * 0.1, min_free_gb=kw.pop("min_free_gb", 0.0),
                         ledger_url_env=None, **kw)


def write(path: Path, nbytes: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(nbytes))
    return path


def test_admits_until_the_budget_is_reserved(url, tmp_path):
    ledger = Ledger(storage(tmp_path, ledger_url=url))
    assert ledger.try_admit("batch_0000", 60 * KB).admitted
    waiting = ledger.try_admit("batch_0001", 50 * KB)
    assert not waiting.admitted and "still reserved by 1 batch" in waiting.reason
    assert ledger.try_admit("batch_0001", 40 * KB).admitted
    assert [r.batch_id for r in ledger.reservations()] == ["batch_0000", "batch_0001"]


def test_readmitting_is_idempotent(url, tmp_path):
    ledger = Ledger(storage(tmp_path, ledger_url=url))
    assert ledger.try_admit("batch_0000", 90 * KB, owner="a").admitted
    again = ledger.try_admit("batch_0000", 90 * KB, owner="retry")
    assert again.admitted and "already admitted" in again.reason
    assert ledger.reservation("batch_0000").owner == "retry" and len(ledger.reservations()) == 1


def test_a_batch_bigger_than_the_budget_fails_at_once(url, tmp_path):
    with pytest.raises(BudgetExceededError, match="can never be admitted"):
        Ledger(storage(tmp_path, ledger_url=url)).try_admit("batch_0000", 101 * KB)


def test_admission_in_batch_order(url, tmp_path):
    ledger = Ledger(storage(tmp_path, ledger_url=url))
    early = ledger.try_admit("batch_0001", 1 * KB, after="batch_0000")
    assert not early.admitted and "waiting for batch_0000" in early.reason
    assert ledger.try_admit("batch_0000", 1 * KB).admitted
    assert ledger.try_admit("batch_0001", 1 * KB, after="batch_0000").admitted


def test_files_written_by_a_batch_count_once(url, tmp_path):
    ledger = Ledger(storage(tmp_path, ledger_url=url))
    assert ledger.try_admit("batch_0000", 60 * KB, paths=["data/raw/ds1", "data/processed/batch_0000"]).admitted
    write(tmp_path / "data/raw/ds1/x.h5ad", 30 * KB)
    r = ledger.reservation("batch_0000")
    assert 29 * KB < 60 * KB - ledger.outstanding(r) <= 35 * KB  # block rounding
    # 30 kB on disk + 30 kB outstanding: 40 kB left, not 10 kB
    assert ledger.try_admit("batch_0001", 38 * KB).admitted


def test_a_save_building_beside_its_folder_counts_once(url, tmp_path):
    """A checkpoint save or an integration writes ``.<folder>.<owner>.tmp`` beside its reserved folder,
    then renames it into place: those bytes are the reservation's, not usage on top of it."""
    ledger = Ledger(storage(tmp_path, ledger_url=url))
    paths = ["models/checkpoints/batch_0000", "models/integration/batch_0000"]
    assert ledger.try_admit("batch_0000", 60 * KB, paths=paths).admitted
    write(tmp_path / "models/checkpoints/.batch_0000.123@host.tmp/model.pt", 20 * KB)
    write(tmp_path / "models/integration/batch_0000.123@host.partial/model.pt", 10 * KB)
    write(tmp_path / "models/checkpoints/.batch_00001.123@host.tmp/model.pt", 5 * KB)  # another folder's
    r = ledger.reservation("batch_0000")
    assert 29 * KB < 60 * KB - ledger.outstanding(r) <= 35 * KB
    # ~41 kB on disk (4 kB blocks) + ~27 kB outstanding: 30 kB fit, not only ~0 kB
    assert ledger.try_admit("batch_0001", 30 * KB).admitted


def test_files_outside_reservations_count_as_usage(url, tmp_path):
    write(tmp_path / "outputs/report.html", 50 * KB)
    ledger = Ledger(storage(tmp_path, ledger_url=url))
    assert not ledger.try_admit("batch_0000", 55 * KB).admitted
    assert ledger.try_admit("batch_0000", 45 * KB).admitted


def test_volume_free_space_floor(url, tmp_path):
    ledger = Ledger(storage(tmp_path, ledger_url=url, min_free_gb=10**7))  # more than any disk has free
    waiting = ledger.try_admit("batch_0000", 1 * KB)
    assert not waiting.admitted and "must stay free" in waiting.reason


def test_only_the_batch_next_to_train_holds_the_model_lane(url, tmp_path):
    """Model artefacts (10 kB here) are reserved by one batch at a time; the others keep room for the
    hand-overs free: twice while no checkpoint is on disk with keep_checkpoints=2, once from then on."""
    ledger = Ledger(storage(tmp_path, ledger_url=url, keep_checkpoints=2))
    head = ledger.try_admit("batch_0000", 10 * KB, lane_bytes=10 * KB)
    assert head.admitted and head.bytes == 20 * KB and "with the model lane" in head.reason
    # 20 reserved + 20 data + 2 × 10 kept free = 60 of 100: every batch used to reserve its own 10
    second = ledger.try_admit("batch_0001", 20 * KB, lane_bytes=10 * KB, after="batch_0000")
    assert second.admitted and second.bytes == 20 * KB and "come with the model lane" in second.reason
    third = ledger.try_admit("batch_0002", 41 * KB, lane_bytes=10 * KB, after="batch_0001")
    assert not third.admitted and "kept free for the model lane" in third.reason  # 40 + 41 + 20 > 100
    write(tmp_path / "models/checkpoints/batch_0000/model.pt", 1 * KB)
    write(tmp_path / "models/checkpoints/batch_0009/model.pt", 1 * KB)  # two kept: one lane kept free
    # ~8 kB on disk (4 kB blocks) + 40 + 41 + 10 ≤ 100
    assert ledger.try_admit("batch_0002", 41 * KB, lane_bytes=10 * KB, after="batch_0001").admitted
    held = {r.batch_id: (r.lane_held, r.bytes) for r in ledger.reservations()}
    assert held == {"batch_0000": (True, 20 * KB), "batch_0001": (False, 20 * KB), "batch_0002": (False, 41 * KB)}


def test_releasing_the_holder_hands_the_lane_to_the_earliest_active_batch(url, tmp_path):
    ledger = Ledger(storage(tmp_path, ledger_url=url, keep_checkpoints=1))
    for i, data in enumerate((10, 20, 5)):
        assert ledger.try_admit(f"batch_{i:04d}", data * KB, lane_bytes=(10 + i) * KB,
                                after=f"batch_{i - 1:04d}" if i else None).admitted
    assert ledger.release("batch_0001")  # not the holder: nothing moves
    assert [r.batch_id for r in ledger.reservations() if r.lane_held] == ["batch_0000"]
    assert ledger.release("batch_0000")
    after = {r.batch_id: (r.lane_held, r.bytes) for r in ledger.reservations()}
    assert after == {"batch_0002": (True, (5 + 12) * KB)}  # its data + its own lane
    assert not ledger.release("batch_0000")  # a cleared cleanup's second release hands nothing on
    assert ledger.reservation("batch_0002").bytes == 17 * KB
    assert ledger.release("batch_0002")
    nxt = ledger.try_admit("batch_0003", 5 * KB, lane_bytes=13 * KB, after="batch_0002")
    assert nxt.admitted and nxt.bytes == 18 * KB  # nobody holds the lane: it takes it at admission


def test_a_reclaimed_holder_hands_the_lane_on(url, tmp_path, monkeypatch):
    ledger = Ledger(storage(tmp_path, ledger_url=url, keep_checkpoints=1, reservation_lease_hours=1))
    assert ledger.try_admit("batch_0000", 10 * KB, lane_bytes=10 * KB).admitted
    real = time.time
    monkeypatch.setattr("atlasflow.storage.ledger.time.time", lambda: real() + 0.5 * 3600)
    assert ledger.try_admit("batch_0001", 10 * KB, lane_bytes=10 * KB, after="batch_0000").admitted
    monkeypatch.setattr("atlasflow.storage.ledger.time.time", lambda: real() + 1.2 * 3600)  # only 0000's lease is over
    assert ledger.try_admit("batch_0002", 10 * KB, after="batch_0001").admitted
    assert ledger.reservation("batch_0000").status == "reclaimed"
    assert ledger.reservation("batch_0001").lane_held and ledger.reservation("batch_0001").bytes == 20 * KB


def test_a_batch_whose_data_and_lane_exceed_the_budget_fails_at_once(url, tmp_path):
    with pytest.raises(BudgetExceededError, match="needs 0.00 GB"):
        Ledger(storage(tmp_path, ledger_url=url)).try_admit("batch_0000", 60 * KB, lane_bytes=41 * KB)


def test_a_ledger_from_before_the_model_lane_gets_its_columns(tmp_path):
    import sqlite3

    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    db.execute("CREATE TABLE reservations (batch_id TEXT PRIMARY KEY, bytes BIGINT NOT NULL, paths TEXT NOT NULL, "
               "owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER, created DOUBLE PRECISION NOT NULL, "
               "lease_expires DOUBLE PRECISION NOT NULL, status TEXT NOT NULL)")
    db.execute("INSERT INTO reservations VALUES ('batch_0000', 30000, '[]', 'old', 'h', NULL, 1, 9e12, 'active')")
    db.commit()
    db.close()
    ledger = Ledger(storage(tmp_path))
    old = ledger.reservation("batch_0000")
    assert old.bytes == 30 * KB and old.lane_bytes == 0 and not old.lane_held
    assert ledger.try_admit("batch_0001", 10 * KB, lane_bytes=10 * KB, after="batch_0000").bytes == 20 * KB


def _race(args: tuple[str, str, str | None]) -> bool:
    base, batch, url = args
    return Ledger(storage(Path(base), budget_kb=35, ledger_url=url)).try_admit(batch, 10 * KB).admitted


def test_concurrent_processes_never_admit_past_the_budget(url, tmp_path):
    Ledger(storage(tmp_path, ledger_url=url, budget_kb=35))
    with ProcessPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(_race, [(str(tmp_path), f"batch_{i:04d}", url) for i in range(8)]))
    assert sum(results) == 3
    assert len(Ledger(storage(tmp_path, ledger_url=url, budget_kb=35)).reservations()) == 3


def test_usage_is_measured_before_the_write_lock(url, tmp_path, monkeypatch):
    """Walking the tree (large, or on NFS) must never hold the lock every other admission waits for."""
    config = storage(tmp_path, ledger_url=url)
    ledger = Ledger(config)
    assert ledger.try_admit("batch_0000", 20 * KB, paths=["data/raw/ds0"]).admitted
    write(tmp_path / "data/raw/ds0/x", 5 * KB)
    probe = Ledger(config, lock_timeout_s=0.2)
    walks: list[bool] = []  # per walk: was the lock free?

    def lock_is_free() -> bool:
        try:
            with probe._transaction():
                return True
        except Exception:  # SQLite "database is locked", PostgreSQL lock_timeout
            return False

    real_tree, real_usage = ledger_module.tree_bytes, StorageLayout.area_usage
    monkeypatch.setattr(ledger_module, "tree_bytes", lambda path: walks.append(lock_is_free()) or real_tree(path))
    monkeypatch.setattr(StorageLayout, "area_usage", lambda self: walks.append(lock_is_free()) or real_usage(self))
    assert ledger.try_admit("batch_0001", 10 * KB).admitted
    assert not ledger.try_admit("batch_0002", 90 * KB).admitted
    assert ledger.release("batch_0001")
    ledger.sample("probe")
    assert len(walks) >= 6 and all(walks), walks


def test_a_batch_admitted_during_the_walk_counts_whole(url, tmp_path, monkeypatch):
    """The walk runs unlocked, so another batch may be admitted meanwhile: the lock-held re-check counts it."""
    config = storage(tmp_path, ledger_url=url)
    ledger, other = Ledger(config), Ledger(config)
    real_usage = StorageLayout.area_usage

    def walk_while_another_admits(self: StorageLayout) -> dict[str, int]:
        monkeypatch.setattr(StorageLayout, "area_usage", real_usage)
        assert other.try_admit("batch_0000", 60 * KB).admitted
        return real_usage(self)

    monkeypatch.setattr(StorageLayout, "area_usage", walk_while_another_admits)
    waiting = ledger.try_admit("batch_0001", 50 * KB)
    assert not waiting.admitted and waiting.outstanding == 60 * KB, waiting
    assert [r.batch_id for r in ledger.reservations()] == ["batch_0000"]


def test_a_released_batch_is_admitted_again(url, tmp_path):
    ledger = Ledger(storage(tmp_path, ledger_url=url))
    assert ledger.try_admit("batch_0000", 60 * KB, owner="first").admitted
    assert ledger.release("batch_0000") and not ledger.release("batch_0000")
    assert ledger.try_admit("batch_0000", 70 * KB, owner="rerun").admitted
    again = ledger.reservation("batch_0000")
    assert (again.status, again.bytes, again.owner) == ("active", 70 * KB, "rerun")
    assert [s["event"] for s in ledger.samples()] == ["batch_0000 admitted", "batch_0000 released",
                                                       "batch_0000 admitted"]


def test_the_ledger_url_comes_from_config_or_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLASFLOW_LEDGER_URL", "mysql://u:secret@db/x")
    with pytest.raises(LedgerURLError, match="only PostgreSQL") as err:
        Ledger(StorageConfig(base_dir=str(tmp_path)))
    assert "secret" not in str(err.value)  # the password is never shown
    with pytest.raises(LedgerURLError, match="not a database URL"):
        Ledger(StorageConfig(base_dir=str(tmp_path), ledger_url="no url at all"))
    monkeypatch.setenv("ATLASFLOW_LEDGER_URL", " ")
    assert Ledger(StorageConfig(base_dir=str(tmp_path))).location == str(tmp_path / "state" / "ledger.sqlite")


def test_reservation_of_a_killed_process_is_reclaimed(url, tmp_path):
    code = (
        "import sys, time; from pathlib import Path\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_storage import storage\n"
        "from atlasflow.storage import Ledger\n"
        "config = storage(Path(sys.argv[1]), ledger_url=sys.argv[3] or None)\n"
        "assert Ledger(config).try_admit('batch_0000', 90_000, bind_pid=True).admitted\n"
        "print('reserved', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(Path(__file__).parent), url or ""],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "reserved"
        ledger = Ledger(storage(tmp_path, ledger_url=url))
        assert not ledger.try_admit("batch_0001", 50 * KB).admitted  # the live owner's bytes count
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ledger.try_admit("batch_0001", 50 * KB).admitted
    assert ledger.reservation("batch_0000").status == "reclaimed"


def test_expired_lease_is_reclaimed(url, tmp_path, monkeypatch):
    ledger = Ledger(storage(tmp_path, ledger_url=url, reservation_lease_hours=1))
    assert ledger.try_admit("batch_0000", 90 * KB).admitted
    assert ledger.heartbeat("batch_0000") and not ledger.heartbeat("batch_0099")
    real = time.time
    monkeypatch.setattr("atlasflow.storage.ledger.time.time", lambda: real() + 2 * 3600)
    assert ledger.try_admit("batch_0001", 90 * KB).admitted
    assert ledger.reservation("batch_0000").status == "reclaimed"


def test_footprint_learns_expansion_per_format(url, tmp_path):
    ledger = Ledger(storage(tmp_path, ledger_url=url, checkpoint_gb=0, default_expansion=2.0, unknown_size_gb=7e-6))
    ds = [Dataset("a", "https://h/a.h5ad", "direct", 2, format="h5ad", expected_bytes=1000),
          Dataset("b", "https://h/b.loom", "direct", 3, format="loom"),
          Dataset("c", "GSE1", "geo", 4)]
    first = batch_footprint(ds, ledger, content_lengths={"b": 500})
    assert [d["size_source"] for d in first["datasets"]] == ["manifest", "content-length", "default"]
    # seeds for known formats (h5ad 0.7, loom 0.5), the configured default (2.0) for an unknown one
    assert first["bytes"] == 1700 + 750 + 21000
    ledger.record_expansion("a0", "h5ad", 1000, 1200)
    ledger.record_expansion("a1", "h5ad", 3000, 2800)
    assert ledger.expansion_factor("h5ad") == pytest.approx(1.0)  # byte-weighted (1200+2800)/(1000+3000)
    assert batch_footprint(ds[:1], ledger)["bytes"] == 2000  # measured 1.0 replaces the 0.7 seed
    assert ledger.expansion_table()["h5ad"]["datasets"] == 2


def test_cleanup_policy_records_every_deletion(url, tmp_path):
    ledger = Ledger(storage(tmp_path, ledger_url=url, keep_checkpoints=2))
    cleaner = Cleaner(ledger)
    assert ledger.try_admit("batch_0003", 10 * KB, paths=["data/raw/ds1"]).admitted
    write(tmp_path / "data/raw/ds1/f.h5", 3 * KB)
    write(tmp_path / "data/processed/batch_0003/ds1.h5ad", 2 * KB)
    for i in range(4):
        write(tmp_path / f"models/checkpoints/batch_{i:04d}/model.pt", 1 * KB)
        write(tmp_path / f"models/integration/batch_{i:04d}/model.pt", 1 * KB)
    write(tmp_path / "cache/tmp.bin", 1 * KB)
    result = cleaner.finish_batch("batch_0003", ["ds1"])
    assert result["released"] and result["freed_bytes"]["raw"] >= 3 * KB
    assert not (tmp_path / "data/raw/ds1").exists() and not (tmp_path / "data/processed/batch_0003").exists()
    assert sorted(p.name for p in (tmp_path / "models/checkpoints").iterdir()) == ["batch_0002", "batch_0003"]
    assert sorted(p.name for p in (tmp_path / "models/integration").iterdir()) == ["batch_0002", "batch_0003"]
    assert list((tmp_path / "cache").iterdir()) == []
    deleted = ledger.deletions()
    assert {d["path"] for d in deleted} >= {"data/raw/ds1", "data/processed/batch_0003", "models/checkpoints/batch_0000"}
    raw = next(d for d in deleted if d["path"] == "data/raw/ds1")
    assert raw["dataset_id"] == "ds1" and raw["batch_id"] == "batch_0003" and raw["bytes"] >= 3 * KB
    assert ledger.reservations() == []


def test_cleanup_never_leaves_the_base_dir(tmp_path):
    outside = write(tmp_path / "precious" / "keep.txt", 10)
    base = tmp_path / "base"
    cleaner = Cleaner(Ledger(storage(base)))
    (base / "data/raw").mkdir(parents=True, exist_ok=True)
    (base / "data/raw/ds1").symlink_to(outside.parent, target_is_directory=True)
    assert cleaner.delete_raw("ds1") == 0
    assert outside.exists() and not (base / "data/raw/ds1").exists()
    # a link inside a dataset folder is unlinked, its target left alone
    write(base / "data/raw/ds2/real.bin", 10)
    (base / "data/raw/ds2/link").symlink_to(outside)
    cleaner.delete_raw("ds2")
    assert outside.exists()
    with pytest.raises(ValueError, match="outside"):
        cleaner.layout.inside(base / ".." / "precious")


def test_tombstone_survives_cleanup(tmp_path):
    cleaner = Cleaner(Ledger(storage(tmp_path)))
    write(tmp_path / "data/raw/ds1/f.h5", 100)
    cleaner.write_tombstone("ds1", {"sha256": "ab" * 32, "cells": 700, "genes": 765})
    cleaner.delete_raw("ds1")
    assert cleaner.tombstone("ds1")["cells"] == 700
    assert cleaner.reclaimable()["raw_of_processed_datasets"] == 0


def test_monitor_cli_text_json_and_watch(tmp_path):
    Ledger(storage(tmp_path)).try_admit("batch_0000", 5 * KB, owner="atlas_ingest/run/admit", lane_bytes=3 * KB)
    Ledger(storage(tmp_path)).try_admit("batch_0001", 5 * KB, lane_bytes=3 * KB, after="batch_0000")
    write(tmp_path / "cache/x", 2 * KB)
    exe = [sys.executable, "-m", "atlasflow.cli", "storage", "--base-dir", str(tmp_path)]
    text = subprocess.run(exe, capture_output=True, text=True, check=True).stdout
    assert "batch_0000" in text and "atlas_ingest/run/admit" in text and "cache" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("batch_")}
    assert rows["batch_0000"].endswith("model lane") and "+ 0.000 GB with the model lane" in rows["batch_0001"]
    lines = subprocess.run([*exe, "--json", "--watch", "0.1", "--count", "2"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert len(lines) == 2
    report = json.loads(lines[0])
    assert report["reservations"][0]["batch_id"] == "batch_0000" and report["reservations"][0]["model_lane"] == "held"
    assert report["reservations"][1]["model_lane"] == "waiting" and report["reservations"][1]["lane_bytes"] == 3 * KB
    assert report["areas"]["cache"]["used"] >= 2 * KB and report["reclaimable_bytes"]["cache"] >= 2 * KB


def test_a_kill_while_cleanup_deletes_a_checkpoint_leaves_no_half_of_it(tmp_path):
    """Issue 16 point 11: a deletion is a rename aside, then rmtree; a kill mid-rmtree (a real SIGKILL in
    a child) leaves only an owner-named temporary that the next task start prunes."""
    from atlasflow.core.fsutil import prune_stale_temps

    for name in ("model.pt", "state.pt", "progress.json"):
        write(tmp_path / "models/checkpoints/batch_0000" / name, 100)
    child = (
        "import os, shutil, signal, sys\nfrom pathlib import Path\n"
        "from atlasflow.core.config import StorageConfig\nfrom atlasflow.storage import Cleaner, Ledger\n"
        "def killed(path, *a, **k):\n"
        "    if Path(path).is_dir():\n"
        "        next(Path(path).iterdir()).unlink()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "shutil.rmtree = killed\n"
        "base = Path(sys.argv[1])\n"
        "Cleaner(Ledger(StorageConfig(base_dir=str(base), ledger_url_env=None))).remove(\n"
        "    base / 'models/checkpoints/batch_0000', 'test')\n")
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = list((tmp_path / "models/checkpoints").iterdir())
    assert [p.name for p in left if not p.name.endswith(".tmp")] == []  # never batch_0000 with files missing
    prune_stale_temps(tmp_path / "models")
    assert list((tmp_path / "models/checkpoints").iterdir()) == []
