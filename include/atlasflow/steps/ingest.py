"""The ingest pipeline's steps, one function per DAG task, each idempotent and safe to re-run.

Each function takes the run's config and small values (ids, paths, small dicts) and returns a
small dict for XCom, typed below as a TypedDict so the XCom JSON stays exactly the dict it has
always been; files go to the deterministic paths of docs/contracts.md. A bad dataset is
*quarantined* (``status: "quarantined"`` plus a JSON file saying why) so its batch goes on. Steps
that the run report times are decorated with :func:`atlasflow.core.runlog.stage`.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

from atlasflow.core.config import AtlasConfig
from atlasflow.core.cpus import threads_for
from atlasflow.core.fsutil import prune_stale_temps, write_json_atomic
from atlasflow.core.records import (
    QuarantineRecord,
    batch_spec_path,
    batch_trained,
    jobs_dir,
    pinned_vocab_path,
    record_quarantine,
    record_trained,
    stage_path,
    tombstone_path,
)
from atlasflow.core.runlog import RecordAlso, StageStatus, record_job, stage, stage_ended, stage_started
from atlasflow.intake.manifest import Dataset
from atlasflow.intake.plan import batch_id as make_batch_id
from atlasflow.intake.plan import freeze_plan, load_plan
from atlasflow.model.sizing import ModelArtifacts, model_artifacts
from atlasflow.prep.genes import (
    Vocabulary,
    VocabularyMismatchError,
    dataset_species,
    normalize_species,
    run_vocabulary,
    species_mapping_for,
    vocabulary_mismatch,
)
from atlasflow.steps.retrain import resume_checkpoint, retrain_set_path
from atlasflow.storage import BudgetExceededError, Cleaner, Ledger, StorageLayout, batch_footprint

if TYPE_CHECKING:
    from atlasflow.core.config import SlurmConfig

__all__ = [
    "AdmitResult",
    "BudgetExceededError",
    "CleanupResult",
    "DownloadResult",
    "Downloaded",
    "Integrated",
    "ProcessResult",
    "Processed",
    "QuantJob",
    "QuantOutcome",
    "QuantResult",
    "QuantSummary",
    "Quantified",
    "RunPrepared",
    "SkipReason",
    "StepStatus",
    "TrainResult",
    "TrainingJob",
    "admit_batch",
    "batch_trained",
    "cleanup_batch",
    "download_dataset",
    "integrate_batch_step",
    "load_batch_ids",
    "prepare_run",
    "finish_quant",
    "process_dataset_step",
    "quant_dataset_step",
    "quant_job",
    "reads_to_quantify",
    "record_trained",
    "run_quant",
    "slurm_training_finished",
    "slurm_training_submitted",
    "train_batch_step",
    "training_job",
    "usable_datasets",
]

log = logging.getLogger(__name__)


class StepStatus(StrEnum):
    """A step result's ``status`` (XCom). The stage record takes the same word (:class:`StageStatus`)."""

    OK = "ok"
    SKIPPED = "skipped"  # integrate only: the batch has no usable dataset (the DAG task skips)
    QUARANTINED = "quarantined"
    FAILED = "failed"  # run_quant only: finish_quant turns it into a quarantine on the Airflow side


class SkipReason(StrEnum):
    """Why a step found its work already done: the ``skipped`` value of its result (a stage record keeps it)."""

    ALREADY_TRAINED = "already trained"  # written after the batch id: "<batch_id> already trained"
    ALREADY_PROCESSED = "already processed"
    ALREADY_QUANTIFIED = "already quantified"


def trained_skip(batch_id: str) -> str:
    """The ``skipped`` value of a step whose batch a run trained before (the batch id first, as XCom always said)."""
    return f"{batch_id} {SkipReason.ALREADY_TRAINED}"


def _done_before(batch_id: str, skipped: str | None) -> bool:
    """Whether a ``skipped`` value says the work was done (every skip reason a download result carries)."""
    return skipped in (trained_skip(batch_id), SkipReason.ALREADY_PROCESSED, SkipReason.ALREADY_QUANTIFIED)


class RunPrepared(TypedDict):
    """:func:`prepare_run`: the sealed plan's summary and the pinned vocabulary's version."""

    plan_path: str
    batches: list[str]
    new_batches: list[str]
    datasets: int
    changes: list[str]
    vocab_version: str


class AdmitResult(TypedDict):
    """:func:`admit_batch`: an :class:`~atlasflow.storage.Admission` and the footprint it was asked for.

    A batch trained before reserves nothing: ``already_trained`` instead of the ledger's figures.
    """

    admitted: bool
    batch_id: str
    bytes: int
    reason: str
    used: NotRequired[int]
    outstanding: NotRequired[int]
    free: NotRequired[int]
    footprint: NotRequired[dict[str, Any]]
    already_trained: NotRequired[Literal[True]]


class Downloaded(TypedDict):
    """:func:`download_dataset` for a dataset on disk: the fetch's figures, or why nothing was fetched."""

    dataset_id: str
    status: Literal[StepStatus.OK]
    skipped: NotRequired[str]  # trained_skip(batch_id) or a SkipReason
    bytes: NotRequired[int]
    files: NotRequired[int]
    seconds: NotRequired[float]
    size_check: NotRequired[dict[str, Any]]  # expected (and from where) vs arrived
    skipped_files: NotRequired[list[str]]  # GEO: "<file>: <reason>" for each listed file not fetched
    redirects: NotRequired[list[str]]  # "<file>: <URL another host served it from>" (redacted), when any


DownloadResult = Downloaded | QuarantineRecord


class QuantOutcome(TypedDict):
    """:func:`run_quant` (the SLURM job's result file): ``ok`` with kb's summary, or ``failed`` with a reason."""

    dataset_id: str
    batch_id: str
    status: Literal[StepStatus.OK, StepStatus.FAILED]
    reason: NotRequired[str]
    reads_processed: NotRequired[int]
    reads_pseudoaligned: NotRequired[int]
    percent_pseudoaligned: NotRequired[float]
    barcodes: NotRequired[int]
    genes: NotRequired[int]
    seconds: NotRequired[float]
    fastq_bytes: NotRequired[int]
    technology: NotRequired[str]  # the manifest's, or detected from the reads (technology_source)
    technology_source: NotRequired[str]
    detection: NotRequired[dict[str, Any] | None]


class QuantSummary(TypedDict):
    """The part of a :class:`QuantOutcome` kept in XCom (None where kb did not say)."""

    reads_processed: int | None
    reads_pseudoaligned: int | None
    percent_pseudoaligned: float | None
    barcodes: int | None
    genes: int | None
    seconds: float | None
    fastq_bytes: int | None
    technology: NotRequired[str | None]
    technology_source: NotRequired[str | None]


class Quantified(TypedDict):
    """:func:`finish_quant` for a quantified dataset: kb's summary and the FASTQ bytes deleted."""

    dataset_id: str
    status: Literal[StepStatus.OK]
    quant: QuantSummary
    fastq_freed: int


QuantResult = Quantified | QuarantineRecord


class QuantJob(TypedDict):
    """:func:`quant_job`: the command line and where its logs go, with the SLURM settings for it."""

    command: list[str]
    log_dir: str
    slurm: SlurmConfig


class Processed(TypedDict):
    """:func:`process_dataset_step` for a usable dataset; a re-run that finds it done carries ``skipped``."""

    dataset_id: str
    status: Literal[StepStatus.OK]
    path: str
    cells_after: int | None
    skipped: NotRequired[str]
    format: NotRequired[str]
    raw_bytes: NotRequired[int]
    processed_bytes: NotRequired[int]
    cells_before: NotRequired[int]
    genes_after: NotRequired[int]
    removed: NotRequired[dict[str, Any]]
    coverage: NotRequired[Any]
    strategy: NotRequired[str]
    non_integer: NotRequired[Any]
    seconds: NotRequired[float]


# a dataset quarantined at download (or quant) is passed through unprocessed
ProcessResult = Processed | QuarantineRecord


class Integrated(TypedDict):
    """:func:`integrate_batch_step`: the batch's usable and quarantined datasets and the integration summary."""

    batch_id: str
    datasets: list[str]
    quarantined: dict[str, str | None]
    status: Literal[StepStatus.OK, StepStatus.SKIPPED]
    reason: NotRequired[str]  # with status skipped: no usable dataset
    integration: NotRequired[dict[str, Any] | None]
    skipped: NotRequired[str]
    checkpoint_dir: NotRequired[str | None]


class TrainingJob(TypedDict):
    """:func:`training_job`: the ``atlasflow train`` command line and where its outputs go."""

    command: list[str]
    checkpoint_dir: str
    log_dir: str


# ``result.json`` of ``atlasflow train`` (lineage, losses, model figures): its keys belong to the model CLI
TrainResult = dict[str, Any]


class CleanupResult(TypedDict):
    """:func:`cleanup_batch`: bytes freed per area and whether the reservation was released."""

    batch_id: str
    freed_bytes: dict[str, int]
    released: bool
    trained: bool


def _layout(config: AtlasConfig) -> StorageLayout:
    return StorageLayout.of(config.storage.base_dir).ensure()


def _spec(config: AtlasConfig, batch_id: str) -> dict[str, Any]:
    path = batch_spec_path(config.state_dir, batch_id)
    if not path.exists():
        from atlasflow.intake.plan import write_batch_spec

        write_batch_spec(config, batch_id)
    return json.loads(path.read_text())


def _dataset(config: AtlasConfig, batch_id: str, dataset_id: str) -> Dataset | None:
    """The dataset's manifest row as frozen in the batch spec; None when it left the manifest."""
    for row in _spec(config, batch_id)["datasets"]:
        if row["dataset_id"] == dataset_id:
            return Dataset.from_dict(row)
    return None


def _quarantine(config: AtlasConfig, batch_id: str, dataset_id: str, stage: str, reason: str) -> QuarantineRecord:
    info = record_quarantine(config, batch_id, dataset_id, stage, reason)
    log.warning("quarantined %s at %s: %s", dataset_id, stage, reason)
    return info


def prepare_run(config: AtlasConfig) -> RunPrepared:
    """Validate the manifest, seal the plan, pin the vocabulary for every later batch.

    Raises
    ------
    VocabularyMismatchError
        ``genes.vocab_path`` is not the vocabulary pinned by this base_dir's first run; checked
        before the plan is extended, so a wrong config changes nothing.
    """
    pinned = pinned_vocab_path(config.state_dir)
    if (problem := vocabulary_mismatch(pinned, config.genes.vocab_path)) is not None:
        raise VocabularyMismatchError(problem)
    summary = freeze_plan(config)
    if not pinned.exists():
        Vocabulary.load(config.genes.vocab_path).save(pinned)
    return {**summary, "vocab_version": Vocabulary.load(pinned).version}  # type: ignore[typeddict-item]


@stage("admit")
def admit_batch(config: AtlasConfig, batch_id: str, *, owner: str, bind_pid: bool = False,
                trains: bool = True) -> AdmitResult:
    """Try to reserve the batch's footprint; batches are admitted in plan order.

    ``bind_pid`` ties the reservation to this process (runs outside Airflow: ``atlasflow dataset run``);
    ``trains=False`` reserves no model artefacts (a trial batch is never trained or integrated).

    Every attempt updates the batch's ``admit`` stage record, which spans the whole wait.
    Raises :class:`~atlasflow.storage.BudgetExceededError` when the batch can never fit.
    """
    spec = _spec(config, batch_id)
    if (done := batch_trained(config, batch_id)) is not None:
        return {"admitted": True, "batch_id": batch_id, "bytes": 0, "already_trained": True,
                "reason": f"{batch_id} was trained before ({done.get('checkpoint_dir')}): nothing to reserve"}
    from atlasflow.acquire.sizes import known_sizes

    # what killed tasks left (extractions, saves) would count against the budget for ever
    prune_stale_temps(Path(config.storage.base_dir))
    ledger = Ledger(config.storage)
    datasets = [Dataset.from_dict(d) for d in spec["datasets"]]
    index = spec["index"]
    # rows without expected_bytes: the size their source names (cached; asked once), else unknown_size_gb
    sizes = {k: p for k, p in known_sizes(config, datasets, probe=True).items() if p.bytes}
    footprint = batch_footprint(datasets, ledger, quant=config.quant,
                                content_lengths={k: int(p.bytes or 0) for k, p in sizes.items()},
                                size_sources={k: p.source for k, p in sizes.items()},
                                model=_model_artifacts(config, index) if trains else None, trains=trains)
    paths = [f"data/raw/{d.dataset_id}" for d in datasets] + [f"data/processed/{batch_id}",
                                                              f"models/checkpoints/{batch_id}",
                                                              f"models/integration/{batch_id}"]
    # the model artefacts travel with the model lane (only the batch next to train holds them)
    lane = int(footprint["model_artifacts"]["bytes"])
    admission = ledger.try_admit(batch_id, footprint["bytes"] - lane, paths=paths, owner=owner,
                                 after=make_batch_id(index - 1) if index > 0 else None, bind_pid=bind_pid,
                                 lane_bytes=lane)
    return {**admission.to_dict(), "footprint": footprint}  # type: ignore[typeddict-item]


def _model_artifacts(config: AtlasConfig, index: int) -> ModelArtifacts:
    """What batch ``index``'s model artefacts take (its checkpoint holds ``index + 1`` held-out sets)."""
    pinned = pinned_vocab_path(config.state_dir)
    vocab = Vocabulary.load(pinned if pinned.exists() else config.genes.vocab_path)
    return model_artifacts(config, len(vocab), batches=index + 1)


@stage("download")
def download_dataset(config: AtlasConfig, batch_id: str, dataset_id: str, *, final_try: bool) -> DownloadResult:
    """Fetch one dataset into ``data/raw/<id>``; permanent failures (and the last try's) quarantine it."""
    from atlasflow.acquire.fetch import FetchError, TransientFetchError, fetch_dataset

    dataset = _dataset(config, batch_id, dataset_id)
    if dataset is None:
        return _quarantine(config, batch_id, dataset_id, "download", "no longer in the manifest")
    layout = _layout(config)
    if batch_trained(config, batch_id) is not None:
        return {"dataset_id": dataset_id, "status": StepStatus.OK, "skipped": trained_skip(batch_id)}
    species, evidence = dataset_species(dataset.species, [])
    if species != "human":
        table, why_not = species_mapping_for(species, config.genes.species_mapping)
        if table is None:  # refused before a byte is fetched; process would refuse it anyway
            return _quarantine(config, batch_id, dataset_id, "download",
                               f"{dataset_id}: not human: {evidence} (manifest {config.manifest.path}); {why_not}")
    if (tombstone_path(config.state_dir, dataset_id).exists()
            and (layout.processed_dir(batch_id) / f"{dataset_id}.h5ad").exists()):
        return {"dataset_id": dataset_id, "status": StepStatus.OK, "skipped": SkipReason.ALREADY_PROCESSED}
    if dataset.is_reads:
        from atlasflow.acquire.quant import quantified

        if quantified(layout.raw_dir(dataset_id)) is not None:  # its FASTQ files are gone by design
            return {"dataset_id": dataset_id, "status": StepStatus.OK, "skipped": SkipReason.ALREADY_QUANTIFIED}
    from atlasflow.acquire.sizes import dataset_size, record_arrival

    expected, _ = dataset_size(config, dataset)  # what admission reserved for it (manifest, probe or default)
    cap = int(expected * 1.25) + 1_000_000
    Ledger(config.storage).heartbeat(batch_id)
    try:
        result = fetch_dataset(dataset, layout.raw_dir(dataset_id), config=config.download, max_bytes=cap,
                               accept_species=lambda organism: _refuse_species(config, organism))
    except TransientFetchError as exc:
        if not final_try:
            raise  # Airflow retries the task with exponential backoff
        return _quarantine(config, batch_id, dataset_id, "download", f"gave up after the last retry: {exc}")
    except FetchError as exc:
        return _quarantine(config, batch_id, dataset_id, "download", str(exc))
    # the fetched files are on disk and not yet processed: a peak worth sampling
    Ledger(config.storage).sample(f"downloaded {dataset_id}")
    done: Downloaded = {"dataset_id": dataset_id, "status": StepStatus.OK, "bytes": result.bytes,
                        "files": len(result.files), "seconds": round(result.seconds, 2),
                        "size_check": record_arrival(config, dataset, result.bytes)}
    if redirects := [f"{f.name}: {f.redirected_to}" for f in result.files if f.redirected_to]:
        done["redirects"] = redirects  # cross-host redirects download.redirect_hosts allowed: reported
    if result.skip_reasons:  # GEO files not fetched, and why (also in fetch.json): for the run report
        done["skipped_files"] = [f"{s.name}: {s.reason}" for s in result.skip_reasons]
    return done


def _refuse_species(config: AtlasConfig, organism: str) -> str | None:
    """None when a GEO sample of ``organism`` can be processed (human, or mapped), else why not."""
    species = normalize_species(organism) or "human"
    if species == "human":
        return None
    table, why_not = species_mapping_for(species, config.genes.species_mapping)
    return None if table is not None else f"not human ({organism}); {why_not}"


def run_quant(config: AtlasConfig, batch_id: str, dataset_id: str) -> QuantOutcome:
    """``kb count`` on one downloaded reads dataset (the part a SLURM job runs).

    Never raises for bad input: returns ``{"status": "ok", ...summary}`` or
    ``{"status": "failed", "reason": ...}`` for :func:`finish_quant`, which runs on the Airflow side
    (ledger, deletions, quarantine).
    """
    from atlasflow.acquire.quant import QuantError, quantify

    dataset = _dataset(config, batch_id, dataset_id)
    base = {"dataset_id": dataset_id, "batch_id": batch_id}
    if dataset is None:
        return {**base, "status": StepStatus.FAILED, "reason": "no longer in the manifest"}  # type: ignore[typeddict-item]
    layout = _layout(config)
    try:
        summary = quantify(layout.raw_dir(dataset_id), technology=dataset.technology,
                           config=config.quant, work_dir=layout.cache / "quant" / dataset_id)
    except QuantError as exc:
        return {**base, "status": StepStatus.FAILED, "reason": str(exc)}  # type: ignore[typeddict-item]
    return {**base, "status": StepStatus.OK, **summary}  # type: ignore[typeddict-item]


def finish_quant(config: AtlasConfig, batch_id: str, dataset_id: str, outcome: Mapping[str, Any]) -> QuantResult:
    """After :func:`run_quant`: delete the FASTQ files (the ledger records the bytes freed), or quarantine."""
    from atlasflow.acquire.quant import fastq_files

    layout = _layout(config)
    cleaner = Cleaner(Ledger(config.storage))
    # an outcome without a status (a job that wrote no result) is a failure too
    if outcome.get("status") != StepStatus.OK:
        cleaner.delete_raw(dataset_id, batch_id=batch_id)
        shutil.rmtree(layout.cache / "quant" / dataset_id, ignore_errors=True)
        return _quarantine(config, batch_id, dataset_id, "quant", str(outcome.get("reason")))
    freed = 0
    if config.quant.delete_fastq:
        for path in fastq_files(layout.raw_dir(dataset_id)):
            freed += cleaner.remove(path, "FASTQ quantified (counts kept)", batch_id=batch_id, dataset_id=dataset_id)
    keep = ("reads_processed", "reads_pseudoaligned", "percent_pseudoaligned", "barcodes", "genes", "seconds",
            "fastq_bytes", "technology", "technology_source")
    return {"dataset_id": dataset_id, "status": StepStatus.OK,
            "quant": {k: outcome.get(k) for k in keep},  # type: ignore[typeddict-item]
            "fastq_freed": freed}


def reads_to_quantify(config: AtlasConfig, batch_id: str, fetched: DownloadResult) -> bool:
    """Whether a download result is raw reads still to be quantified (else the quant task passes it on)."""
    if fetched["status"] != StepStatus.OK or _done_before(batch_id, fetched.get("skipped")):
        return False
    dataset = _dataset(config, batch_id, fetched["dataset_id"])
    return dataset is not None and dataset.is_reads


def quant_dataset_step(config: AtlasConfig, batch_id: str, fetched: DownloadResult) -> DownloadResult | QuantResult:
    """The quant task with the local backend: reads → counts → FASTQ deleted. Other datasets pass through."""
    if not reads_to_quantify(config, batch_id, fetched):
        return fetched
    Ledger(config.storage).heartbeat(batch_id)
    dataset_id = fetched["dataset_id"]
    return finish_quant(config, batch_id, dataset_id, run_quant(config, batch_id, dataset_id))


def quant_job(config: AtlasConfig, batch_id: str, dataset_id: str, *, python: str | None = None) -> QuantJob:
    """The ``atlasflow quant run`` command line for one dataset, and the SLURM settings for it (CPU partition)."""
    import dataclasses

    from atlasflow.slurm import format_minutes

    _layout(config)  # the job's folders exist before the job does
    config_file = write_json_atomic(jobs_dir(config.state_dir, batch_id) / f"quant-{dataset_id}.config.json",
                                    config.to_dict())
    cmd = [python or sys.executable, "-m", "atlasflow.cli", "quant", "run", "--config", str(config_file),
           "--batch-id", batch_id, "--dataset-id", dataset_id]
    slurm = dataclasses.replace(config.slurm, partition=config.quant.slurm_partition or config.slurm.partition,
                                gpus=0, nodes=1, ranks_per_node=1,  # kb count: one process, never DDP
                                cpus=config.quant.threads, mem_gb=config.quant.slurm_mem_gb,
                                time_limit=format_minutes(int(config.quant.timeout_s // 60) + 1))
    return {"command": cmd, "log_dir": str(jobs_dir(config.state_dir, batch_id)), "slurm": slurm}


def process_dataset_step(config: AtlasConfig, batch_id: str,
                         fetched: DownloadResult | QuantResult) -> ProcessResult:
    """Read → QC → harmonise one downloaded dataset; raw files are deleted once it is processed."""
    if fetched["status"] != StepStatus.OK:
        # quarantined at download: nothing to process, nothing to record (so no @stage on this function)
        return fetched  # type: ignore[return-value]
    return _process_dataset(config, batch_id, fetched)


@stage("process", dataset_id=lambda args: args["fetched"]["dataset_id"])
def _process_dataset(config: AtlasConfig, batch_id: str, fetched: Downloaded | Quantified) -> ProcessResult:
    from atlasflow.prep.process import DatasetQuarantined, process_dataset
    from atlasflow.storage.cleanup import file_sha256

    dataset_id = fetched["dataset_id"]
    layout = _layout(config)
    out = layout.processed_dir(batch_id) / f"{dataset_id}.h5ad"
    cleaner = Cleaner(Ledger(config.storage))
    tomb = cleaner.tombstone(dataset_id)
    if fetched.get("skipped") == trained_skip(batch_id):
        # its processed file may be gone (cleanup); the tombstone still has the counts for the summary
        return {"dataset_id": dataset_id, "status": StepStatus.OK, "path": str(out),
                "cells_after": (tomb or {}).get("cells_after"), "skipped": trained_skip(batch_id)}
    if tomb is not None and out.exists() and tomb.get("processed_sha256") == file_sha256(out):
        return {"dataset_id": dataset_id, "status": StepStatus.OK, "path": str(out), "cells_after": tomb["cells_after"],
                "skipped": SkipReason.ALREADY_PROCESSED}
    dataset = _dataset(config, batch_id, dataset_id)
    assert dataset is not None  # download quarantined it otherwise
    try:
        summary = process_dataset(layout.raw_dir(dataset_id), dataset, config=config, out_path=out,
                                  vocab=run_vocabulary(config), cache_dir=layout.cache,
                                  max_bytes=_reserved_bytes(config, dataset))
    except DatasetQuarantined as exc:
        cleaner.delete_raw(dataset_id, batch_id=batch_id)
        return _quarantine(config, batch_id, dataset_id, "process", exc.reason)
    fetch_info = layout.raw_dir(dataset_id) / "fetch.json"
    checksums = json.loads(fetch_info.read_text())["files"] if fetch_info.exists() else []
    ledger = Ledger(config.storage)
    ledger.record_expansion(dataset_id, summary["format"], summary["raw_bytes"], summary["processed_bytes"])
    from atlasflow.acquire.quant import quantified

    reads_info: dict[str, Any] = {}
    if dataset.is_reads and (quant := quantified(layout.raw_dir(dataset_id))):
        # what admission needs for the next reads sample: processed bytes per FASTQ byte
        ledger.record_expansion(dataset_id, "fastq", quant.get("fastq_bytes", 0), summary["processed_bytes"])
        reads_info = {"technology": quant.get("technology"), "technology_source": quant.get("technology_source"),
                      "detection": quant.get("detection")}
    cleaner.write_tombstone(dataset_id, {
        "batch_id": batch_id, "downloads": [{"name": f["name"], "sha256": f["sha256"], "bytes": f["bytes"]} for f in checksums],
        "processed_sha256": file_sha256(out), "cells_before": summary["cells_before"], "cells_after": summary["cells_after"],
        "genes_after": summary["genes_after"], "coverage": summary["coverage"], "format": summary["format"],
        "removed": summary["removed"], "raw_bytes": summary["raw_bytes"], "processed_bytes": summary["processed_bytes"],
        "qc_histograms": summary["histograms"],  # for the run report, after the processed file is gone
        **reads_info,
    })
    # raw and processed files are both on disk now: this dataset's peak
    Ledger(config.storage).sample(f"processed {dataset_id}")
    cleaner.delete_raw(dataset_id, batch_id=batch_id)
    keep = ("dataset_id", "status", "path", "format", "raw_bytes", "processed_bytes", "cells_before", "cells_after",
            "genes_after", "removed", "coverage", "strategy", "non_integer", "seconds")
    return {k: summary[k] for k in keep}  # type: ignore[return-value]


def _reserved_bytes(config: AtlasConfig, dataset: Dataset) -> int:
    """What admission reserved for the dataset (download + processed output, + kb count's work space):
    the most any of its files may extract or decompress to."""
    from atlasflow.acquire.sizes import known_sizes

    # the size admission used (state/sizes.json; no network here), else the manifest's / the default
    size = known_sizes(config, [dataset], probe=False).get(dataset.dataset_id)
    lengths = {dataset.dataset_id: int(size.bytes)} if size is not None and size.bytes else None
    row = batch_footprint([dataset], Ledger(config.storage), quant=config.quant,
                          content_lengths=lengths)["datasets"][0]
    return int(row["raw"] + row["processed"] + row.get("quant_work", 0))


def _previous(root: Path, batch_id: str) -> Path | None:
    """The newest finished folder under ``root`` from a batch before ``batch_id``."""
    done = sorted(p for p in root.glob("batch_*") if p.name < batch_id and (p / "result.json").exists())
    return done[-1] if done else None


def usable_datasets(processed: Sequence[ProcessResult | None]) -> list[str]:
    """The ids of a batch's processed datasets that can be integrated and trained on (not quarantined).

    ``processed`` holds one result per dataset; a mapped task that left no XCom gives None.
    """
    return [p["dataset_id"] for p in processed if p and p["status"] == StepStatus.OK]


@stage("integrate")
def integrate_batch_step(config: AtlasConfig, batch_id: str, processed: list[ProcessResult | None]) -> Integrated:
    """Integrate the batch's usable datasets (scVI, or scArches onto the previous batch's model).

    ``processed`` holds one result per dataset; a mapped task that left no XCom gives None.
    """
    done_ok = [p for p in processed if p]
    ok = usable_datasets(processed)
    quarantined = {p["dataset_id"]: p.get("reason") for p in done_ok if p["status"] != StepStatus.OK}
    base = {"batch_id": batch_id, "datasets": ok, "quarantined": quarantined}
    if not ok:
        return {**base, "status": StepStatus.SKIPPED,  # type: ignore[typeddict-item]
                "reason": f"no usable dataset in {batch_id}: " + "; ".join(f"{k}: {v}" for k, v in quarantined.items())}
    layout = _layout(config)
    # train runs beside integrate, so "trained" alone does not say this batch was integrated: only a batch
    # whose processed cells are gone (an earlier run trained and cleaned it up) has nothing left to integrate
    if ((done := batch_trained(config, batch_id)) is not None
            and not any(layout.processed_dir(batch_id).glob("*.h5ad"))):
        return {**base, "status": StepStatus.OK, "integration": None,  # type: ignore[typeddict-item]
                "skipped": trained_skip(batch_id), "checkpoint_dir": done.get("checkpoint_dir")}
    if not config.integration.enabled:
        return {**base, "status": StepStatus.OK, "integration": None}  # type: ignore[typeddict-item]
    from atlasflow.model.integrate import integrate_batch

    # with local training a training process runs beside this one on the same cores
    threads = threads_for(config.integration.threads, sharing=2 if config.training.backend == "local" else 1)
    result = integrate_batch(layout.processed_dir(batch_id), layout.integration / batch_id, config=config.integration,
                             previous=_previous(layout.integration, batch_id), threads=threads)
    return {**base, "status": StepStatus.OK,  # type: ignore[typeddict-item]
            "integration": {k: result[k] for k in result if k != "datasets"}}


def training_job(config: AtlasConfig, batch_id: str, *, previous_checkpoint: str | None,
                 python: str | None = None) -> TrainingJob:
    """The ``atlasflow train`` command line for a batch, run as-is by either backend.

    The config the job receives is this run's effective config, written next to the
    checkpoints. ``python`` is the interpreter on the machine that runs the job (a cluster
    node's env); by default this one's, which suits a shared filesystem and the local backend.
    With ``retrain.train_on_pseudo_labels`` on, the command names the retraining set
    (``<base_dir>/outputs/retrain/retrain.csv``) as ``--pseudo-labels``.
    Returns ``{"command": [...], "checkpoint_dir": ..., "log_dir": ...}``.
    """
    layout = _layout(config)
    out = layout.checkpoints / batch_id
    previous = Path(previous_checkpoint) if previous_checkpoint else _previous(layout.checkpoints, batch_id)
    # a checkpoint atlas_retrain did not promote is not built upon: resume from production instead
    previous = resume_checkpoint(config, previous)
    if previous is not None and not (previous / "model.pt").exists():
        raise FileNotFoundError(
            f"{batch_id} should resume from {previous}, which is gone; cleanup keeps the newest "
            f"storage.keep_checkpoints checkpoints, so restore it or clear the batch that produced it")
    config_file = write_json_atomic(layout.checkpoints / f"{batch_id}.config.json", config.to_dict())
    cmd = [python or sys.executable, "-m", "atlasflow.cli", "train", "--config", str(config_file),
           "--batch-dir", str(layout.processed_dir(batch_id)), "--out", str(out),
           "--vocab", str(pinned_vocab_path(config.state_dir))]
    if previous is not None:
        cmd += ["--resume-from", str(previous)]
    if config.retrain.train_on_pseudo_labels:
        # derived from base_dir, never from a run's conf: the job reads what atlas_retrain last built
        cmd += ["--pseudo-labels", str(retrain_set_path(config))]
    return {"command": cmd, "checkpoint_dir": str(out), "log_dir": str(jobs_dir(config.state_dir, batch_id))}


@stage("train")
def train_batch_step(config: AtlasConfig, batch_id: str, *, previous_checkpoint: str | None,
                     tag: str = "local", attempt: int = 1) -> TrainResult | RecordAlso[TrainResult]:
    """Train the batch with the local backend: the SLURM job's command, run as a child process.

    A batch trained before (by any run) is not trained again; its recorded result is returned.
    """
    if (done := batch_trained(config, batch_id)) is not None:
        log.info("%s already trained: %s", batch_id, done.get("checkpoint_dir"))
        # the stage record notes the skip; XCom stays the recorded result, unchanged
        return RecordAlso(record_trained(config, batch_id, done), {"skipped": trained_skip(batch_id)})
    return _train_batch(config, batch_id, previous_checkpoint=previous_checkpoint, tag=tag, attempt=attempt)


def _train_batch(config: AtlasConfig, batch_id: str, *, previous_checkpoint: str | None, tag: str,
                 attempt: int) -> TrainResult:
    from atlasflow.slurm import JobSpec, JobState, distributed_command
    from atlasflow.slurm.backend import LocalBackend

    job = training_job(config, batch_id, previous_checkpoint=previous_checkpoint)
    ranks = config.training.local_ranks
    command = distributed_command(job["command"], ranks_per_node=ranks)  # DDP ranks here
    # integrate runs beside training on this machine: each rank gets its share of half the CPUs
    threads = threads_for(config.training.threads, sharing=2 * ranks)
    spec = JobSpec(dataset_id="train", batch_id=batch_id, command=tuple(command), output_dir=job["log_dir"],
                   tag=tag, attempt=attempt, env={"OMP_NUM_THREADS": str(threads)})
    Ledger(config.storage).heartbeat(batch_id)
    log.info("running %s", " ".join(job["command"]))
    started = time.time()
    ran = LocalBackend().run(spec, timeout_s=config.training.timeout_s)
    record_job(config.state_dir, batch_id, {
        "backend": "local", "job_id": ran.info.job_id, "state": ran.info.state.value, "attempt": attempt, "tag": tag,
        "exit_code": ran.info.exit_code, "reason": ran.info.reason, "submitted": started, "ended": time.time(),
        "stdout": spec.stdout_path, "stderr": spec.stderr_path})
    stderr = Path(spec.stderr_path).read_text(errors="replace") if Path(spec.stderr_path).exists() else ""
    if stderr:
        log.info("training log (tail, full log %s):\n%s", spec.stderr_path, stderr[-4000:])
    if ran.info.state is not JobState.COMPLETED or ran.result is None:
        raise RuntimeError(f"atlasflow train for {batch_id}: {ran.info.describe()}: {stderr.strip()[-1500:]}")
    Ledger(config.storage).sample(f"trained {batch_id}")
    return record_trained(config, batch_id, ran.result)


def slurm_training_submitted(config: AtlasConfig, batch_id: str) -> None:
    """Open the batch's ``train`` stage record when its SLURM job is submitted (or adopted)."""
    stage_started(config.state_dir, "train", batch_id)


def slurm_training_finished(config: AtlasConfig, batch_id: str, event: dict[str, Any]) -> None:
    """Record the SLURM job (id, state, exit code) and close the ``train`` stage from the trigger's final event."""
    record_job(config.state_dir, batch_id, {
        "backend": "slurm", "job_id": event.get("job_id"), "state": event.get("state") or event.get("status"),
        "exit_code": event.get("exit_code"), "reason": event.get("reason"), "message": event.get("message"),
        "ended": time.time()})
    path = stage_path(config.state_dir, "train", batch_id)
    record = json.loads(path.read_text()) if path.exists() else None
    if record is None or record.get("status") != StageStatus.RUNNING:
        record = stage_started(config.state_dir, "train", batch_id)
    ok = event.get("status") == "success" and event.get("result") is not None
    stage_ended(config.state_dir, record, status=StageStatus.OK if ok else StageStatus.FAILED, result=event.get("result") or {},
                error=None if ok else str(event.get("message") or event.get("status")))
    if ok:
        Ledger(config.storage).sample(f"trained {batch_id}")


@stage("cleanup")
def cleanup_batch(config: AtlasConfig, batch_id: str) -> CleanupResult:
    """The cleanup policy for a finished (or failed) batch; releases its reservation (and samples usage)."""
    spec = _spec(config, batch_id)
    ids = [d["dataset_id"] for d in spec["datasets"]]
    # what this batch's killed tries left (a job config, a save) goes now, not at a later run's admission
    prune_stale_temps(Path(config.storage.base_dir))
    trained = batch_trained(config, batch_id)
    cleaner = Cleaner(Ledger(config.storage))
    if trained is None:
        # the batch did not train: keep processed files for a retry, free only raw data and cache
        freed = {"raw": sum(cleaner.delete_raw(d, batch_id=batch_id) for d in ids), "cache": cleaner.clear_cache()}
        released = Ledger(config.storage).release(batch_id)
        return {"batch_id": batch_id, "trained": False, "freed_bytes": freed, "released": released}
    record_trained(config, batch_id, trained)  # before old checkpoints (maybe this one's) are pruned
    return {**cleaner.finish_batch(batch_id, ids), "trained": True}  # type: ignore[typeddict-item]


def load_batch_ids(config: AtlasConfig) -> list[str]:
    """The saved plan's batch ids, in order; none before the plan is frozen."""
    plan = load_plan(config.plan_path)
    return [b.batch_id for b in plan.batches] if plan else []

