"""System validation: is this machine (an Airflow worker or a SLURM node) fit to run the pipeline?

Each check returns ok / warn / fail with a one-line reason, so ``atlasflow validate-system`` and the
ingest DAG's first task can say exactly what is wrong before hours are spent downloading.
"""

from __future__ import annotations

import glob
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from packaging.markers import Marker

from atlasflow.core.config import GB, AtlasConfig
from atlasflow.core.fsutil import write_json_atomic
from atlasflow.prep.memory import (
    STRATEGIES,
    MemoryStrategy,
    apply_memory_strategy,
    choose_memory_strategy,
    recorded_memory_strategy,
    system_file,
)

__all__ = [
    "STRATEGIES",
    "Check",
    "MemoryStrategy",
    "SystemValidationError",
    "apply_memory_strategy",
    "choose_memory_strategy",
    "known_hosts_check",
    "recorded_memory_strategy",
    "run_checks",
    "summarize",
    "system_report",
    "validate_for_run",
]

log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail"]
# Packages the library needs at run time, with the versions we test (requirements.txt).
SCIENCE_PACKAGES = ("numpy", "scipy", "pandas", "anndata", "scanpy", "torch", "scvi-tools", "h5py")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _python() -> Check:
    v = sys.version_info
    if (3, 11) <= (v.major, v.minor) <= (3, 13):
        return Check("python", "ok", f"Python {platform.python_version()}")
    return Check("python", "fail", f"Python {platform.python_version()}; the pinned stack is tested on 3.11, 3.12 and 3.13")


def _pinned_versions(requirements: Path | None) -> dict[str, str]:
    if requirements is None or not requirements.is_file():
        return {}
    pins: dict[str, str] = {}
    for line in requirements.read_text().splitlines():
        line, _, marker = line.split("#", 1)[0].strip().partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue  # a pin for another Python
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _packages(requirements: Path | None) -> list[Check]:
    pins = _pinned_versions(requirements)
    checks = []
    for name in SCIENCE_PACKAGES:
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(f"package:{name}", "fail", "not installed"))
            continue
        pinned = pins.get(name)
        local = installed.split("+", 1)[0]  # torch reports 2.13.0+cpu for the pin 2.13.0
        if pinned and local != pinned:
            checks.append(Check(f"package:{name}", "warn", f"{installed} installed, {pinned} tested"))
        else:
            checks.append(Check(f"package:{name}", "ok", installed))
    return checks


# device nodes a CUDA (NVIDIA) or ROCm (AMD, which torch also reports as "cuda") GPU needs to be usable
GPU_DEVICE_GLOBS = ("/dev/nvidia[0-9]*", "/dev/kfd")


def _accelerator(device_globs: Sequence[str] = GPU_DEVICE_GLOBS) -> Check:
    # Importing torch costs 1.5-3 s of every run's validation; without a GPU device node torch cannot
    # see a GPU, so it is only imported when one exists.
    if not any(glob.glob(pattern) for pattern in device_globs):
        if importlib.util.find_spec("torch") is None:
            return Check("gpu", "fail", "torch is not installed")
        return Check("gpu", "warn", f"no GPU device ({', '.join(device_globs)}): training runs on the CPU "
                                    "(fine for tests, slow for real data)")
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return Check("gpu", "fail", "torch is not importable")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        free, total = torch.cuda.mem_get_info(0)
        return Check("gpu", "ok", f"{len(names)} CUDA device(s): {', '.join(names)}; "
                                  f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free on device 0")
    return Check("gpu", "warn", "no CUDA device: training runs on the CPU (fine for tests, slow for real data)")


def _disk(config: AtlasConfig) -> Check:
    from atlasflow.storage import tree_bytes

    base = Path(config.storage.base_dir)
    probe = base
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    budget = config.storage.max_storage_bytes
    # What the pipeline already holds under base_dir counts towards the budget, so it is not "missing" space.
    held = tree_bytes(base) if base.is_dir() else 0
    room = usage.free + held
    min_free = int(config.storage.min_free_gb * GB)
    detail = (f"{usage.free / GB:.1f} GB free on the volume of {base} (+{held / GB:.2f} GB already under it); "
              f"budget {budget / GB:g} GB")
    if usage.free < min_free:
        return Check("disk", "fail", detail + f"; less than min_free_gb={config.storage.min_free_gb:g}")
    if room < budget:
        return Check("disk", "fail", detail + "; the budget exceeds the free disk: lower storage.max_storage_gb "
                                              "or free space")
    if room < budget + min_free:
        return Check("disk", "warn", detail + f"; using the whole budget would leave less than min_free_gb="
                                              f"{config.storage.min_free_gb:g} (admission will wait on free space)")
    return Check("disk", "ok", detail)


def _writable(config: AtlasConfig) -> Check:
    base = Path(config.storage.base_dir)
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = base / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        return Check("base_dir", "fail", f"{base} is not writable: {exc.strerror or exc}")
    return Check("base_dir", "ok", f"{base} is writable")


# Filesystems shared between hosts: SQLite's WAL index (shared memory) does not work across them.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "fuse.cephfs", "glusterfs",
                       "fuse.glusterfs", "beegfs", "9p")


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (the longest mount point above it in /proc/mounts)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    resolved, best, kind = path.resolve(), "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (resolved == Path(point) or Path(point) in resolved.parents) and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def _ledger(config: AtlasConfig, mounts: str | None = None) -> Check:
    """The ledger opens (a server one answers), and SQLite is not used on a filesystem shared between hosts."""
    from atlasflow.storage import Ledger

    try:
        ledger = Ledger(config.storage, lock_timeout_s=10)
        active = len(ledger.reservations())
    except Exception as exc:  # a server that refuses, a bad URL: the reason, never the password
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check("ledger", "fail", f"the storage ledger does not open: {type(exc).__name__}: {detail}")
    detail = f"{ledger.location}: {active} active reservation(s)"
    if not ledger.server:
        kind = filesystem_type(Path(config.storage.base_dir), mounts)
        if kind in NETWORK_FILESYSTEMS:
            return Check("ledger", "warn", detail + f"; base_dir is on {kind}: if workers on other hosts share it, "
                                                     "set storage.ledger_url (PostgreSQL, docs/deploy.md)")
    return Check("ledger", "ok", detail)


def _memory() -> Check:
    import psutil

    avail = psutil.virtual_memory().available
    detail = f"{avail / 2**30:.1f} GiB RAM available, {os.cpu_count()} CPUs"
    if avail < 4 * 2**30:
        return Check("memory", "warn", detail + "; QC will use the conservative (chunked) strategy")
    return Check("memory", "ok", detail)


def _manifest(config: AtlasConfig) -> list[Check]:
    """The manifest parses, and the programs its rows need are installed."""
    if not config.manifest.path:
        return [Check("manifest", "warn", "no manifest.path configured")]
    import shlex

    from atlasflow.intake.manifest import ManifestError, read_manifest

    try:
        m = read_manifest(config.manifest.path, sheet=config.manifest.sheet,
                          allowed_file_root=config.manifest.allowed_file_root)
    except ManifestError as exc:
        return [Check("manifest", "fail", f"{len(exc.problems)} problem(s), first: {exc.lines()[0]}")]
    checks = [Check("manifest", "ok", f"{m.source}: {len(m)} datasets")]
    sra_rows = [d.dataset_id for d in m if d.type == "sra"]
    if sra_rows:
        program = (shlex.split(config.download.sra_command) or [""])[0]
        found = shutil.which(program) if program else None
        rows = ", ".join(sra_rows[:3]) + (" …" if len(sra_rows) > 3 else "")
        if found:
            checks.append(Check("tool:sra", "ok", f"{found} for {len(sra_rows)} sra row(s)"))
        elif config.download.sra_resolver == "sra-tools":
            checks.append(Check("tool:sra", "fail", f"{program or 'download.sra_command'} is not on PATH, needed by "
                                                    f"{len(sra_rows)} sra row(s) ({rows}): install sra-tools, set "
                                                    "download.sra_command, or download.sra_resolver: auto/ena"))
        else:  # auto falls back to ENA's FASTQ links
            checks.append(Check("tool:sra", "ok", f"{program or 'sra-tools'} not on PATH: {len(sra_rows)} sra row(s) "
                                                  f"({rows}) are fetched from ENA ({config.download.ena_base_url})"))
    reads = [d.dataset_id for d in m if d.is_reads]
    if reads:
        rows = ", ".join(reads[:3]) + (" …" if len(reads) > 3 else "")
        from atlasflow.acquire.quant import QuantError, kb_executable, reference_problems

        problems = reference_problems(config.quant)
        try:
            kb = kb_executable()
        except QuantError as exc:  # kb-python missing
            problems.append(str(exc))
        if problems:
            checks.append(Check("quant", "fail", f"{'; '.join(problems)} (needed by {len(reads)} FASTQ row(s): "
                                                 f"{rows})"))
        else:
            checks.append(Check("quant", "ok", f"{kb} with {config.quant.index} for {len(reads)} FASTQ row(s)"))
        if undetected := [d.dataset_id for d in m if d.is_reads and not d.technology]:
            from atlasflow.acquire.chemistry import DETECTABLE, onlist_for

            shown = ", ".join(undetected[:3]) + (" …" if len(undetected) > 3 else "")
            lists = {c: onlist_for(c, config.quant) for c in DETECTABLE}
            if missing := [c for c, p in lists.items() if not p or not Path(p).is_file()]:
                checks.append(Check("chemistry", "warn", f"no barcode on-list for {', '.join(missing)} (set "
                                    f"quant.onlist_<chemistry>): {len(undetected)} reads row(s) without a technology "
                                    f"({shown}) cannot be detected as it"))
            else:
                checks.append(Check("chemistry", "ok", f"{len(undetected)} reads row(s) without a technology ({shown}): "
                                    "detected from the reads against the 10x v2/v3 on-lists"))
    return checks


def _vocabulary(config: AtlasConfig) -> list[Check]:
    """The configured vocabulary reads and is the one this base_dir pinned; the ortholog table reads."""
    from atlasflow.prep.genes import OrthologTable, Vocabulary, vocabulary_mismatch

    pinned = config.state_dir / "vocab.json"
    try:
        wanted = Vocabulary.load(config.genes.vocab_path)
        problem = vocabulary_mismatch(pinned, config.genes.vocab_path)
    except ValueError as exc:
        return [Check("vocabulary", "fail", str(exc))]
    if problem is not None:
        checks = [Check("vocabulary", "fail", problem)]
    elif pinned.exists():
        checks = [Check("vocabulary", "ok", f"{wanted.describe()}, pinned in {pinned}")]
    else:
        checks = [Check("vocabulary", "ok", f"{wanted.describe()}; the first run pins it in {pinned}")]
    if config.genes.species_mapping:
        try:
            table = OrthologTable.load(config.genes.species_mapping)
        except ValueError as exc:
            return [*checks, Check("species_mapping", "fail", str(exc))]
        checks.append(Check("species_mapping", "ok", f"{len(table.to_human):,} {table.species} genes → human "
                                                     f"({table.ambiguous} ambiguous left out): {table.path}"))
    return checks


def _model_artifacts(config: AtlasConfig) -> Check:
    """What each batch reserves for its model artefacts (:func:`atlasflow.model.sizing.model_artifacts`).

    Computed from the model unless ``storage.checkpoint_gb`` overrides it; an override below the
    computed figure is a warning (the estimate errs high), not a refusal.
    """
    from atlasflow.model.sizing import model_artifacts
    from atlasflow.prep.genes import Vocabulary

    n_genes = len(Vocabulary.load(config.genes.vocab_path))
    art = model_artifacts(config, n_genes)
    size = art.checkpoint
    computed = replace(art, override=None).bytes()
    mb = 1e6
    detail = (f"~{size.total() / mb:,.1f} MB per checkpoint ({size.parameters:,} parameters: weights "
              f"{size.weights / mb:,.1f} MB, optimizer {size.optimizer / mb:,.1f} MB; replay reservoir of "
              f"{config.training.replay_cells:,} cells {size.replay / mb:,.1f} MB; gene statistics "
              f"{size.stats / mb:,.1f} MB); two copies coexist while one is saved, plus the scVI model "
              f"({art.scvi_model / mb:,.1f} MB): {computed / mb:,.1f} MB per batch before the latent and scoring "
              "pool, which grow with its cells")
    if art.override is None:
        return Check("model_artifacts", "ok", f"{detail}, reserved as computed")
    if art.override < computed:
        return Check("model_artifacts", "warn", f"{detail} > storage.checkpoint_gb ({art.override / mb:,.1f} MB). "
                     "Raise or unset storage.checkpoint_gb, or lower training.replay_cells")
    return Check("model_artifacts", "ok", f"{detail}; storage.checkpoint_gb reserves {art.override / mb:,.1f} MB")


def _known_hosts_names(line: str) -> list[str]:
    fields = line.split()
    if len(fields) < 3 or line.startswith("#"):
        return []
    first = fields[1] if fields[0].startswith("@") else fields[0]  # @cert-authority / @revoked markers
    return first.split(",")


def _host_matches(pattern: str, entry: str) -> bool:
    if pattern.startswith("|1|"):  # HashKnownHosts: |1|base64(salt)|base64(HMAC-SHA1(salt, name))
        import base64
        import hashlib
        import hmac

        try:
            salt, digest = (base64.b64decode(part) for part in pattern[3:].split("|", 1))
        except ValueError:
            return False
        return hmac.compare_digest(hmac.new(salt, entry.encode(), hashlib.sha1).digest(), digest)
    return pattern == entry


def known_hosts_check(host: str | None, port: int | None, known_hosts: str | None, *,
                      conn_id: str = "slurm_ssh") -> Check:
    """Whether the SSH connection's ``known_hosts`` extra names a file holding the login node's key;
    when not, the exact step that fills it.

    SLURM connections verify the login node's host key (never trust on first use): a first run with
    an empty or missing file fails host-key verification. ``ssh-keyscan`` must run from a trusted
    network; compare its fingerprint (``ssh-keygen -lf FILE``) with the one your admins publish.
    """
    port = int(port or 22)
    entry = host if port == 22 else f"[{host}]:{port}"
    target = known_hosts or "~/.ssh/atlasflow_known_hosts"
    step = (f"run `ssh-keyscan -p {port} {host} >> {target}` from a trusted network, check the fingerprint "
            f"(`ssh-keygen -lf {target}`) against the one your cluster's admins publish")
    if not host:
        return Check("ssh_known_hosts", "fail", f"connection {conn_id!r} has no host")
    if not known_hosts:
        return Check("ssh_known_hosts", "fail", f"connection {conn_id!r} has no known_hosts extra, so the login "
                     f"node's host key cannot be verified: {step}, then set \"known_hosts\": \"{target}\" in "
                     "the connection's extra")
    path = Path(known_hosts).expanduser()
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        return Check("ssh_known_hosts", "fail", f"connection {conn_id!r}: known_hosts file {path} is not readable "
                     f"({exc.strerror or exc}): {step}")
    if not any(_host_matches(name, entry) for line in lines for name in _known_hosts_names(line.strip())):
        return Check("ssh_known_hosts", "fail", f"connection {conn_id!r}: known_hosts file {path} has no key for "
                     f"{entry}: {step}")
    return Check("ssh_known_hosts", "ok", f"{path} holds a host key for {entry}")


class SystemValidationError(RuntimeError):
    """At least one check failed; the message lists every failure, ``failed`` their names."""

    def __init__(self, message: str, failed: list[str]) -> None:
        super().__init__(message)
        self.failed = failed


def run_checks(config: AtlasConfig, *, requirements: Path | None = None, gpu: bool = True,
               extra: Sequence[Callable[[], Check | list[Check]]] = ()) -> list[Check]:
    """Run every check; none raises. ``gpu=False`` skips importing torch (a second or two).

    ``extra`` adds checks that need more than the library, e.g. SLURM reachability over an Airflow
    SSH connection.
    """
    steps: list[Callable[[], Check | list[Check]]] = [
        _python,
        lambda: _packages(requirements),
        lambda: _writable(config),
        lambda: _disk(config),
        lambda: _ledger(config),
        _memory,
        lambda: _manifest(config),
        lambda: _vocabulary(config),
        lambda: _model_artifacts(config),
        *extra,
    ]
    if gpu:
        steps.append(_accelerator)
    checks: list[Check] = []
    for step in steps:
        try:
            result = step()
        except Exception as exc:  # a check that crashes is itself a finding, not a crash of the report
            result = Check(getattr(step, "__name__", "check"), "fail", f"{type(exc).__name__}: {exc}")
        checks.extend(result if isinstance(result, list) else [result])
    for c in checks:
        log.info("%s: %s (%s)", c.name, c.status, c.detail)
    return checks


def summarize(checks: list[Check]) -> dict[str, Any]:
    worst: Status = "fail" if any(c.status == "fail" for c in checks) else (
        "warn" if any(c.status == "warn" for c in checks) else "ok")
    return {"status": worst, "checks": [c.to_dict() for c in checks]}


def system_report(config: AtlasConfig, *, requirements: Path | None = None, gpu: bool = True,
                  extra: Sequence[Callable[[], Check | list[Check]]] = ()) -> dict[str, Any]:
    """Run the checks, pick the memory strategy, and record both in ``state/system.json``.

    The QC steps read the strategy from there (:func:`recorded_memory_strategy`); the run report
    shows the checks. Never raises for a failed check: see :func:`validate_for_run`.
    """
    import psutil

    from atlasflow.prep.genes import Vocabulary

    if requirements is None:
        candidate = Path(__file__).resolve().parents[2] / "requirements.txt"
        requirements = candidate if candidate.is_file() else None
    checks = run_checks(config, requirements=requirements, gpu=gpu, extra=extra)
    pinned = config.state_dir / "vocab.json"
    try:
        n_genes = len(Vocabulary.load(str(pinned) if pinned.exists() else config.genes.vocab_path))
    except ValueError:  # an unreadable vocabulary is a failed check already; size the strategy by the default
        n_genes = len(Vocabulary.default())
    strategy, reason = choose_memory_strategy(n_genes, psutil.virtual_memory().total)
    checks.append(Check("memory_strategy", "ok", reason))
    summary = {**summarize(checks), "memory_strategy": {**asdict(strategy), "reason": reason}}
    try:
        write_json_atomic(system_file(config), summary)
    except OSError as exc:  # an unwritable base_dir is already a failed check; say it, don't crash
        log.warning("could not record %s: %s", system_file(config), exc)
    log.info("memory strategy: %s", reason)
    return summary


def validate_for_run(config: AtlasConfig, *, requirements: Path | None = None,
                     extra: Sequence[Callable[[], Check | list[Check]]] = ()) -> dict[str, Any]:
    """The first task of an ingest run: :func:`system_report`, then stop the run if anything failed.

    Raises
    ------
    SystemValidationError
        When any check fails, naming each failure, before anything is downloaded.
    """
    summary = system_report(config, requirements=requirements, extra=extra)
    failed = [c for c in summary["checks"] if c["status"] == "fail"]
    if failed:
        raise SystemValidationError("system validation failed: " + "; ".join(f"{c['name']}: {c['detail']}"
                                                                           for c in failed),
                                    [c["name"] for c in failed])
    return {"status": summary["status"], "memory_strategy": summary["memory_strategy"]["name"],
            "warnings": [f"{c['name']}: {c['detail']}" for c in summary["checks"] if c["status"] == "warn"]}
