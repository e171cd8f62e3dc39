"""Opt-in MLflow tracking of training: one MLflow run per batch trained (``tracking.mlflow``).

What a run holds:

- params: the ``training`` and ``model`` config sections (``training.lr``, ``model.d_model``, ...);
- metrics: ``train.loss`` and ``train.lr`` at every optimisation step (step = the global step), and at
  the batch's last step its evaluation beside the baselines of ``result.json``: ``eval.val_loss``,
  ``eval.val_masked_acc`` vs ``eval.val_baseline_acc`` (most frequent bin) and ``eval.val_per_gene_acc``
  (each gene's most frequent bin), the probe's ``eval.probe.cls_probe_acc`` vs ``untrained_probe_acc``,
  ``pca50_probe_acc`` and ``majority_acc``, and ``eval.forgetting.<batch>.now``/``.change``;
- tags: ``atlasflow.batch_id``, ``atlasflow.checkpoint_dir``, ``atlasflow.parent_checkpoint``,
  ``atlasflow.parent_hash``, ``atlasflow.vocab_version``, ``atlasflow.global_step``, ... The
  checkpoint is referenced by its path, never uploaded: artefacts stay in the disk budget's models area.

It speaks MLflow's documented REST API (``/api/2.0/mlflow/...``) with ``requests``, so a SLURM node
needs no MLflow package and no Airflow. (``mlflow-skinny`` caps ``cachetools<8`` and
``importlib_metadata<10``, below this project's pins.) Credentials come from MLflow's own variables:
``MLFLOW_TRACKING_TOKEN`` (bearer) or ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``.

Tracking never fails training: a server that errs or does not answer ends that batch's tracking
with one warning. A job killed and resumed starts a new run for the same batch (same tags; its
steps continue from the checkpoint's global step); the killed one stays ``RUNNING`` in MLflow
unless the process could exit normally, in which case it is marked ``FAILED``.
"""

from __future__ import annotations

import atexit
import getpass
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from atlasflow.core.config import AtlasConfig, MlflowConfig

__all__ = ["BatchTracker", "MlflowError", "MlflowRest", "evaluation_metrics", "lineage_tags", "tracking_uri"]

log = logging.getLogger(__name__)

# MLflow's limits per log-batch request (REST API docs): 1000 metrics, 100 params, 100 tags
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_TAG_VALUE = 5000  # every backend keeps tag values up to 5000 bytes
_LINEAGE = ("batch_id", "checkpoint_dir", "parent_checkpoint", "parent_hash", "vocab_version", "global_step",
            "cells_seen", "device", "n_parameters", "gene_ranking", "cell_objective", "gene_medians_version")
_EVAL = ("val_loss", "val_masked_acc", "val_baseline_acc", "val_per_gene_acc", "val_expression_mse", "val_cells",
         "train_loss", "steps", "replay_reservoir_cells")


class MlflowError(RuntimeError):
    """The tracking server refused a request or could not be reached."""


def tracking_uri(config: MlflowConfig) -> str:
    """The server to talk to: ``tracking.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``.

    Raises
    ------
    ValueError
        Neither is set, or the URI is not an http(s) URL (MLflow's local stores need the MLflow
        package; scripts/local-mlflow runs a server over one under the base dir instead).
    """
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ValueError("tracking.mlflow.enabled is on but no tracking server is set: give tracking.mlflow.tracking_uri "
                         "(or MLFLOW_TRACKING_URI), e.g. the http://127.0.0.1:PORT that scripts/local-mlflow prints")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"tracking.mlflow.tracking_uri {uri!r} is not an http(s) URL of an MLflow tracking server "
                         "(local file or sqlite stores are served by `mlflow server`, e.g. scripts/local-mlflow)")
    return uri.rstrip("/")


class MlflowRest:
    """The few MLflow REST calls a training run needs (and the reads its tests use)."""

    def __init__(self, uri: str, *, timeout_s: float = 10.0) -> None:
        import requests

        self.uri, self.timeout_s = uri.rstrip("/"), timeout_s
        self.session = requests.Session()
        if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
            self.session.auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))

    def call(self, method: str, endpoint: str, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``endpoint`` under ``/api/2.0/mlflow/``; GET sends ``payload`` as the query string."""
        import requests

        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        try:
            if method == "GET":
                reply = self.session.get(url, params=payload, timeout=self.timeout_s)
            else:
                reply = self.session.post(url, json=payload or {}, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise MlflowError(f"{method} {url}: {exc}") from exc
        if reply.status_code != 200:
            try:
                body = reply.json()
                detail = f"{body.get('error_code')}: {body.get('message')}"
            except ValueError:
                detail = reply.text[:300]
            raise MlflowError(f"{method} {url}: HTTP {reply.status_code} {detail}")
        return reply.json() if reply.content else {}

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created when missing (two jobs creating it at once both get it)."""
        for attempt in range(2):
            try:
                return self.call("GET", "experiments/get-by-name", {"experiment_name": name})["experiment"]["experiment_id"]
            except MlflowError as exc:
                if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                    raise
            try:
                return self.call("POST", "experiments/create", {"name": name})["experiment_id"]
            except MlflowError as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc) or attempt:
                    raise
        raise AssertionError("unreachable")

    def create_run(self, experiment_id: str, *, run_name: str, tags: Mapping[str, str]) -> str:
        run = self.call("POST", "runs/create", {
            "experiment_id": experiment_id, "run_name": run_name, "start_time": _now_ms(),
            "tags": [{"key": k, "value": v} for k, v in tags.items()]})
        return run["run"]["info"]["run_id"]

    def log_batch(self, run_id: str, *, metrics: list[dict[str, Any]] | None = None,
                  params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Metrics, params and tags, split into requests within MLflow's per-request limits."""
        params_l = [{"key": k, "value": v} for k, v in (params or {}).items()]
        tags_l = [{"key": k, "value": v} for k, v in (tags or {}).items()]
        for chunk in _chunks(list(metrics or ()), _MAX_METRICS):
            self.call("POST", "runs/log-batch", {"run_id": run_id, "metrics": chunk})
        for chunk in _chunks(params_l, _MAX_PARAMS):
            self.call("POST", "runs/log-batch", {"run_id": run_id, "params": chunk})
        for chunk in _chunks(tags_l, _MAX_TAGS):
            self.call("POST", "runs/log-batch", {"run_id": run_id, "tags": chunk})

    def end_run(self, run_id: str, status: str) -> None:
        self.call("POST", "runs/update", {"run_id": run_id, "status": status, "end_time": _now_ms()})


class BatchTracker:
    """The MLflow run of one batch's training; every method is a no-op when tracking is off or broken.

    ``train_batch`` makes one with :meth:`start`, hands :meth:`step` to the trainer as its per-step
    hook, and calls :meth:`finish` with ``result.json``.
    """

    def __init__(self, rest: MlflowRest | None = None, run_id: str | None = None, *, flush_every: int = 50) -> None:
        self.rest, self.run_id, self.flush_every = rest, run_id, flush_every
        self._pending: list[dict[str, Any]] = []
        self._ended = False
        if self.active:
            atexit.register(self._abandon)

    @property
    def active(self) -> bool:
        return self.rest is not None and self.run_id is not None and not self._ended

    @classmethod
    def start(cls, config: AtlasConfig, *, batch_id: str, checkpoint_dir: Path,
              parent: Path | None = None) -> BatchTracker:
        """Open the batch's run (params and the tags known before training); an inactive tracker when off or unreachable.

        Raises
        ------
        ValueError
            Tracking is on without a usable tracking URI (a config mistake is not a server outage).
        """
        mc = config.tracking.mlflow
        if not mc.enabled:
            return cls()
        rest = MlflowRest(tracking_uri(mc), timeout_s=mc.timeout_s)
        tags = {"atlasflow.batch_id": batch_id, "atlasflow.checkpoint_dir": str(checkpoint_dir),
                "atlasflow.parent_checkpoint": str(parent) if parent else "", "mlflow.user": _user(),
                "mlflow.source.name": "atlasflow train"}
        if job := os.environ.get("SLURM_JOB_ID"):
            tags["atlasflow.slurm_job_id"] = job
        try:
            run_id = rest.create_run(rest.experiment_id(mc.experiment), run_name=batch_id, tags=tags)
            tracker = cls(rest, run_id, flush_every=mc.flush_every_steps)
            rest.log_batch(run_id, params=_params(config))
        except MlflowError as exc:
            log.warning("MLflow tracking off for %s: %s", batch_id, exc)
            return cls()
        log.info("MLflow run %s (experiment %r at %s) tracks %s", run_id, mc.experiment, rest.uri, batch_id)
        return tracker

    def step(self, global_step: int, loss: float, lr: float) -> None:
        """One optimisation step's loss and learning rate (sent every ``flush_every_steps``)."""
        if not self.active or not (math.isfinite(loss) and math.isfinite(lr)):  # JSON has no NaN
            return
        now = _now_ms()
        self._pending += [_metric("train.loss", loss, now, global_step), _metric("train.lr", lr, now, global_step)]
        if len(self._pending) >= 2 * self.flush_every:
            self._send(metrics=self._pending)

    def finish(self, result: Mapping[str, Any]) -> None:
        """The batch's evaluation and lineage from ``result.json``, then the run ends ``FINISHED``."""
        if not self.active:
            return
        step = int(result.get("global_step") or 0)
        now = _now_ms()
        metrics = self._pending + [_metric(k, v, now, step) for k, v in evaluation_metrics(result).items()]
        if self._send(metrics=metrics, tags=lineage_tags(result)):
            self._end("FINISHED")

    def _send(self, *, metrics: list[dict[str, Any]], tags: Mapping[str, str] | None = None) -> bool:
        assert self.rest is not None and self.run_id is not None
        self._pending = []
        try:
            self.rest.log_batch(self.run_id, metrics=metrics, tags=tags)
            return True
        except MlflowError as exc:
            log.warning("MLflow tracking of run %s stopped: %s", self.run_id, exc)
            self._ended = True
            return False

    def _end(self, status: str) -> None:
        assert self.rest is not None and self.run_id is not None
        self._ended = True
        atexit.unregister(self._abandon)
        try:
            self.rest.end_run(self.run_id, status)
        except MlflowError as exc:
            log.warning("MLflow run %s could not be marked %s: %s", self.run_id, status, exc)

    def _abandon(self) -> None:
        """At exit without :meth:`finish` (training raised): send what is pending and mark the run FAILED."""
        if self.active:
            if self._pending:
                self._send(metrics=self._pending)
            if self.rest is not None and self.run_id is not None and not self._ended:
                self._end("FAILED")


def evaluation_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """``result.json``'s evaluation as flat ``eval.*`` metrics: each figure with its baselines; None and NaN left out."""
    out: dict[str, float] = {}
    for key in _EVAL:
        _put(out, f"eval.{key}", result.get(key))
    for key, value in (result.get("probe") or {}).items():
        _put(out, f"eval.probe.{key}", value)
    for batch, fig in (result.get("forgetting") or {}).items():
        for key in ("now", "at_training", "change"):
            _put(out, f"eval.forgetting.{batch}.{key}", (fig or {}).get(key))
    return out


def lineage_tags(result: Mapping[str, Any]) -> dict[str, str]:
    """The checkpoint's path and lineage from ``result.json`` as ``atlasflow.*`` tags."""
    tags = {f"atlasflow.{k}": "" if result.get(k) is None else str(result[k])[:_MAX_TAG_VALUE] for k in _LINEAGE}
    tags["atlasflow.datasets_seen"] = str(len(result.get("datasets_seen") or []))
    return tags


def _put(out: dict[str, float], key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return
    out[key] = float(value)


def _params(config: AtlasConfig) -> dict[str, str]:
    data = config.to_dict()
    return {f"{section}.{k}": str(v)[:_MAX_TAG_VALUE] for section in ("training", "model")
            for k, v in data[section].items()}


def _metric(key: str, value: float, timestamp: int, step: int) -> dict[str, Any]:
    return {"key": key, "value": float(value), "timestamp": timestamp, "step": int(step)}


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"
