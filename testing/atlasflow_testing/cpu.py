"""CPU seconds used by process trees and by the whole machine (benchmarks on a shared machine).

Linux charges a process's CPU to itself (``utime + stime``) and, once its parent reaps it, to the
parent's ``cutime + cstime``. So the CPU a tree of processes has used is the sum, over the tree's
*live* processes, of own plus reaped-children time: every exited process was reaped by a live one
(an Airflow worker reaps its task processes, a task its training child) and is counted there once.
Read at two instants, the difference is the CPU the tree used in between. A process re-parented to
init on exit is lost; Airflow's components reap their own children, so that does not arise here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil

__all__ = ["machine_busy_seconds", "tree_cpu_seconds"]


def _own_and_reaped(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds used so far by the processes ``pids`` and all their descendants, dead ones included."""
    seen: dict[int, float] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                seen[proc.pid] = _own_and_reaped(proc)
            except psutil.NoSuchProcess:  # exited between the listing and the read: its parent has it
                continue
    return sum(seen.values())


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
