"""System validation: is this machine (an Airflow worker or a SLURM node) fit to run the pipeline?

Each check returns ok / warn / fail with a one-line reason, so ``atlasflow validate-system`` and the
ingest DAG's first task can say exactly what is wrong before hours are spent downloading.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from atlasflow.config import GB, AtlasConfig

__all__ = ["Check", "run_checks", "summarize"]

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
    if (v.major, v.minor) == (3, 11):
        return Check("python", "ok", f"Python {platform.python_version()}")
    return Check("python", "fail", f"Python {platform.python_version()}; the pinned science stack needs 3.11")


def _pinned_versions(requirements: Path | None) -> dict[str, str]:
    if requirements is None or not requirements.is_file():
        return {}
    pins: dict[str, str] = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
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


def _accelerator() -> Check:
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
    base = Path(config.storage.base_dir)
    probe = base
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    budget = config.storage.max_storage_bytes
    need = budget + int(config.storage.min_free_gb * GB)
    detail = f"{usage.free / GB:.1f} GB free on the volume of {base}; budget {budget / GB:g} GB"
    if usage.free < int(config.storage.min_free_gb * GB):
        return Check("disk", "fail", detail + f"; less than min_free_gb={config.storage.min_free_gb:g}")
    if usage.free < need:
        return Check("disk", "warn", detail + " (the budget cannot be used in full; admission will wait on free space)")
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


def _memory() -> Check:
    import psutil

    avail = psutil.virtual_memory().available
    detail = f"{avail / 2**30:.1f} GiB RAM available, {os.cpu_count()} CPUs"
    if avail < 4 * 2**30:
        return Check("memory", "warn", detail + "; QC will use the conservative (chunked) strategy")
    return Check("memory", "ok", detail)


def _manifest(config: AtlasConfig) -> Check:
    if not config.manifest.path:
        return Check("manifest", "warn", "no manifest.path configured")
    from atlasflow.manifest import ManifestError, read_manifest

    try:
        m = read_manifest(config.manifest.path, sheet=config.manifest.sheet,
                          allowed_file_root=config.manifest.allowed_file_root)
    except ManifestError as exc:
        return Check("manifest", "fail", f"{len(exc.problems)} problem(s), first: {exc.lines()[0]}")
    return Check("manifest", "ok", f"{m.source}: {len(m)} datasets")


def run_checks(config: AtlasConfig, *, requirements: Path | None = None, gpu: bool = True) -> list[Check]:
    """Run every check; none raises. ``gpu=False`` skips importing torch (a second or two)."""
    steps: list[Callable[[], Check | list[Check]]] = [
        _python,
        lambda: _packages(requirements),
        lambda: _writable(config),
        lambda: _disk(config),
        _memory,
        lambda: _manifest(config),
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
