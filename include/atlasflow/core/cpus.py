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
    processes each took 25-30 % longer, and used as much more CPU, with 2 threads than with 1.
    """
    return configured if configured else max(1, usable_cpus() // max(sharing, 1))
