"""sra rows end to end through the ingest steps (no Airflow): ENA filereport and FASTQ from a local
server → kb count → FASTQ deleted (the ledger records the bytes) → the normal reader, QC and the
processed h5ad. Bad samples are quarantined with the reason and never stop the batch."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from atlasflow.core.config import load_config
from atlasflow.intake.plan import write_batch_spec
from atlasflow.steps import ingest as P
from atlasflow.storage import Ledger
from atlasflow_testing.geo_server import GeoServer
from atlasflow_testing.reads import build_fastq_demo, simulate_10x


@pytest.fixture
def reads_demo(kb_reference, tmp_path):
    kb = kb_reference
    (tmp_path / "www" / "direct").mkdir(parents=True)
    with GeoServer(tmp_path / "www") as server:
        # two broken samples given as direct FASTQ URLs (R1;R2)
        trunc = simulate_10x(kb["ref"], tmp_path / "www" / "direct", n_cells=3, whitelist=kb["barcodes"], prefix="t")
        data = trunc.r2.read_bytes()
        trunc.r2.write_bytes(data[: len(data) * 2 // 3])
        simulate_10x(kb["ref"], tmp_path / "www" / "direct", n_cells=3, whitelist=kb["barcodes"], prefix="s",
                     r1_length=20)
        extra = [[name, f"{server.url}/direct/{p}_R1.fastq.gz;{server.url}/direct/{p}_R2.fastq.gz", "direct",
                  "fastq", "", "10xv3"] for name, p in (("bad_trunc", "t"), ("bad_len", "s"))]
        info = build_fastq_demo(tmp_path, server.url, reference=kb["ref"], index=kb["index"], t2g=kb["t2g"],
                                onlist=kb["onlist"], barcodes=kb["barcodes"], n_samples=2, extra_rows=extra)
        yield tmp_path, server, info


def steps(config, batch_id, ids):
    fetched = [P.download_dataset(config, batch_id, d, final_try=True) for d in ids]
    quant = [P.quant_dataset_step(config, batch_id, f) for f in fetched]
    return fetched, quant


@pytest.mark.slow


def test_sra_rows_are_quantified_and_bad_samples_quarantined(reads_demo):
    root, server, info = reads_demo
    config = load_config(root / "atlasflow.yaml")
    assert P.prepare_run(config)["batches"] == ["batch_0000"]
    ids = [d["dataset_id"] for d in json.loads(Path(write_batch_spec(config, "batch_0000")).read_text())["datasets"]]
    assert ids == ["fq0", "fq1", "bad_trunc", "bad_len"]
    admission = P.admit_batch(config, "batch_0000", owner="test")
    assert admission["admitted"], admission["reason"]
    # a reads sample reserves reads + kb's working space; the batch reserves the index once
    fq0 = next(d for d in admission["footprint"]["datasets"] if d["dataset_id"] == "fq0")
    assert fq0["raw"] == info["fastq_bytes"]["fq0"] and fq0["quant_work"] >= fq0["raw"]
    assert admission["footprint"]["index"] == Path(config.quant.index).stat().st_size

    fetched, quant = steps(config, "batch_0000", ids)
    assert [f["status"] for f in fetched] == ["ok"] * 4
    assert server.hits("/ena/portal/api/filereport") == 2  # one filereport per sra row
    raw = config.base_dir / "data" / "raw"
    assert sorted(p.name for p in (raw / "fq0").iterdir() if p.name.endswith(".gz")) == []  # FASTQ gone
    assert (raw / "fq0" / "counts" / "matrix.mtx.gz").exists()

    by_id = dict(zip(ids, quant, strict=True))
    assert by_id["fq0"]["status"] == "ok" and by_id["fq0"]["quant"]["percent_pseudoaligned"] == 100.0
    # the ledger counts disk blocks: at least the file sizes, at most a block more per file
    assert 0 <= by_id["fq0"]["fastq_freed"] - info["fastq_bytes"]["fq0"] <= 2 * 8192
    freed = [d for d in Ledger(config.storage).deletions() if d["reason"].startswith("FASTQ quantified")]
    assert sorted(d["path"].split("/")[2:] for d in freed) == [
        ["fq0", "SRR9000000_1.fastq.gz"], ["fq0", "SRR9000000_2.fastq.gz"],
        ["fq1", "SRR9000001_1.fastq.gz"], ["fq1", "SRR9000001_2.fastq.gz"]]
    assert sum(d["bytes"] for d in freed) == by_id["fq0"]["fastq_freed"] + by_id["fq1"]["fastq_freed"]

    assert by_id["bad_trunc"]["status"] == "quarantined" and by_id["bad_trunc"]["stage"] == "quant"
    assert "t_R2.fastq.gz: the gzip stream is truncated" in by_id["bad_trunc"]["reason"]
    assert "reads of 20 bp, shorter than the 28 bp barcode+UMI of 10xv3" in by_id["bad_len"]["reason"]
    saved = json.loads((config.state_dir / "quarantine" / "bad_len.json").read_text())
    assert saved["reason"] == by_id["bad_len"]["reason"]
    assert not (raw / "bad_trunc").exists()  # a quarantined sample's reads are not kept

    ledger = Ledger(config.storage)
    assert ledger.expansion_factor("fastq") == 0.05  # the seed, until a reads sample is processed
    processed = [P.process_dataset_step(config, "batch_0000", q) for q in quant]
    assert [p["status"] for p in processed] == ["ok", "ok", "quarantined", "quarantined"]
    # measured now: processed bytes per FASTQ byte, for the next batch's reservation
    assert ledger.expansion_factor("fastq") != 0.05 and ledger.expansion_factor("fastq") > 0
    assert processed[0]["format"] == "10x_mtx" and processed[0]["cells_after"] == 10
    out = ad.read_h5ad(processed[0]["path"])
    barcodes, truth = info["truth"]["fq0"]
    cells = [name.split(":", 1)[1].split("-")[0] for name in out.obs_names]
    matrix = out.X.toarray()[[cells.index(b) for b in barcodes]]
    assert matrix.sum() == truth.sum()  # every simulated molecule reached the processed file
    np.testing.assert_array_equal(np.sort(matrix.sum(axis=1)), np.sort(truth.sum(axis=1)))

    # a cleared download task after quantification fetches nothing again
    transfers = len(server.transfers())
    again = P.download_dataset(config, "batch_0000", "fq1", final_try=True)
    assert again["skipped"] in ("already quantified", "already processed") and len(server.transfers()) == transfers


def test_a_missing_index_quarantines_every_reads_sample(reads_demo):
    root, _, _ = reads_demo
    config = load_config(root / "atlasflow.yaml", overrides={"quant.index": str(root / "missing.idx"),
                                                             "plan.batch_size": 1})
    P.prepare_run(config)
    write_batch_spec(config, "batch_0000")
    assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
    (fetched,), (quant,) = steps(config, "batch_0000", ["fq0"])
    assert fetched["status"] == "ok" and quant["status"] == "quarantined"
    assert "missing.idx does not exist; build it with `atlasflow quant ref" in quant["reason"]


def test_non_reads_datasets_pass_the_quant_step_untouched(reads_demo):
    root, _, _ = reads_demo
    config = load_config(root / "atlasflow.yaml")
    P.prepare_run(config)
    write_batch_spec(config, "batch_0000")
    passed = {"dataset_id": "fq0", "status": "quarantined", "reason": "404"}
    assert P.quant_dataset_step(config, "batch_0000", passed) is passed
    with gzip.open(root / "sim" / "SRR9000000" / "sample_R1.fastq.gz", "rt") as fh:
        assert len(fh.readline()) > 1  # the fixture really wrote reads


@pytest.mark.slow


def test_slurm_backend_runs_the_same_quantification_as_a_cpu_job(reads_demo, tmp_path):
    """What the QuantOperator submits with quant.backend slurm: `atlasflow quant run` on the CPU
    partition; the job writes its result JSON and the Airflow side then deletes the FASTQ files."""
    import subprocess
    import sys

    root, _, _ = reads_demo
    config = load_config(root / "atlasflow.yaml", overrides={"quant.backend": "slurm", "quant.slurm_partition": "cpu",
                                                             "quant.threads": 2, "plan.batch_size": 1})
    P.prepare_run(config)
    write_batch_spec(config, "batch_0000")
    assert P.admit_batch(config, "batch_0000", owner="test")["admitted"]
    fetched = P.download_dataset(config, "batch_0000", "fq0", final_try=True)
    assert P.reads_to_quantify(config, "batch_0000", fetched)
    job = P.quant_job(config, "batch_0000", "fq0")
    assert job["command"][1:5] == ["-m", "atlasflow.cli", "quant", "run"]
    assert job["command"][-4:] == ["--batch-id", "batch_0000", "--dataset-id", "fq0"]
    slurm = job["slurm"]
    assert (slurm.partition, slurm.gpus, slurm.cpus, slurm.mem_gb, slurm.time_limit) == ("cpu", 0, 2, 8.0, "00:11:00")
    result_path = tmp_path / "result.json"
    done = subprocess.run(job["command"], env={**os.environ, "ATLASFLOW_RESULT_PATH": str(result_path),
                                               "PYTHONPATH": os.pathsep.join(sys.path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(result_path.read_text())
    assert outcome["status"] == "ok" and outcome["dataset_id"] == "fq0" and outcome["percent_pseudoaligned"] == 100.0
    raw = config.base_dir / "data" / "raw" / "fq0"
    assert len(list(raw.glob("*.fastq.gz"))) == 2  # the job leaves deletion to the Airflow side
    finished = P.finish_quant(config, "batch_0000", "fq0", outcome)
    assert finished["status"] == "ok" and list(raw.glob("*.fastq.gz")) == []


@pytest.mark.slow
def test_dataset_run_quantifies_a_reads_row_without_airflow(reads_demo):
    """`atlasflow dataset run` on an sra row: ENA → kb count → QC, one JSON line, nothing left behind."""
    import io

    from atlasflow.cli.main import main

    root, _, info = reads_demo
    out = io.StringIO()
    assert main(["dataset", "run", "fq0", "--config", str(root / "atlasflow.yaml")], out=out) == 0
    line = json.loads(out.getvalue())
    assert (line["status"], line["cells_before"]) == ("processed", 10)
    assert line["download_bytes"] == info["fastq_bytes"]["fq0"] and line["size_source"] == "manifest"
    assert (line["quant"]["technology"], line["quant"]["technology_source"]) == ("10xv3", "manifest")
    config = load_config(root / "atlasflow.yaml")
    assert not (config.base_dir / "data" / "raw" / "fq0").exists()
    assert not (config.base_dir / "cache" / "quant" / "fq0").exists()
