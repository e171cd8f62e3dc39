"""Sizes learnt before admission, on a seed-format manifest (no expected_bytes anywhere): admission
reserves what the server says, the download's cap follows the reservation, and what arrives is checked."""

from __future__ import annotations

import json

import pytest

from atlasflow.core.config import load_config
from atlasflow.intake.plan import write_batch_spec
from atlasflow.steps import ingest as P
from atlasflow_testing.seed import served_seed


@pytest.fixture
def seed(tmp_path):
    with served_seed(tmp_path) as (server, info):
        yield load_config(tmp_path / "atlasflow.yaml"), server, info


def test_admission_reserves_the_sizes_the_sources_name(seed):
    config, server, info = seed
    P.prepare_run(config)
    write_batch_spec(config, "batch_0000")
    admission = P.admit_batch(config, "batch_0000", owner="test")
    assert admission["admitted"], admission["reason"]
    rows = {d["dataset_id"]: d for d in admission["footprint"]["datasets"]}
    assert (rows["seed_direct"]["raw"], rows["seed_direct"]["size_source"]) == (info["bytes"]["seed_direct"], "head")
    assert (rows["seed_geo"]["raw"], rows["seed_geo"]["size_source"]) == (info["bytes"]["seed_geo"], "geo")
    # the 404 row: the last resort, and the cache says why
    assert (rows["seed_gone"]["raw"], rows["seed_gone"]["size_source"]) == (int(0.02e9), "default")
    cached = json.loads((config.state_dir / "sizes.json").read_text())
    assert "HTTP 404" in cached["seed_gone"]["error"]
    # a second admission attempt (the sensor pokes again) asks nobody
    heads = server.hits("/files/" + "seed_direct.h5ad")
    P.admit_batch(config, "batch_0000", owner="test")
    assert server.hits("/files/seed_direct.h5ad") == heads

    fetched = P.download_dataset(config, "batch_0000", "seed_direct", final_try=True)
    assert fetched["status"] == "ok"
    assert fetched["size_check"] == {"expected": info["bytes"]["seed_direct"], "source": "head",
                                     "arrived": info["bytes"]["seed_direct"], "ratio": 1.0}


def test_a_file_that_grew_past_its_reservation_is_refused(seed, tmp_path):
    config, _, info = seed
    P.prepare_run(config)
    write_batch_spec(config, "batch_0000")
    assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
    # the server's file grows after admission: the cap is the reservation's (+25 %), not unknown_size_gb
    path = tmp_path / "www" / "files" / "seed_direct.h5ad"
    path.write_bytes(path.read_bytes() + b"\0" * (2 * info["bytes"]["seed_direct"] + 2_000_000))
    fetched = P.download_dataset(config, "batch_0000", "seed_direct", final_try=True)
    assert fetched["status"] == "quarantined" and fetched["stage"] == "download"
    assert "more than" in fetched["reason"]


def test_the_report_says_where_a_size_came_from(seed):
    from atlasflow.ops.report import collect_run

    config, _, info = seed
    P.prepare_run(config)
    write_batch_spec(config, "batch_0000")
    assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
    for d in ("seed_direct", "seed_geo"):
        assert P.download_dataset(config, "batch_0000", d, final_try=True)["status"] == "ok"
    rows = {d["dataset_id"]: d for d in collect_run(config)["datasets"]}
    assert (rows["seed_direct"]["expected_bytes"], rows["seed_direct"]["size_source"]) == (
        info["bytes"]["seed_direct"], "head")
    assert rows["seed_geo"]["size_source"] == "geo"
