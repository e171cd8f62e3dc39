"""Parse ``sbatch --parsable``, ``squeue``, ``scontrol show job -o`` and ``sacct -P`` output."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

#: The squeue format our callers pass (``squeue -h -t all -o SQUEUE_FORMAT``).
SQUEUE_FORMAT = "%i|%T|%r|%k"
#: The sacct fields our callers pass (``sacct -P -n -X --format=SACCT_FIELDS``).
SACCT_FIELDS = "JobID,State,ExitCode,Reason,Comment"


class JobState(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    LOST = "LOST"

    @property
    def finished(self) -> bool:
        return self not in _LIVE

    @classmethod
    def from_slurm(cls, text: str) -> JobState:
        """Map a SLURM state word (``CANCELLED by 0``, ``CONFIGURING``, ``OOM`` ...) to a JobState."""
        word = text.strip().split()[0].rstrip("+").upper() if text.strip() else ""
        return _ALIASES.get(word) or cls.__members__.get(word) or cls.LOST


_LIVE = frozenset({JobState.PENDING, JobState.RUNNING, JobState.COMPLETING})
_ALIASES = {
    "PD": JobState.PENDING, "CONFIGURING": JobState.PENDING, "CF": JobState.PENDING,
    "REQUEUED": JobState.PENDING, "REQUEUE_HOLD": JobState.PENDING, "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING, "SUSPENDED": JobState.RUNNING, "STOPPED": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING, "STAGE_OUT": JobState.COMPLETING, "R": JobState.RUNNING,
    "CG": JobState.COMPLETING, "CD": JobState.COMPLETED, "F": JobState.FAILED, "CA": JobState.CANCELLED,
    "TO": JobState.TIMEOUT, "OOM": JobState.OUT_OF_MEMORY, "NF": JobState.NODE_FAIL,
    "PR": JobState.PREEMPTED, "BOOT_FAIL": JobState.NODE_FAIL, "DEADLINE": JobState.TIMEOUT,
    "REVOKED": JobState.CANCELLED, "SPECIAL_EXIT": JobState.FAILED,
}


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: JobState
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    comment: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    user: str | None = None  # the owner's user name (scontrol's ``UserId=name(uid)``)

    def describe(self) -> str:
        parts = [f"job {self.job_id} {self.state.value}"]
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}" + (f" (signal {self.signal})" if self.signal else ""))
        if self.reason and self.reason not in {"None", "(null)"}:
            parts.append(f"reason {self.reason}")
        return ", ".join(parts)


class SlurmOutputError(ValueError):
    """Scheduler output that does not have the expected shape."""


def _exit(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    m = re.fullmatch(r"\s*([0-9]+):([0-9]+)\s*", text)
    if not m:
        return None, None
    return int(m.group(1)), int(m.group(2))


def parse_sbatch(out: str) -> str:
    """``sbatch --parsable`` prints ``ID`` or ``ID;cluster`` (possibly after warnings)."""
    for line in reversed(out.strip().splitlines()):
        m = re.fullmatch(r"\s*([0-9]+)(?:_[0-9]+)?(?:;\S+)?\s*", line)
        if m:
            return m.group(1)
    raise SlurmOutputError(f"no job id in sbatch output: {out.strip()[:200]!r}")


def parse_squeue(out: str) -> dict[str, JobInfo]:
    """Parse ``squeue -h -t all -o '%i|%T|%r|%k'`` lines, keyed by job id."""
    jobs: dict[str, JobInfo] = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", 3)
        if len(fields) < 2 or not fields[0].strip():
            raise SlurmOutputError(f"unexpected squeue line: {line!r}")
        job_id = fields[0].strip()
        reason = fields[2].strip() if len(fields) > 2 else None
        comment = fields[3].strip() if len(fields) > 3 else None
        jobs[job_id] = JobInfo(job_id, JobState.from_slurm(fields[1]), reason=reason, comment=comment)
    return jobs


def _kv(line: str) -> dict[str, str]:
    # `scontrol -o` is space-separated Key=Value; values may hold spaces (Command=, Comment=), so
    # split only before a token that looks like a key.
    out: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|$)", line):
        out.setdefault(m.group(1), m.group(2))
    return out


def parse_scontrol(out: str) -> dict[str, JobInfo]:
    """Parse ``scontrol show job -o [ID]`` output (one job per line), keyed by job id."""
    jobs: dict[str, JobInfo] = {}
    for line in out.splitlines():
        if not line.startswith("JobId="):
            continue
        kv = _kv(line)
        code, sig = _exit(kv.get("ExitCode"))
        user = kv.get("UserId", "").partition("(")[0].strip() or None
        jobs[kv["JobId"]] = JobInfo(
            kv["JobId"], JobState.from_slurm(kv.get("JobState", "")), code, sig,
            kv.get("Reason"), kv.get("Comment"), kv.get("StdOut"), kv.get("StdErr"), user,
        )
    return jobs


def parse_sacct(out: str) -> dict[str, JobInfo]:
    """Parse ``sacct -P -n -X --format=JobID,State,ExitCode,Reason,Comment``, keyed by job id."""
    jobs: dict[str, JobInfo] = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 3:
            raise SlurmOutputError(f"unexpected sacct line: {line!r}")
        job_id = fields[0].split(".")[0]
        if "." in fields[0] and job_id in jobs:
            continue
        code, sig = _exit(fields[2])
        jobs[job_id] = JobInfo(
            job_id, JobState.from_slurm(fields[1]), code, sig,
            fields[3] if len(fields) > 3 else None, fields[4] if len(fields) > 4 else None,
        )
    return jobs
