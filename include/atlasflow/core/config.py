"""Typed pipeline configuration.

One frozen dataclass per concern, grouped under :class:`AtlasConfig`. A config file (YAML or
JSON) only needs the keys it changes; everything else takes the defaults below: a 550 GB budget
split 200/200/100/50 GB across data, models, cache and outputs, and batches of 3 datasets.

Unknown keys, wrong types and out-of-range values are errors that name the dotted key, so a
typo never silently falls back to a default. Airflow Params override the file through
:func:`load_config`'s ``overrides`` (dotted keys or nested mappings).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from atlasflow.core.text import control_character

__all__ = [
    "AtlasConfig",
    "ConfigError",
    "DownloadConfig",
    "GenesConfig",
    "IntegrationConfig",
    "ManifestConfig",
    "MlflowConfig",
    "ModelConfig",
    "NotifyConfig",
    "PlanConfig",
    "QCConfig",
    "QuantConfig",
    "ReadersConfig",
    "RetrainConfig",
    "SlurmConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainingConfig",
    "config_reference",
    "load_config",
    "run_overridable_keys",
    "run_override_problems",
]

ENV_CONFIG_PATH = "ATLASFLOW_CONFIG"
GB = 1_000_000_000  # storage sizes are decimal, as disk vendors and `df -H` count them


class ConfigError(ValueError):
    """A configuration file or override is invalid; ``problems`` lists every reason."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems))


def _opt(default: Any, help: str, *, min: float | None = None, max: float | None = None) -> Any:
    """A dataclass field with its help text and allowed range (used for validation and docs)."""
    return field(default=default, metadata={"help": help, "min": min, "max": max})


@dataclass(frozen=True)
class StorageConfig:
    """Where the pipeline keeps its files and how many bytes it may use."""

    base_dir: str = _opt("./atlasflow_data", "Root of the data/, models/, cache/, outputs/ areas and the ledger.")
    max_storage_gb: float = _opt(550.0, "Hard disk budget for everything under base_dir, in GB (10^9 bytes).", min=0.001)
    data_gb: float = _opt(200.0, "Allocation of the data area (raw downloads + processed files), GB.", min=0)
    models_gb: float = _opt(200.0, "Allocation of the models area (checkpoints, embeddings), GB.", min=0)
    cache_gb: float = _opt(100.0, "Allocation of the cache area (temporary processing), GB.", min=0)
    outputs_gb: float = _opt(50.0, "Allocation of the outputs area (reports, final results), GB.", min=0)
    keep_checkpoints: int = _opt(3, "How many most recent batch checkpoints to keep; older ones are deleted.", min=1)
    min_free_gb: float = _opt(
        5.0, "Free space that must remain on the volume after a reservation (statvfs), GB.", min=0
    )
    reservation_lease_hours: float = _opt(
        48.0, "A batch reservation not renewed for this long is treated as abandoned and reclaimed.", min=0.001
    )
    unknown_size_gb: float = _opt(
        10.0, "Download size assumed for a dataset with no expected_bytes and no Content-Length, GB.", min=0
    )
    checkpoint_gb: float | None = _opt(
        None, "Override of the disk reserved per batch for its model artifacts, GB. Empty (default): computed "
        "from the model (atlasflow.model.sizing.model_artifacts): the checkpoint (weights, AdamW's two moments, "
        "gene statistics, replay reservoir, held-out sets) twice (the new copy is written beside the previous "
        "one) plus the scVI model, its scoring pool and latent.", min=0)
    default_expansion: float = _opt(
        2.0, "Processed bytes per downloaded byte assumed for a format until one has been measured.", min=0
    )
    admission_poke_s: float = _opt(
        30.0, "How often a waiting batch asks the ledger for room (reschedule mode: no worker slot held between).",
        min=0.5)
    admission_max_wait_s: float = _opt(
        300.0, "The wait between asks grows exponentially up to this.", min=0.5)
    ledger_url: str | None = _opt(
        None, "Server database for the storage ledger (postgresql+psycopg2://user:password@host:port/db; Airflow's "
        "metadata server may host it): needed when workers on several hosts share base_dir (docs/deploy.md). "
        "Empty: the SQLite file state/ledger.sqlite under base_dir, for one host.")
    ledger_url_env: str | None = _opt(
        "ATLASFLOW_LEDGER_URL", "Environment variable read for the ledger URL when ledger_url is empty (keeps the "
        "password out of files).")
    ui_permission: Literal["dag_run:GET", "dag_run:POST", "dag:GET", "pool:GET", "variable:GET", "connection:GET",
                           "configuration:GET", "authenticated"] = _opt(
        "dag_run:GET", "What the Airflow UI's storage page requires of a user, asked of Airflow's auth manager "
        "(resource:method; with FAB, the roles holding that permission): by default reading DAG runs (Viewer and "
        "up); `authenticated`: any logged-in user. Read by the api-server at start.")

    @property
    def max_storage_bytes(self) -> int:
        return int(self.max_storage_gb * GB)

    def area_bytes(self) -> dict[str, int]:
        """Allocation per area, in bytes."""
        return {
            "data": int(self.data_gb * GB),
            "models": int(self.models_gb * GB),
            "cache": int(self.cache_gb * GB),
            "outputs": int(self.outputs_gb * GB),
        }

    def _check(self) -> list[str]:
        total = self.data_gb + self.models_gb + self.cache_gb + self.outputs_gb
        if total > self.max_storage_gb + 1e-9:
            return [
                f"storage: the area allocations add up to {total:g} GB, more than "
                f"max_storage_gb={self.max_storage_gb:g}"
            ]
        return []


@dataclass(frozen=True)
class ManifestConfig:
    """The dataset list (Excel or CSV) and how to read it."""

    path: str | None = _opt(None, "Path of the manifest (.xlsx or .csv). Relative paths are taken from the config file's folder.")
    sheet: str | None = _opt(None, "Worksheet to read from an .xlsx manifest; the first sheet when empty.")
    allowed_file_root: str | None = _opt(
        None, "Folder below which file:// URLs are accepted; file:// is refused when empty."
    )


@dataclass(frozen=True)
class PlanConfig:
    """How datasets are grouped into batches."""

    batch_size: int = _opt(3, "Datasets per batch.", min=1, max=1000)
    max_batch_gb: float | None = _opt(
        None, "Also close a batch before its expected size would pass this many GB.", min=0.001
    )
    schedule: str | None = _opt(
        "@daily", "When atlas_ingest runs by itself (cron or preset; empty: only when triggered). Runs are "
        "idempotent: a run with no new manifest rows does no expensive work, so this is how new rows get picked up; "
        "it also makes `airflow backfill create` possible.")
    pipelining: bool = _opt(
        True, "Batch i+1 downloads and processes while batch i trains (as far as the budget allows). False: each "
        "batch starts only after the previous one is cleaned up (for comparison and for the smallest disks).")

    @property
    def max_batch_bytes(self) -> int | None:
        return None if self.max_batch_gb is None else int(self.max_batch_gb * GB)


@dataclass(frozen=True)
class DownloadConfig:
    """Fetching datasets."""

    retries: int = _opt(3, "Airflow retries of a failed download task.", min=0, max=20)
    retry_delay_s: float = _opt(30.0, "First retry delay; doubles each try (exponential backoff).", min=0)
    max_retry_delay_s: float = _opt(900.0, "Longest delay between download retries.", min=0)
    timeout_s: float = _opt(1800.0, "Time limit of one download task (30 min).", min=1)
    geo_base_url: str = _opt("https://ftp.ncbi.nlm.nih.gov/geo", "Base URL of the GEO FTP-over-HTTPS mirror.")
    geo_query_url: str = _opt(
        "https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi",
        "GEO's accession query; a GSM row's organism is read from its SOFT record here (a series' from its "
        "family SOFT under geo_base_url) when the manifest gives no species.")
    attempts: int = _opt(4, "HTTP attempts per file inside one task (resets, 5xx, timeouts), with backoff.", min=1, max=20)
    backoff_s: float = _opt(2.0, "First in-task retry delay; doubles per attempt (a Retry-After header wins).", min=0)
    read_timeout_s: float = _opt(60.0, "Socket timeout for connecting and for each read.", min=1)
    max_retry_after_s: float = _opt(
        300.0, "Longest wait a server's Retry-After header may ask for, s (clamped; a negative, nan or garbage "
        "value means the usual backoff).", min=1)
    redirect_hosts: str = _opt(
        "ncbi.nlm.nih.gov,ebi.ac.uk,ddbj.nig.ac.jp,cellxgene.cziscience.com",
        "Comma-separated hosts (subdomains included) a download may be redirected to from another host; the hosts "
        "of geo_base_url, geo_query_url, ena_base_url and ena_fastq_base_url are added; `*` allows any. A redirect "
        "to the same host is always followed; a cross-host one is logged and recorded in fetch.json.")
    sra_command: str = _opt(
        "fasterq-dump --split-files --include-technical --outdir {outdir} {accession}",
        "Command run for sra rows; split like a shell line, then {accession}/{outdir} are filled in per "
        "argument (never through a shell).",
    )
    sra_prefetch_command: str = _opt(
        "prefetch --max-size u --output-directory {outdir} {accession}",
        "Run before sra_command with the sra-tools resolver (empty: fasterq-dump fetches by itself); filled in "
        "like sra_command, {accession} then names the prefetched run for sra_command.")
    sra_resolver: Literal["auto", "sra-tools", "ena"] = _opt(
        "auto", "How sra rows become FASTQ files: `sra-tools` (prefetch + fasterq-dump), `ena` (ENA's FASTQ links), "
        "`auto` (sra-tools when prefetch and fasterq-dump are installed, else ENA).")
    ena_base_url: str = _opt(
        "https://www.ebi.ac.uk/ena/portal/api", "ENA Portal API base; its filereport lists a run's FASTQ files.")
    size_probe: bool = _opt(
        True, "Ask a row's source for its size before admission when the manifest has no expected_bytes (HEAD or a "
        "ranged GET, GEO's listing and filelist.txt, ENA's fastq_bytes); cached in state/sizes.json. Off: "
        "storage.unknown_size_gb for every such row.")
    size_probe_timeout_s: float = _opt(15.0, "Timeout of each size request (a server that does not answer leaves "
                                       "the size unknown).", min=0.1, max=600)
    ena_fastq_base_url: str | None = _opt(
        None, "Fetch ENA's FASTQ links from this base URL instead of their own host (a mirror; tests use a local "
        "server); empty: https:// on the host ENA names.")
    cellxgene_api_url: str = _opt(
        "https://api.cellxgene.cziscience.com/curation/v1",
        "CELLxGENE Discover's public Curation API (v1); `cellxgene` rows and `atlasflow manifest from-cellxgene` "
        "resolve dataset ids to their H5AD asset through it.")


@dataclass(frozen=True)
class QuantConfig:
    """Raw reads (sra rows, FASTQ URLs) → counts with kallisto|bustools (`kb count`)."""

    backend: Literal["local", "slurm"] = _opt(
        "local", "`local` runs kb count in the quant task; `slurm` submits it as a job (CPU partition, slurm.* "
        "connection) through the same job operator as training.")
    index: str | None = _opt(
        None, "kallisto index (`atlasflow quant ref` builds one from genome FASTA + GTF). Required for FASTQ rows.")
    t2g: str | None = _opt(None, "Transcript-to-gene map written next to the index by `atlasflow quant ref`.")
    onlist: str | None = _opt(
        None, "Barcode on-list for 10x chemistries; empty: the list kb-python ships for the chemistry.")
    onlist_10xv2: str | None = _opt(
        None, "Barcode on-list of 10x v2 (kb count -w for it, and chemistry detection of rows without a technology); "
        "empty: quant.onlist for kb count, kb-python's list (737K-august-2016) for detection.")
    onlist_10xv3: str | None = _opt(
        None, "Barcode on-list of 10x v3, like quant.onlist_10xv2; empty: quant.onlist for kb count, kb-python's "
        "list (3M-february-2018) for detection.")
    detect_reads: int = _opt(
        10_000, "Rows without a technology: R1 reads sampled to detect the chemistry (read length, share of barcodes "
        "on each on-list, as Cell Ranger's --chemistry auto).", min=100)
    detect_min_share: float = _opt(
        0.1, "Chemistry detection: the winning chemistry needs at least this share of sampled barcodes on its "
        "on-list; below it the sample is quarantined with the shares found.", min=0, max=1)
    detect_margin: float = _opt(
        1.5, "Chemistry detection: the winner's on-list share must be this many times the runner-up's (else the "
        "sample is undecidable and quarantined).", min=1)
    threads: int = _opt(2, "kb count -t.", min=1)
    memory_gb: float = _opt(2.0, "kb count -m (sorting memory), GB.", min=0.1)
    timeout_s: float = _opt(600.0, "Time limit of one quantification (10 min).", min=1)
    delete_fastq: bool = _opt(True, "Delete a sample's FASTQ files as soon as its quantification succeeded.")
    work_factor: float = _opt(
        1.0, "Disk kb count needs while it runs (BUS files, sorted copies, matrices) per FASTQ byte; part of a "
        "FASTQ sample's reservation.", min=0)
    work_fixed_gb: float = _opt(
        0.15, "Fixed disk per sample while kb count runs (it copies the 10x on-list, ~115 MB, next to its output).",
        min=0)
    index_gb: float = _opt(
        4.0, "Index size assumed for the reservation when quant.index does not exist yet, GB.", min=0)
    slurm_partition: str | None = _opt(None, "backend slurm: the CPU partition (sbatch --partition).")
    slurm_mem_gb: float = _opt(8.0, "backend slurm: sbatch --mem for a quantification job, GB.", min=0.001)


@dataclass(frozen=True)
class ReadersConfig:
    """Bounds on what a compressed count table (.csv/.tsv/.mtx/.rds .gz) may inflate to in memory.

    Its text goes to a parser, not to disk, so the disk reservation does not bound it (archives
    extracted to disk still are). The tighter of the two limits applies per file.
    """

    max_decompressed_gb: float = _opt(
        10.0, "Most bytes one gzipped table (csv/tsv/mtx/rds, barcodes/features) may decompress to, GB. Its "
        "text is parsed in memory (a dense CSV takes several times its text in RAM), so raise it only on "
        "workers with the memory for it.", min=0.000001)
    max_expansion_ratio: float = _opt(
        200.0, "Most decompressed bytes per compressed byte of such a file. Real count tables inflate 3.5-30x "
        "(up to ~130x for a full gene list that is mostly zero rows); gzip bombs ~1000x.", min=1)


@dataclass(frozen=True)
class QCConfig:
    """Cell and gene filters applied before harmonisation (scanpy)."""

    min_genes: int = _opt(200, "Drop cells with fewer detected genes.", min=0)
    max_genes: int | None = _opt(None, "Drop cells with more detected genes (doublet guard).", min=1)
    min_counts: int = _opt(0, "Drop cells with fewer total counts.", min=0)
    min_cells: int = _opt(3, "Drop genes detected in fewer cells.", min=0)
    max_counts: int | None = _opt(None, "Drop cells with more total counts.", min=1)
    max_pct_mito: float = _opt(20.0, "Drop cells whose mitochondrial share of counts exceeds this percent.", min=0, max=100)
    target_sum: float = _opt(10_000.0, "Counts per cell after normalize_total.", min=1)
    n_top_genes: int = _opt(2000, "Highly variable genes flagged in var['highly_variable'].", min=1)
    strategy: Literal["auto", "in_memory", "chunked"] = _opt(
        "auto", "auto picks in_memory when the matrix fits comfortably in available RAM, else chunked."
    )
    chunk_cells: int = _opt(10_000, "Cells per chunk in the chunked strategy.", min=100)
    memory_fraction: float = _opt(
        0.5, "auto: share of available RAM a dataset's in-memory QC may plan to use before going chunked.",
        min=0.01, max=1,
    )
    min_vocab_coverage: float = _opt(
        0.5, "Quarantine a dataset whose genes cover less than this share of the vocabulary.", min=0, max=1
    )
    nice: int = _opt(
        10, "OS priority increment (nice) of the worker's process and quant tasks, which run many at once and "
        "wait for nothing downstream: where training runs on the same machine (local backend), the serial "
        "train and integrate chains, which every later batch waits for, get the cores first. 0 leaves it.",
        min=0, max=19,
    )


@dataclass(frozen=True)
class GenesConfig:
    """The shared gene vocabulary every dataset is mapped onto."""

    vocab_path: str | None = _opt(
        None,
        "Vocabulary: builtin:human_grch38_ens100 (19,927 human protein-coding genes with Ensembl ids and HGNC "
        "synonyms; the default when empty), builtin:pbmc68k (765 genes, for the demo and tests only), or a file "
        "(TSV with symbol[,gene_id,previous,aliases] columns, or JSON). The first run pins it in "
        "state/vocab.json under storage.base_dir; a different one later is an error.",
    )
    species_mapping: str | None = _opt(
        None,
        "Ortholog table for non-human datasets: a TSV/CSV whose header is mouse_symbol, human_symbol (rat_symbol, "
        "… for another species). Datasets of that species are mapped through it, genes it lacks left out; without "
        "it (default), a dataset whose manifest species is not human or whose symbols look like mouse (Actb) is "
        "quarantined.",
    )


@dataclass(frozen=True)
class IntegrationConfig:
    """Per-batch integration with scVI; later batches extend the previous model by scArches surgery."""

    enabled: bool = _opt(True, "Run scVI/scArches on every batch (the latent is saved and scored).")
    max_epochs: int = _opt(20, "scVI epochs for the first batch; query (surgery) training uses the same.", min=1)
    n_latent: int = _opt(10, "Latent dimensions.", min=2)
    n_layers: int = _opt(2, "Encoder/decoder layers.", min=1)
    n_genes: int = _opt(2000, "Genes used: the most often highly variable across the batch's datasets.", min=10)
    seed: int = _opt(0, "scvi-tools seed.", min=0)
    threads: int | None = _opt(
        None, "CPU threads of the scVI step (torch.set_num_threads); empty: half the worker's CPUs with "
        "training.backend local (a training process runs beside it), else all of them.", min=1, max=1024)


@dataclass(frozen=True)
class SlurmConfig:
    """Submitting training to a SLURM cluster over SSH."""

    conn_id: str = _opt("slurm_ssh", "Airflow SSH connection to the cluster's login node.")
    partition: str | None = _opt(None, "sbatch --partition.")
    account: str | None = _opt(None, "sbatch --account.")
    qos: str | None = _opt(None, "sbatch --qos.")
    time_limit: str = _opt("04:00:00", "sbatch --time (HH:MM:SS or D-HH:MM:SS).")
    mem_gb: float = _opt(32.0, "sbatch --mem, GB.", min=0.001)
    cpus: int = _opt(4, "sbatch --cpus-per-task.", min=1)
    gpus: int = _opt(1, "sbatch --gres=gpu:N per node (0 for a CPU-only partition).", min=0)
    nodes: int = _opt(
        1, "sbatch --nodes: training runs data-parallel (DDP) over nodes × ranks_per_node ranks, one torchrun per "
        "node started by srun (c10d rendezvous on the first node).", min=1, max=1024)
    ranks_per_node: int | None = _opt(
        None, "Training processes (DDP ranks) per node; empty: one per GPU (slurm.gpus), 1 on a CPU partition. Set "
        "it on a CPU partition to train with several gloo ranks per node.", min=1, max=64)
    rdzv_port: int = _opt(29500, "Port of torchrun's c10d rendezvous on the first node (multi-node jobs only).",
                          min=1024, max=65535)
    constraint: str | None = _opt(None, "sbatch --constraint.")
    remote_workdir: str | None = _opt(None, "Working folder on the cluster; base_dir when empty (shared filesystem).")
    env_activate: str | None = _opt(
        None, "Path of the cluster-side venv or conda env to activate before `atlasflow train`."
    )
    python: str | None = _opt(
        None, "Python that runs `atlasflow train` on the cluster; empty: `python` of env_activate when set, else the "
        "Airflow worker's own interpreter (a shared filesystem, as in the local test cluster).")

    retry_mem_factor: float = _opt(1.5, "On retry after OUT_OF_MEMORY, multiply --mem by this.", min=1)
    retry_time_factor: float = _opt(1.5, "On retry after TIMEOUT, multiply --time by this.", min=1)
    poll_min_s: float = _opt(5.0, "First poll interval; doubles per unchanged poll.", min=0.1)
    poll_max_s: float = _opt(300.0, "Longest poll interval.", min=0.1)
    lost_grace_s: float = _opt(600.0, "A job absent from squeue, scontrol and sacct is LOST only after this.", min=0)
    transient_retries: int = _opt(5, "Consecutive transient SSH/slurmctld errors tolerated while polling.", min=0)

    def ranks(self) -> int:
        """DDP ranks per node: ``ranks_per_node``, else one per GPU, else 1."""
        return self.ranks_per_node or max(self.gpus, 1)

    @property
    def remote_python(self) -> str | None:
        """The interpreter a job runs with: ``python``, else ``python`` of env_activate, else None (this one's)."""
        return self.python or ("python" if self.env_activate else None)


@dataclass(frozen=True)
class ModelConfig:
    """The foundation model's shape. Presets: `cpu` (tests, laptops), `gpu-small` (one GPU), `gpu-large` (a node)."""

    preset: Literal["cpu", "gpu-small", "gpu-large", "gpu", "custom"] = _opt(
        "cpu", "Size preset (docs/model.md#presets: parameters, memory, throughput): `cpu` (d 64, 2 layers, 128 "
        "genes/cell), `gpu-small` (d 512, 8 layers, 1,200 genes/cell; ~46 M parameters with the human vocabulary, "
        "one GPU), `gpu-large` (d 1024, 16 layers, 2,048 genes/cell; ~244 M, a node of GPUs); `gpu` is "
        "`gpu-small`; `custom` uses the sizes below.")
    d_model: int = _opt(64, "custom: embedding width.", min=8)
    n_layers: int = _opt(2, "custom: transformer blocks.", min=1)
    n_heads: int = _opt(4, "custom: attention heads (must divide d_model).", min=1)
    d_ff: int = _opt(128, "custom: feed-forward width.", min=8)
    max_genes: int = _opt(128, "custom: top expressed genes per cell fed to the model (sequence length - 1).", min=4)
    n_bins: int = _opt(51, "Expression bins per cell (as in scGPT); bin 0 means not expressed.", min=3, max=1000)
    dropout: float = _opt(0.0, "Dropout outside attention (attention dropout is 0: 5x slower on CPU).", min=0, max=0.9)
    cell_types: str | None = _opt(
        None, "Comma-separated cell-type labels: adds a cell-type head on the cls embedding, trained on cells whose "
        "obs cell_type is one of them (others are ignored). Empty: no head.")
    cell_type_weight: float = _opt(0.1, "Weight of the cell-type loss next to the masked-bin loss.", min=0)
    cell_objective: Literal["expression", "none"] = _opt(
        "expression", "`expression`: the cls embedding (what `atlasflow embed` exports) must predict every vocabulary "
        "gene's log-normalised expression (a cell-level objective, see docs/model.md); `none`: masked bins only.")
    expression_weight: float = _opt(10.0, "Weight of the expression (cell) loss next to the masked-bin loss.", min=0)
    gene_ranking: Literal["count", "median"] = _opt(
        "count", "Which genes fill a cell's sequence: `count` (highest values) or `median` (value over the cell's "
        "total over the gene's corpus median, Geneformer's encoding; medians learned from the cells streamed so far "
        "and kept in the checkpoint). Ties at the cut are broken by a seeded hash either way.")

    def cell_type_labels(self) -> list[str]:
        return [x.strip() for x in (self.cell_types or "").split(",") if x.strip()]

    def sizes(self) -> dict[str, int]:
        presets = {
            "cpu": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "max_genes": 128},
            "gpu-small": {"d_model": 512, "n_layers": 8, "n_heads": 8, "d_ff": 2048, "max_genes": 1200},
            "gpu-large": {"d_model": 1024, "n_layers": 16, "n_heads": 16, "d_ff": 4096, "max_genes": 2048},
        }
        presets["gpu"] = presets["gpu-small"]  # the name before there were two GPU sizes
        if self.preset in presets:
            return presets[self.preset]
        return {"d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads, "d_ff": self.d_ff,
                "max_genes": self.max_genes}

    def _check(self) -> list[str]:
        sizes = self.sizes()
        if sizes["d_model"] % sizes["n_heads"]:
            return [f"model: n_heads={sizes['n_heads']} does not divide d_model={sizes['d_model']}"]
        return []


@dataclass(frozen=True)
class TrainingConfig:
    """How each batch is trained, and which backend runs the job."""

    backend: Literal["local", "slurm"] = _opt("local", "`local` runs a subprocess here; `slurm` submits over SSH.")
    timeout_s: float = _opt(4 * 3600.0, "Time limit of one training task.", min=1)
    seed: int = _opt(0, "Random seed for sampling, masking and initialisation.", min=0)
    epochs: int = _opt(1, "Passes over each batch's training cells.", min=1)
    batch_cells: int = _opt(64, "Cells per optimisation step.", min=1)
    lr: float = _opt(2e-3, "AdamW peak learning rate of each batch (after its warm-up).", min=0)
    lr_floor: float = _opt(0.1, "Each batch's cosine schedule ends at lr × lr_floor.", min=0, max=1)
    weight_decay: float = _opt(0.01, "AdamW weight decay (never on embeddings, norms and biases).", min=0)
    warmup_steps: int = _opt(20, "Linear learning-rate warm-up at the start of every batch, in steps.", min=0)
    replay_cells: int = _opt(
        10000, "Replay reservoir: tokenised training cells kept from earlier batches (a uniform sample of every "
        "cell trained so far), stored with the checkpoint. 0: no replay.", min=0)
    replay_share: float = _opt(0.25, "Share of each step's cells drawn from the replay reservoir.", min=0, max=0.9)
    eval_cells: int = _opt(
        2000, "Held-out cells evaluated per batch: a seeded sample, read block by block (bounded memory).", min=10)
    mask_ratio: float = _opt(0.15, "Share of a cell's genes whose bin is masked and predicted.", min=0.01, max=0.9)
    checkpoint_every_steps: int = _opt(100, "Intra-batch checkpoint interval; an interrupted job resumes there.", min=1)
    checkpoint_every_minutes: float | None = _opt(
        None, "Also save the intra-batch checkpoint when this many minutes passed since the last save (whichever of "
        "steps and minutes comes first); empty: steps only. Bounds the work a killed job loses when steps are slow "
        "(large models).", min=0.01)
    block_cells: int = _opt(4096, "Contiguous cells read at once and shuffled together (block shuffle).", min=16)
    val_fraction: float = _opt(
        0.2, "Share of a batch's datasets held out for validation (whole datasets: no leakage).", min=0, max=0.9
    )
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto: CUDA when available, else CPU.")
    threads: int | None = _opt(
        None, "CPU threads of each training process (torch.set_num_threads, OMP_NUM_THREADS). Empty: on the "
        "local backend half the worker's CPUs over training.local_ranks (integrate runs beside training); on "
        "SLURM torch's own default, the job's CPUs. Results are bit-identical across backends and resumes at "
        "the same thread count: set it to compare them.", min=1, max=1024)
    local_ranks: int = _opt(
        1, "backend local: DDP ranks started on this machine (`torchrun --standalone --nproc_per_node`); on CPU "
        "they use gloo. 1: one plain process.", min=1, max=64)
    micro_batch_cells: int | None = _opt(
        None, "Cells per forward/backward pass on one rank; batch_cells (the effective batch of one optimiser "
        "step, over all ranks) must be a multiple of ranks × this, and gradients are accumulated over the "
        "rest. Empty: batch_cells / ranks (no accumulation). The cell order depends on batch_cells / "
        "micro_batch_cells only, so a run keeps its exact resume on another number of ranks when this is set.",
        min=1)
    loader_workers: int | None = _opt(
        None, "DataLoader worker processes per rank that read and tokenise blocks (0: in the training process); "
        "empty: 0 on CPU, min(4, CPUs per rank − 1) on CUDA.", min=0, max=64)
    prefetch_blocks: int = _opt(2, "Blocks each loader worker tokenises ahead (DataLoader prefetch_factor).", min=1)
    prefetch_steps: int = _opt(
        2, "Steps assembled ahead by a background thread (tensors, pinned on CUDA); 0: assembled in the step.",
        min=0, max=64)
    pin_memory: bool = _opt(True, "CUDA: assemble steps in pinned memory and copy them to the GPU non-blocking.")
    bf16: bool = _opt(True, "CUDA: bf16 autocast in training and in every evaluation (CPU always runs fp32).")
    tf32: bool = _opt(True, "CUDA: allow TF32 matmuls and convolutions for what runs in fp32.")
    fused_adamw: bool = _opt(True, "CUDA: the fused AdamW kernel (one launch for every parameter).")
    compile: bool = _opt(False, "torch.compile the network (first steps slower while it compiles; off by default).")

    def _check(self) -> list[str]:
        if self.micro_batch_cells is not None and self.batch_cells % self.micro_batch_cells:
            return [f"training: batch_cells={self.batch_cells} is not a multiple of "
                    f"micro_batch_cells={self.micro_batch_cells}"]
        return []


@dataclass(frozen=True)
class RetrainConfig:
    """The atlas_retrain DAG: pseudo-labels from feedback, evaluation and promotion of checkpoints."""

    schedule: str | None = _opt(
        "@weekly", "Cron or preset on which atlas_retrain runs besides every update of the model Asset "
        "(empty: only on the Asset).")
    confidence_threshold: float = _opt(
        0.9, "A feedback prediction becomes a pseudo-label only when its confidence is above this (strictly).",
        min=0, max=1)
    tolerance: float = _opt(
        0.01, "A candidate checkpoint is promoted unless its masked-bin accuracy on the validation or the canary "
        "split is more than this below production's (absolute, 0.01 = one point).", min=0, max=1)
    feedback_path: str | None = _opt(
        None, "Feedback tables (a file, or a folder of .csv/.parquet/.json files with cell_id, dataset_id, "
        "predicted_label, confidence[, source, checkpoint, timestamp]); <base_dir>/feedback when empty.")
    canary_fraction: float = _opt(
        0.3, "Share of held-out datasets (by a hash of their id) that form the canary split; the rest form the "
        "validation split.", min=0, max=1)
    split_seed: int = _opt(0, "Salt of the dataset-id hash that assigns held-out datasets to splits.", min=0)
    train_on_pseudo_labels: bool = _opt(
        False, "Opt-in: the next `atlasflow train` reads <base_dir>/outputs/retrain/retrain.csv and trains the "
        "cell-type head on those pseudo-labels (cells matched by dataset id and obs name; a curated obs cell_type "
        "always wins; held-out datasets never get one). Needs model.cell_types to list the labels.")


@dataclass(frozen=True)
class NotifyConfig:
    """Notifications on a failed task and on a promotion decision. No secrets here: the webhook URL can
    come from an environment variable and SMTP credentials from an Airflow connection."""

    channel: Literal["log", "webhook", "smtp"] = _opt(
        "log", "`log` writes the message to the task log; `webhook` POSTs JSON; `smtp` mails it.")
    webhook_url: str | None = _opt(
        None, "URL the webhook channel POSTs to; empty: the environment variable named by webhook_url_env.")
    webhook_url_env: str = _opt(
        "ATLASFLOW_NOTIFY_WEBHOOK_URL", "Environment variable holding the webhook URL (keeps tokens out of files).")
    smtp_conn_id: str = _opt("smtp_default", "Airflow SMTP connection the smtp channel sends through.")
    email_to: str | None = _opt(None, "Comma-separated recipients of the smtp channel.")
    timeout_s: float = _opt(10.0, "Time limit of one webhook or SMTP delivery.", min=0.1)
    on_keep: bool = _opt(True, "Also notify when a candidate is evaluated and not promoted.")


@dataclass(frozen=True)
class MlflowConfig:
    """Opt-in MLflow tracking of training (atlasflow.model.tracking), over MLflow's REST API."""

    enabled: bool = _opt(
        False, "Log each batch's training as an MLflow run: per-step loss and learning rate, the batch's evaluation "
        "with its baselines, the checkpoint's path and lineage as tags (referenced, never uploaded).")
    tracking_uri: str | None = _opt(
        None, "The MLflow tracking server (http:// or https://); empty: $MLFLOW_TRACKING_URI. scripts/local-mlflow "
        "runs one on 127.0.0.1 whose store is <base_dir>/outputs/mlflow. Credentials come from MLflow's own "
        "variables (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD), never from here.")
    experiment: str = _opt("atlasflow", "MLflow experiment the runs go to; created when missing.")
    flush_every_steps: int = _opt(
        50, "Per-step metrics are sent in one request every this many steps (and at the end of the batch).", min=1)
    timeout_s: float = _opt(
        10.0, "Time limit of one request to the tracking server. A server that fails or does not answer stops the "
        "tracking of that batch with a warning; training goes on.", min=0.1)


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (training's figures sent to a tool users already have)."""

    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass(frozen=True)
class AtlasConfig:
    """The whole pipeline configuration."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    readers: ReadersConfig = field(default_factory=ReadersConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    genes: GenesConfig = field(default_factory=GenesConfig)
    integration: IntegrationConfig = field(default_factory=IntegrationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _check(self) -> list[str]:
        # The head's classes are part of the network (and of every checkpoint's model section), so they
        # are never derived from retrain.csv, whose labels change with each feedback file.
        if self.retrain.train_on_pseudo_labels and not self.model.cell_type_labels():
            return ["retrain.train_on_pseudo_labels is on but model.cell_types is empty: pseudo-labels train the "
                    "cell-type head, so list its labels in model.cell_types (comma-separated), or turn the setting off"]
        return []

    def with_overrides(self, overrides: Mapping[str, Any]) -> AtlasConfig:
        """Return a copy with ``overrides`` (dotted keys or nested mappings) applied and validated."""
        merged = _deep_merge(self.to_dict(), _expand_dotted(overrides, "override"))
        return _build(AtlasConfig, merged, "")

    @property
    def base_dir(self) -> Path:
        return Path(self.storage.base_dir)

    @property
    def state_dir(self) -> Path:
        """Small bookkeeping files (plan, ledger) that must outlive every cleanup."""
        return self.base_dir / "state"

    @property
    def plan_path(self) -> Path:
        return self.state_dir / "plan.json"


# Early configs (streaming_config.json) used flat keys; accept them so old configs load.
_LEGACY_KEYS = {
    "base_dir": "storage.base_dir",
    "max_storage_gb": "storage.max_storage_gb",
    "dataset_list_path": "manifest.path",
    "batch_size": "plan.batch_size",
}


def _expand_dotted(data: Mapping[str, Any], source: str, *, top: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError([f"key {key!r} is not a string"], source)
        path = (_LEGACY_KEYS.get(key, key) if top else key).split(".")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"{key}: conflicts with a value given for {part}"], source)
        leaf = path[-1]
        if isinstance(value, Mapping):
            value = _expand_dotted(value, source, top=False)
            if isinstance(node.get(leaf), dict):
                value = _deep_merge(node[leaf], value)
        node[leaf] = value
    return out


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against a type hint; return the value in that type, or record a problem."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if value is None:
        problems.append(f"{key}: a value is required")
        return None
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            if (char := control_character(value)) is not None:
                # rendered into scripts and command lines: a newline would start a command of its own
                problems.append(f"{key}: contains the control character {char}; values must be one line of "
                                "printable text")
            return value
    problems.append(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    problems: list[str] = []
    obj = _build_into(cls, data, prefix, problems)
    if problems:
        raise ConfigError(problems)
    return obj


def _build_into(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    name = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"{name}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            hint = ", ".join(sorted(known))
            problems.append(f"{prefix}{key}: unknown key (known here: {hint})")
    values: dict[str, Any] = {}
    for fname, f in known.items():
        if fname not in data:
            continue
        hint = hints[fname]
        key = f"{prefix}{fname}"
        if dataclasses.is_dataclass(hint):
            values[fname] = _build_into(hint, data[fname], key + ".", problems)
            continue
        value = _coerce(data[fname], hint, key, problems)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if lo is not None and value < lo:
                problems.append(f"{key}: {data[fname]!r} is below the minimum {lo:g}")
            if hi is not None and value > hi:
                problems.append(f"{key}: {data[fname]!r} is above the maximum {hi:g}")
        values[fname] = value
    try:
        obj = cls(**values)
    except TypeError as exc:  # only reachable through a wrong type we already recorded
        problems.append(f"{name}: {exc}")
        return cls()
    check = getattr(obj, "_check", None)
    if check is not None:
        problems.extend(check())
    return obj


def _read_file(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the config file: {exc.strerror or exc}"], str(path)) from exc
    import yaml

    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise ConfigError([f"not valid {kind}: {exc}"], str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(["the top level must be a mapping of sections"], str(path))
    return data


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> AtlasConfig:
    """Load the configuration.

    Parameters
    ----------
    path
        A ``.yaml``/``.yml``/``.json`` file. When ``None``, the file named by the
        ``ATLASFLOW_CONFIG`` environment variable is used, else the defaults.
    overrides
        Values that win over the file, e.g. an Airflow Param: ``{"plan.batch_size": 2}`` or
        ``{"plan": {"batch_size": 2}}``.

    Returns
    -------
    The validated, frozen configuration. Relative ``storage.base_dir`` and ``manifest.path``
    are resolved against the config file's folder, so a config means the same from any cwd.

    Raises
    ------
    ConfigError
        Listing every unknown key, wrong type and out-of-range value.
    """
    if path is None and os.environ.get(ENV_CONFIG_PATH):
        path = os.environ[ENV_CONFIG_PATH]
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        data = _expand_dotted(_read_file(Path(path)), source)
    if overrides:
        data = _deep_merge(data, _expand_dotted(overrides, "overrides"))
    try:
        config = _build(AtlasConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None
    if path is not None:
        config = _resolve_relative(config, Path(path).resolve().parent)
    return config


def _resolve_relative(config: AtlasConfig, folder: Path) -> AtlasConfig:
    storage = config.storage
    if not Path(storage.base_dir).is_absolute():
        storage = dataclasses.replace(storage, base_dir=str(folder / storage.base_dir))
    manifest = config.manifest
    if manifest.path and not Path(manifest.path).is_absolute():
        manifest = dataclasses.replace(manifest, path=str(folder / manifest.path))
    quant = config.quant
    for key in ("index", "t2g", "onlist", "onlist_10xv2", "onlist_10xv3"):
        value = getattr(quant, key)
        if value and not Path(value).is_absolute():
            quant = dataclasses.replace(quant, **{key: str(folder / value)})
    genes = config.genes
    if genes.vocab_path and not genes.vocab_path.startswith("builtin:") and not Path(genes.vocab_path).is_absolute():
        genes = dataclasses.replace(genes, vocab_path=str(folder / genes.vocab_path))
    if genes.species_mapping and not Path(genes.species_mapping).is_absolute():
        genes = dataclasses.replace(genes, species_mapping=str(folder / genes.species_mapping))
    if manifest.allowed_file_root and not Path(manifest.allowed_file_root).is_absolute():
        manifest = dataclasses.replace(manifest, allowed_file_root=str(folder / manifest.allowed_file_root))
    retrain = config.retrain
    if retrain.feedback_path and not Path(retrain.feedback_path).is_absolute():
        retrain = dataclasses.replace(retrain, feedback_path=str(folder / retrain.feedback_path))
    return dataclasses.replace(config, storage=storage, manifest=manifest, genes=genes, retrain=retrain, quant=quant)


# Keys that shape a DAG (which batches exist, where the plan lives): read from the file at parse
# time, so a run that overrode them would disagree with its own graph.
PARSE_TIME_KEYS = ("manifest", "plan", "storage.base_dir", "retrain.schedule")
# Read by the api-server when it starts, not by a run.
SERVER_KEYS = ("storage.ui_permission",)
# The only text keys a run may set: resource names and labels that name no program, path, URL,
# connection or recipient. Every number, switch and fixed choice may be set too (not a parse-time key).
RUN_TEXT_KEYS = frozenset({"slurm.partition", "slurm.account", "slurm.qos", "slurm.time_limit", "slurm.constraint",
                           "quant.slurm_partition", "model.cell_types"})


def _is_plain_value(hint: Any) -> bool:
    """A number, a switch or a fixed choice (optionally null): a type that cannot name anything."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return all(_is_plain_value(a) for a in typing.get_args(hint) if a is not type(None))
    return origin is Literal or hint in (bool, int, float)


def run_overridable_keys() -> tuple[str, ...]:
    """The allow-list of keys a run may override (the ``config_overrides`` Param, the
    ``atlasflow_overrides`` Variable): numbers, switches, fixed choices and :data:`RUN_TEXT_KEYS`,
    never a parse-time key. Documented in docs/configuration.md."""
    keys = []
    for section in dataclasses.fields(AtlasConfig):
        cls = typing.get_type_hints(AtlasConfig)[section.name]
        for name, hint in typing.get_type_hints(cls).items():
            key = f"{section.name}.{name}"
            if key in SERVER_KEYS or any(key == p or key.startswith(p + ".") for p in PARSE_TIME_KEYS):
                continue
            if key in RUN_TEXT_KEYS or _is_plain_value(hint):
                keys.append(key)
    return tuple(keys)


def _leaves(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in data.items():
        out.extend(_leaves(value, f"{prefix}{key}.") if isinstance(value, Mapping) else [f"{prefix}{key}"])
    return out


def run_override_problems(overrides: Mapping[str, Any], source: str) -> list[str]:
    """Why ``overrides`` (dotted keys or nested mappings) may not be applied to one run; [] when they may.

    A key that names a program, path, URL or connection (``download.sra_command``, ``slurm.python``,
    ``slurm.conn_id`` …) can only be set in the config file: a run setting must never choose what runs.
    Unknown keys are left to :func:`load_config`, which names them.
    """
    allowed = set(run_overridable_keys())
    known = {row["key"] for row in config_reference()}
    problems = []
    for key in sorted(set(_leaves(_expand_dotted(overrides, source)))):
        if key in allowed or key not in known:
            continue
        if any(key == p or key.startswith(p + ".") for p in PARSE_TIME_KEYS):
            problems.append(f"{key} cannot be overridden per run: it shapes the DAG and is read from the config file "
                            "at parse time")
        else:
            problems.append(f"{key} cannot be overridden per run: it names a program, path, URL, connection or "
                            "recipient, so only the config file may set it (per-run keys: docs/configuration.md, "
                            "'Per-run overrides')")
    return problems


def config_reference() -> list[dict[str, Any]]:
    """Every option as ``{"key", "type", "default", "help", "min", "max"}``, for docs and ``config show``."""
    rows: list[dict[str, Any]] = []
    sections = [(section.name, typing.get_type_hints(AtlasConfig)[section.name])
                for section in dataclasses.fields(AtlasConfig)]
    while sections:
        prefix, cls = sections.pop(0)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):  # a nested section, e.g. tracking.mlflow
                sections.append((f"{prefix}.{f.name}", hints[f.name]))
                continue
            rows.append(
                {
                    "key": f"{prefix}.{f.name}",
                    "type": _type_name(hints[f.name]),
                    "default": f.default,
                    "help": f.metadata.get("help", ""),
                    "min": f.metadata.get("min"),
                    "max": f.metadata.get("max"),
                }
            )
    return rows


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
