"""Training backends with one interface: ``local`` (subprocess here) and ``slurm`` (sbatch over SSH).

The local backend runs exactly the argv a SLURM job would run, with the same environment contract
(``ATLASFLOW_RESULT_PATH``) and the same per-attempt stdout/stderr paths, so both produce the same
checkpoint for the same input. The SLURM backend's Airflow side is SlurmJobOperator (plugins/).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from atlasflow.slurm.commands import result_path_for
from atlasflow.slurm.parse import JobInfo, JobState
from atlasflow.slurm.spec import JobSpec


@dataclass(frozen=True)
class JobResult:
    info: JobInfo
    result: dict[str, Any] | None


class TrainingBackend(Protocol):
    name: str

    def run(self, spec: JobSpec, *, timeout_s: float | None = None) -> JobResult: ...


class LocalBackend:
    """Run the job's command as a child process and wait for it."""

    name = "local"

    def run(self, spec: JobSpec, *, timeout_s: float | None = None) -> JobResult:
        Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
        result_path = result_path_for(spec.stdout_path)
        env = {**os.environ, **spec.env, "ATLASFLOW_RESULT_PATH": result_path}
        with open(spec.stdout_path, "wb") as out, open(spec.stderr_path, "wb") as err:
            proc = subprocess.Popen(list(spec.command), stdout=out, stderr=err, env=env, cwd=spec.workdir)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                # SIGTERM first: torchrun (training.local_ranks > 1) passes it on to its ranks, which run
                # in sessions of their own and would outlive a SIGKILL of torchrun alone
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return JobResult(JobInfo("local", JobState.TIMEOUT, None, 9, f"exceeded {timeout_s}s"), None)
        if rc < 0:
            info = JobInfo(str(proc.pid), JobState.CANCELLED, 0, -rc, "signal")
        elif rc:
            info = JobInfo(str(proc.pid), JobState.FAILED, rc, 0, "NonZeroExitCode")
        else:
            info = JobInfo(str(proc.pid), JobState.COMPLETED, 0, 0, None)
        result = None
        if info.state is JobState.COMPLETED and Path(result_path).exists():
            result = json.loads(Path(result_path).read_text())
        return JobResult(info, result)


def backend_names() -> tuple[str, ...]:
    return ("local", "slurm")
