"""SLURM job specs, sbatch rendering and scheduler-output parsing (pure; no Airflow)."""

from __future__ import annotations

from atlasflow.slurm.parse import JobInfo, JobState, parse_sacct, parse_sbatch, parse_scontrol, parse_squeue
from atlasflow.slurm.spec import (
    JobSpec,
    distributed_command,
    format_minutes,
    job_tag,
    render_sbatch,
    scale_resources,
)

__all__ = [
    "JobInfo",
    "JobSpec",
    "JobState",
    "distributed_command",
    "format_minutes",
    "job_tag",
    "parse_sacct",
    "parse_sbatch",
    "parse_scontrol",
    "parse_squeue",
    "render_sbatch",
    "scale_resources",
]
