"""The ingest steps called directly, in DAG order, on real cells from the local stand-in server.

These are what the DAG's tasks call; here they run without Airflow so the resume rules (what a
cleared or re-triggered task does) are checked in seconds. tests/integration runs the same steps
under the real scheduler.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from atlasflow.core.config import load_config
from atlasflow.core.cpus import usable_cpus
from atlasflow.intake.plan import write_batch_spec
from atlasflow.prep.genes import Vocabulary, VocabularyMismatchError
from atlasflow.steps import ingest as P
from atlasflow_testing.demo import build_demo
from atlasflow_testing.geo_server import GeoServer


@pytest.fixture
def demo(tmp_path: Path):
    (tmp_path / "www").mkdir()
    with GeoServer(tmp_path / "www") as server:
        build_demo(tmp_path, server.url, n_datasets=4, cells=60, batch_size=2, budget_mb=40, keep_checkpoints=1,
                   missing_at=1)
        config = load_config(tmp_path / "atlasflow.yaml", overrides={"integration.enabled": False,
                                                                    "training.epochs": 1})
        yield config, server


def run_batch(config, batch_id: str, ids: list[str], previous: str | None) -> dict:
    admission = P.admit_batch(config, batch_id, owner="test")
    assert admission["admitted"], admission["reason"]
    processed = [P.process_dataset_step(config, batch_id, P.download_dataset(config, batch_id, d, final_try=True))
                 for d in ids]
    integrated = P.integrate_batch_step(config, batch_id, processed)
    trained = P.train_batch_step(config, batch_id, previous_checkpoint=previous)
    cleaned = P.cleanup_batch(config, batch_id)
    return {"processed": processed, "integrated": integrated, "trained": trained, "cleaned": cleaned}


@pytest.mark.slow


def test_batches_chain_checkpoints_and_rerun_does_no_work(demo):
    config, server = demo
    plan = P.prepare_run(config)
    assert plan["batches"] == ["batch_0000", "batch_0001", "batch_0002"]
    specs = {b: [d["dataset_id"] for d in json.loads(Path(write_batch_spec(config, b)).read_text())["datasets"]]
             for b in plan["batches"]}
    assert specs["batch_0000"] == ["pbmc_1", "pbmc_gone"]

    first = run_batch(config, "batch_0000", specs["batch_0000"], None)
    assert [p["status"] for p in first["processed"]] == ["ok", "quarantined"]  # the 404 does not fail the batch
    assert first["integrated"]["quarantined"] == {"pbmc_gone": first["processed"][1]["reason"]}
    second = run_batch(config, "batch_0001", specs["batch_0001"], first["trained"]["checkpoint_dir"])
    assert second["trained"]["parent_checkpoint"] == first["trained"]["checkpoint_dir"]
    # keep_checkpoints=1: batch_0000's checkpoint is gone, its record is not
    assert not Path(first["trained"]["checkpoint_dir"]).exists()
    assert P.batch_trained(config, "batch_0000")["checkpoint_dir"] == first["trained"]["checkpoint_dir"]

    transfers = len(server.transfers())
    again = run_batch(config, "batch_0000", specs["batch_0000"], None)
    assert again["trained"] == first["trained"]
    assert all(p.get("skipped") for p in again["processed"] if p["status"] == "ok")
    assert len(server.transfers()) == transfers  # nothing downloaded again
    admission = P.admit_batch(config, "batch_0001", owner="test")
    assert admission["bytes"] == 0 and "trained before" in admission["reason"]

    third = run_batch(config, "batch_0002", specs["batch_0002"], second["trained"]["checkpoint_dir"])
    assert third["trained"]["parent_checkpoint"] == second["trained"]["checkpoint_dir"]
    assert third["trained"]["global_step"] > second["trained"]["global_step"]


@pytest.mark.slow
def test_integrate_after_train_of_the_same_run_still_integrates(demo):
    # train runs beside integrate, so it may finish first: "trained" must not make integrate skip while the
    # batch's processed cells are there; once cleanup has deleted them (an earlier run's batch), it does
    config, _ = demo
    P.prepare_run(config)
    ids = [d["dataset_id"] for d in json.loads(Path(write_batch_spec(config, "batch_0000")).read_text())["datasets"]]
    assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
    processed = [P.process_dataset_step(config, "batch_0000", P.download_dataset(config, "batch_0000", d, final_try=True))
                 for d in ids]
    assert P.usable_datasets([*processed, None]) == ["pbmc_1"]
    trained = P.train_batch_step(config, "batch_0000", previous_checkpoint=None)
    # the local training child trains beside integrate: half the CPUs (at least one thread), not all of them
    assert trained["cpu_threads"] == max(1, usable_cpus() // 2)
    integrated = P.integrate_batch_step(config, "batch_0000", processed)
    assert integrated["status"] == "ok" and "skipped" not in integrated
    P.cleanup_batch(config, "batch_0000")
    again = P.integrate_batch_step(config, "batch_0000", processed)
    assert again["skipped"] == "batch_0000 already trained"
    assert again["checkpoint_dir"] == trained["checkpoint_dir"]


def test_a_pruned_previous_checkpoint_is_a_clear_error(demo):
    config, _ = demo
    P.prepare_run(config)
    write_batch_spec(config, "batch_0001")
    with pytest.raises(FileNotFoundError, match="should resume from .*batch_0000, which is gone"):
        P.training_job(config, "batch_0001", previous_checkpoint=str(config.state_dir / ".." / "models" /
                                                                      "checkpoints" / "batch_0000"))


def test_a_dataset_removed_from_the_manifest_is_quarantined_not_fatal(demo):
    config, _ = demo
    P.prepare_run(config)
    assert P.download_dataset(config, "batch_0000", "not_there", final_try=True)["reason"] == "no longer in the manifest"


def test_a_vocabulary_other_than_the_pinned_one_stops_prepare(demo):
    config, _ = demo
    assert P.prepare_run(config)["vocab_version"] == Vocabulary.builtin("pbmc68k").version  # pinned by run 1
    plan = Path(config.plan_path).read_bytes()
    human = config.with_overrides({"genes.vocab_path": None})  # the default: the human vocabulary
    with pytest.raises(VocabularyMismatchError) as caught:
        P.prepare_run(human)
    message = str(caught.value)
    assert "asks for builtin:human_grch38_ens100 (version 825072f1f5a0, 19,927 genes), the default" in message
    assert f"pinned builtin:pbmc68k (version {Vocabulary.builtin('pbmc68k').version}, 765 genes)" in message
    assert "set genes.vocab_path back to builtin:pbmc68k" in message and "set storage.base_dir to a new" in message
    assert Path(config.plan_path).read_bytes() == plan  # refused before the plan is touched
    assert P.prepare_run(config)["vocab_version"] == Vocabulary.builtin("pbmc68k").version  # the fix works


def test_a_row_whose_species_is_not_human_is_quarantined_before_download(demo):
    config, server = demo
    P.prepare_run(config)
    spec = config.state_dir / "batches" / "batch_0000.json"
    write_batch_spec(config, "batch_0000")
    data = json.loads(spec.read_text())
    data["datasets"][0]["species"] = "Mus musculus"  # as if the manifest said so
    spec.write_text(json.dumps(data))
    got = P.download_dataset(config, "batch_0000", "pbmc_1", final_try=False)
    assert got["status"] == "quarantined" and got["stage"] == "download"
    assert got["reason"].startswith("pbmc_1: not human: the manifest's species is 'Mus musculus' (manifest ")
    assert "no genes.species_mapping is configured" in got["reason"]
    assert not server.transfers()  # nothing fetched for it


def test_admission_prunes_temporaries_that_dead_tasks_left(demo):
    """A killed task's extraction/save temporaries stop counting against the budget at the next admission."""
    import socket
    import subprocess
    import sys

    from atlasflow.core.fsutil import partial_path

    config, _ = demo
    plan = P.prepare_run(config)
    write_batch_spec(config, plan["batches"][0])
    base = Path(config.storage.base_dir)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = base / "cache" / "pbmc_1" / f"pbmc_1.tar.gz.extracted.{proc.pid}@{socket.gethostname()}.partial"
    stale.mkdir(parents=True)
    (stale / "matrix.mtx").write_bytes(bytes(2 * 10**6))
    live = partial_path(base / "cache" / "pbmc_2" / "x.tar.gz.extracted")  # this process's own: kept
    live.mkdir(parents=True)
    admission = P.admit_batch(config, plan["batches"][0], owner="test")
    assert admission["admitted"], admission["reason"]
    assert not stale.exists() and live.is_dir()


def test_an_archive_bomb_is_quarantined_with_its_figures_by_the_reservation(demo):
    """A row whose manifest says 64 KB: the archive would extract to 64 MB; the process step refuses it
    while streaming, quarantines it with the figures, and leaves nothing in the cache."""
    import io
    import tarfile

    config, server = demo
    P.prepare_run(config)
    bomb = Path(config.storage.base_dir).parent / "www" / "files" / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        for i in range(8):
            info = tarfile.TarInfo(f"filtered_feature_bc_matrix/part{i}.bin")
            info.size = 8 * 2**20
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    spec = config.state_dir / "batches" / "batch_0000.json"
    write_batch_spec(config, "batch_0000")
    data = json.loads(spec.read_text())
    data["datasets"][0].update({"download_url": f"{server.url}/files/bomb.tar.gz", "format": "10x_mtx",
                                "expected_bytes": bomb.stat().st_size, "sha256": None, "md5": None})
    spec.write_text(json.dumps(data))
    fetched = P.download_dataset(config, "batch_0000", "pbmc_1", final_try=True)
    assert fetched["status"] == "ok", fetched
    got = P.process_dataset_step(config, "batch_0000", fetched)
    assert got["status"] == "quarantined" and got["stage"] == "process"
    assert got["reason"].startswith("bomb.tar.gz: extracting it needs over ")
    assert f"from a {bomb.stat().st_size}-byte archive" in got["reason"] and "the dataset may use" in got["reason"]
    cache = Path(config.storage.base_dir) / "cache"
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_a_real_gzipped_counts_table_inflating_15x_is_processed_with_default_settings(demo):
    """A GEO-style genes x cells counts.csv.gz: the demo's real PBMC counts plus the undetected genes a
    full export lists (zero rows), which gzip shrinks ~15x. The defaults reserve 3x the download on
    disk; the table's text goes to pandas (memory), so it is bounded by readers.* and is processed
    (it was quarantined as "more than the dataset may use" when the reservation capped it)."""
    import gzip

    import numpy as np
    import pandas as pd

    from atlasflow_testing.realdata import pbmc_counts

    config, server = demo
    assert config.storage.default_expansion == 2.0 and config.readers.max_expansion_ratio == 200.0  # defaults
    P.prepare_run(config)
    pbmc = pbmc_counts()
    counts = pbmc.X.toarray().astype(np.int64).T
    undetected = np.zeros((1000, pbmc.n_obs), dtype=np.int64)
    frame = pd.DataFrame(np.vstack([counts, undetected]), columns=list(pbmc.obs_names),
                         index=[*pbmc.var_names, *(f"LINC{i:05d}" for i in range(len(undetected)))])
    text = frame.to_csv().encode()
    table = Path(config.storage.base_dir).parent / "www" / "files" / "GSE1_counts.csv.gz"
    table.write_bytes(gzip.compress(text))
    assert 12 < len(text) / table.stat().st_size < 20  # real count tables: 3.5-30x
    spec = config.state_dir / "batches" / "batch_0000.json"
    write_batch_spec(config, "batch_0000")
    data = json.loads(spec.read_text())
    data["datasets"][0].update({"download_url": f"{server.url}/files/{table.name}", "format": "csv",
                                "expected_bytes": table.stat().st_size, "sha256": None, "md5": None})
    spec.write_text(json.dumps(data))
    fetched = P.download_dataset(config, "batch_0000", "pbmc_1", final_try=True)
    assert fetched["status"] == "ok", fetched
    assert P._reserved_bytes(config, P._dataset(config, "batch_0000", "pbmc_1")) < len(text)  # the old cap
    got = P.process_dataset_step(config, "batch_0000", fetched)
    assert got["status"] == "ok", got
    assert got["cells_before"] == pbmc.n_obs and got["format"] == "csv"


def test_an_allowed_cross_host_redirect_is_in_the_step_result_and_the_report(demo):
    """Issue 16 point 9: followed only because download.redirect_hosts names the host, and reported
    (step result, stage record, run report) without the URL's query string."""
    from atlasflow.ops.report import collect_run

    config, server = demo
    config = config.with_overrides({"download.redirect_hosts": "localhost"})
    P.prepare_run(config)
    spec = config.state_dir / "batches" / "batch_0000.json"
    write_batch_spec(config, "batch_0000")
    data = json.loads(spec.read_text())
    target = urlsplit(data["datasets"][0]["download_url"]).path
    server.faults["/files/moved.h5ad"] = {"redirect": f"http://localhost:{server.port}{target}?token=SECRET"}
    data["datasets"][0]["download_url"] = f"{server.url}/files/moved.h5ad"
    spec.write_text(json.dumps(data))
    got = P.download_dataset(config, "batch_0000", "pbmc_1", final_try=True)
    assert got["status"] == "ok", got
    assert got["redirects"] == [f"moved.h5ad: http://localhost:{server.port}{target}?REDACTED"]
    row = next(d for d in collect_run(config)["datasets"] if d["dataset_id"] == "pbmc_1")
    assert row["redirects"] == got["redirects"]
    # without the host in the policy the same row is quarantined, naming the refused host
    strict = config.with_overrides({"download.redirect_hosts": "ncbi.nlm.nih.gov"})
    for leftover in (Path(strict.storage.base_dir) / "data" / "raw" / "pbmc_1").glob("*"):
        leftover.unlink()
    refused = P.download_dataset(strict, "batch_0000", "pbmc_1", final_try=True)
    assert refused["status"] == "quarantined" and "download.redirect_hosts does not allow" in refused["reason"]
    assert "SECRET" not in json.dumps(refused)


def test_cleanup_removes_what_killed_tries_left(demo):
    """The last batch's cleanup prunes a killed task's temporaries: no later admission would (fault campaign)."""
    import subprocess
    import sys

    from atlasflow.core.fsutil import owner_tag

    config, _ = demo
    P.prepare_run(config)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    host = owner_tag().split("@", 1)[1]
    checkpoints = Path(config.storage.base_dir) / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    left = checkpoints / f".batch_0000.config.json.x1y2.{dead}@{host}.tmp"  # a kill inside write_json_atomic
    left.write_text("{}")
    live = checkpoints / f".batch_0001.config.json.x1y2.{owner_tag()}.tmp"  # a live writer's: kept
    live.write_text("{}")
    P.cleanup_batch(config, "batch_0000")
    assert not left.exists() and live.exists()
