"""Opt-in MLflow tracking against a real MLflow tracking server on 127.0.0.1 (scripts/local-mlflow).

The server runs in its own venv (requirements-mlflow-server.txt), started on a free port with a
temporary store and stopped by its recorded PID. Training runs on real cells (pbmc68k_reduced).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from atlasflow.core.config import load_config
from atlasflow.intake.manifest import Dataset
from atlasflow.model.tracking import MlflowRest, evaluation_metrics, lineage_tags, tracking_uri
from atlasflow.model.train import lr_factor, train_batch
from atlasflow.prep.genes import Vocabulary
from atlasflow.prep.process import process_dataset
from atlasflow_testing.realdata import pbmc_counts, write_format

REPO = Path(__file__).resolve().parents[3]
TINY = {"model.preset": "custom", "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 64,
        "model.max_genes": 64, "training.batch_cells": 32, "training.block_cells": 64, "training.warmup_steps": 3,
        "training.checkpoint_every_steps": 3, "training.epochs": 2, "training.val_fraction": 0.34,
        "qc.min_genes": 10, "genes.vocab_path": "builtin:pbmc68k", "tracking.mlflow.flush_every_steps": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server() -> Iterator[str]:
    """A real MLflow tracking server (scripts/local-mlflow) on a free port; its URL."""
    state = Path(tempfile.mkdtemp(prefix="atlasflow-test-mlflow-"))
    env = {**os.environ, "MLFLOW_STATE_DIR": str(state), "MLFLOW_PORT": str(_free_port())}
    script = str(REPO / "scripts" / "local-mlflow")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, started.stdout + started.stderr
    url = subprocess.run([script, "url"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    yield url
    stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True)
    artifacts = list((state / "store" / "artifacts").rglob("*"))
    shutil.rmtree(state, ignore_errors=True)
    assert stopped.returncode == 0 and "stopped mlflow" in stopped.stdout
    assert not any(p.is_file() for p in artifacts)  # checkpoints are referenced, never uploaded


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory) -> Path:
    """One batch of three processed datasets of real cells (one of them held out for evaluation)."""
    root = tmp_path_factory.mktemp("tracked")
    pbmc, config, vocab = pbmc_counts(), load_config(overrides=TINY), Vocabulary.builtin("pbmc68k")
    for d in range(3):
        raw = root / "raw" / f"d{d}"
        write_format(pbmc[d * 150: (d + 1) * 150].copy(), "h5ad", raw)
        process_dataset(raw, Dataset(f"d{d}", "https://h/x.h5ad", "direct", 2, cell_type_key="bulk_labels"),
                        config=config, out_path=root / "batch_0000" / f"d{d}.h5ad", vocab=vocab, cache_dir=root / "cache")
    return root / "batch_0000"


def test_tracking_uri_comes_from_config_or_mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(overrides={"tracking.mlflow.enabled": True}).tracking.mlflow
    with pytest.raises(ValueError, match="no tracking server is set: give tracking.mlflow.tracking_uri"):
        tracking_uri(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5055/")
    assert tracking_uri(cfg) == "http://127.0.0.1:5055"
    for bad in ("file:///tmp/mlruns", "/tmp/mlruns", "sqlite:///x.db", "http://"):
        with pytest.raises(ValueError, match="is not an http\\(s\\) URL"):
            tracking_uri(load_config(overrides={"tracking.mlflow.tracking_uri": bad}).tracking.mlflow)


def test_evaluation_keeps_every_figure_beside_its_baselines():
    result = {"val_loss": 2.5, "val_masked_acc": 0.4, "val_baseline_acc": 0.3, "val_per_gene_acc": 0.35,
              "val_expression_mse": None, "train_loss": float("nan"), "steps": 12,
              "probe": {"cells": 90, "cls_probe_acc": 0.8, "untrained_probe_acc": 0.6, "pca50_probe_acc": 0.85,
                        "majority_acc": 0.3},
              "forgetting": {"batch_0000": {"at_training": 0.4, "now": 0.38, "change": -0.02}},
              "checkpoint_dir": "/c/batch_0001", "parent_checkpoint": None, "datasets_seen": ["a", "b"]}
    metrics = evaluation_metrics(result)
    assert metrics["eval.val_masked_acc"] == 0.4 and metrics["eval.val_baseline_acc"] == 0.3
    assert metrics["eval.probe.pca50_probe_acc"] == 0.85 and metrics["eval.probe.untrained_probe_acc"] == 0.6
    assert metrics["eval.forgetting.batch_0000.change"] == -0.02
    assert "eval.val_expression_mse" not in metrics and "eval.train_loss" not in metrics  # None / NaN: no JSON number
    tags = lineage_tags(result)
    assert tags["atlasflow.checkpoint_dir"] == "/c/batch_0001" and tags["atlasflow.parent_checkpoint"] == ""
    assert tags["atlasflow.datasets_seen"] == "2"


def _history(rest: MlflowRest, run_id: str, key: str) -> list[dict]:
    return rest.call("GET", "metrics/get-history", {"run_id": run_id, "metric_key": key, "max_results": 10000})["metrics"]


@pytest.mark.slow
def test_training_is_tracked_on_a_real_mlflow_server(mlflow_server, batch_dir, tmp_path):
    config = load_config(overrides={**TINY, "storage.base_dir": str(tmp_path / "base"), "tracking.mlflow.enabled": True,
                                    "tracking.mlflow.tracking_uri": mlflow_server,
                                    "tracking.mlflow.experiment": "atlasflow-test"})
    out = tmp_path / "ckpt" / "batch_0000"
    result = train_batch(config, Vocabulary.builtin("pbmc68k"), batch_dir, out)

    rest = MlflowRest(mlflow_server)
    exp = rest.experiment_id("atlasflow-test")
    (run,) = rest.call("POST", "runs/search", {"experiment_ids": [exp]})["runs"]
    run_id, data = run["info"]["run_id"], run["data"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "batch_0000"
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["atlasflow.batch_id"] == "batch_0000" and tags["atlasflow.checkpoint_dir"] == str(out)
    assert tags["atlasflow.parent_hash"] == "" and tags["atlasflow.vocab_version"] == result["vocab_version"]
    assert tags["atlasflow.global_step"] == str(result["global_step"])
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["training.lr"] == str(config.training.lr) and params["model.d_model"] == "32"

    # every step's loss and learning rate, in step order; their mean is result.json's train_loss
    loss, lr = _history(rest, run_id, "train.loss"), _history(rest, run_id, "train.lr")
    steps = result["steps"]
    assert [m["step"] for m in sorted(loss, key=lambda m: m["step"])] == list(range(1, steps + 1))
    assert math.isclose(np.mean([m["value"] for m in loss]), result["train_loss"], rel_tol=1e-6)
    first_lr = next(m["value"] for m in lr if m["step"] == 1)
    assert math.isclose(first_lr, config.training.lr * lr_factor(0, steps, warmup=3, floor=config.training.lr_floor),
                        rel_tol=1e-6)
    # the evaluation with its baselines, at the batch's last step
    latest = {m["key"]: m for m in data["metrics"]}
    for key in ("val_masked_acc", "val_baseline_acc", "val_per_gene_acc", "val_loss"):
        assert math.isclose(latest[f"eval.{key}"]["value"], result[key], rel_tol=1e-9)
        assert latest[f"eval.{key}"]["step"] == result["global_step"]
    assert result["probe"] is not None  # labelled held-out cells: the probe and its baselines ran
    for key in ("cls_probe_acc", "untrained_probe_acc", "pca50_probe_acc", "majority_acc"):
        assert math.isclose(latest[f"eval.probe.{key}"]["value"], result["probe"][key], rel_tol=1e-9)


@pytest.mark.slow
def test_an_unreachable_server_does_not_stop_training(batch_dir, tmp_path, caplog):
    config = load_config(overrides={**TINY, "storage.base_dir": str(tmp_path / "base"), "tracking.mlflow.enabled": True,
                                    "tracking.mlflow.tracking_uri": f"http://127.0.0.1:{_free_port()}",
                                    "tracking.mlflow.timeout_s": 2})
    with caplog.at_level(logging.WARNING, logger="atlasflow.model.tracking"):
        result = train_batch(config, Vocabulary.builtin("pbmc68k"), batch_dir, tmp_path / "ckpt" / "batch_0000")
    assert result["steps"] > 0 and (tmp_path / "ckpt" / "batch_0000" / "result.json").exists()
    assert "MLflow tracking off for batch_0000" in caplog.text
