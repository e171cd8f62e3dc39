"""How many CPU threads a compute step may use, given who else runs on the same cores."""

from __future__ import annotations

import os

__all__ = ["threads_for", "usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a SLURM job's allocation, a cgroup's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_for(configured: int | None, *, sharing: int = 1) -> int:
    """``configured``, or else an equal share of :func:`usable_cpus` among ``sharing`` processes (at least 1).

    Numerical libraries default to one thread per CPU in every process; two such processes on the same
    cores (training beside scVI on a local worker) spin-wait on each other: on 2 cores two training
    processes with 2 threads each took 2.6x the time and the CPU of two with 1 (``make bench
    BENCH=shared_cores``).
    """
    return configured if configured else max(1, usable_cpus() // max(sharing, 1))
