"""Typed SLURM job spec and its sbatch script."""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field, replace

from atlasflow.core.text import control_character

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe(text: str, limit: int = 40) -> str:
    # Job names and file names come from manifest ids: never trust them in a path or a shell.
    return _SAFE.sub("_", text).strip("._")[:limit] or "x"


def job_tag(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """Deterministic tag of one Airflow task instance (stable across tries), safe for ``--comment``."""
    digest = hashlib.sha256(f"{dag_id}\0{run_id}\0{task_id}\0{map_index}".encode()).hexdigest()[:16]
    return f"af-{digest}"


def _parse_minutes(time_limit: str) -> int:
    days, _, rest = time_limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


def format_minutes(minutes: int) -> str:
    d, rem = divmod(minutes, 1440)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


@dataclass(frozen=True)
class JobSpec:
    """Everything needed to render one sbatch script.

    ``command`` is the argv run by the job (e.g. ``["atlasflow", "train", ...]``); each element is
    shell-quoted. ``result_path`` is the JSON the job writes; ``output_dir`` holds per-attempt logs.
    """

    dataset_id: str
    batch_id: str
    command: tuple[str, ...]
    output_dir: str
    tag: str
    attempt: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str = "04:00:00"
    mem_gb: float = 32.0
    cpus: int = 4
    gpus: int = 0
    constraint: str | None = None
    workdir: str | None = None
    env_activate: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    nodes: int = 1
    ranks_per_node: int = 1  # DDP ranks per node (one per GPU); >1 rank in all: the command runs under torchrun
    rdzv_port: int = 29500

    @property
    def world_size(self) -> int:
        return int(self.nodes) * int(self.ranks_per_node)

    @property
    def job_name(self) -> str:
        return f"atlasflow-{_safe(self.dataset_id, 30)}-{_safe(self.batch_id, 30)}"

    @property
    def stdout_path(self) -> str:
        return f"{self.output_dir.rstrip('/')}/{self.job_name}.{self.tag}.try{self.attempt}.out"

    @property
    def stderr_path(self) -> str:
        return f"{self.output_dir.rstrip('/')}/{self.job_name}.{self.tag}.try{self.attempt}.err"


def scale_resources(spec: JobSpec, *, mem_factor: float = 1.0, time_factor: float = 1.0) -> JobSpec:
    """Return ``spec`` with memory and/or time limit multiplied (retry after OOM/TIMEOUT)."""
    minutes = max(1, round(_parse_minutes(spec.time_limit) * time_factor))
    return replace(spec, mem_gb=spec.mem_gb * mem_factor, time_limit=format_minutes(minutes))


def distributed_command(command: tuple[str, ...] | list[str], *, ranks_per_node: int) -> list[str]:
    """``command`` (``[python, ...python args]``) started as ``ranks_per_node`` DDP ranks on one machine.

    ``python -m torch.distributed.run --standalone`` (torchrun) picks a free rendezvous port itself, so
    two jobs on one node never collide; every rank gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.
    One rank: the command unchanged (a plain process, no torch.distributed).
    """
    if ranks_per_node <= 1:
        return list(command)
    return [command[0], "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={int(ranks_per_node)}", *command[1:]]


def _launch_line(spec: JobSpec) -> str:
    """The script's last line: the command itself, under torchrun for >1 rank, under srun for >1 node."""
    q = shlex.quote
    if spec.nodes <= 1:
        return " ".join(q(arg) for arg in distributed_command(spec.command, ranks_per_node=spec.ranks_per_node))
    # one torchrun per node (srun --ntasks-per-node=1), meeting at a c10d rendezvous on the first node;
    # the rendezvous id is the job id, so a requeued job never joins an older one
    rest = " ".join(q(arg) for arg in spec.command[1:])
    return (f"srun --nodes={int(spec.nodes)} --ntasks-per-node=1 --kill-on-bad-exit=1 {q(spec.command[0])} "
            f"-m torch.distributed.run --nnodes={int(spec.nodes)} --nproc_per_node={int(spec.ranks_per_node)} "
            f'--rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID" --rdzv_endpoint="$head_node:{int(spec.rdzv_port)}" '
            f"{rest}")


def _check_one_line(spec: JobSpec) -> None:
    """Refuse a control character in any rendered value: a newline ends an ``#SBATCH`` comment line
    (which quoting cannot protect) and the rest would run as a command. Checked here too, not only
    in the config, because a spec is also built from templated operator arguments."""
    values: list[tuple[str, str | None]] = [
        (name, getattr(spec, name)) for name in ("dataset_id", "batch_id", "output_dir", "tag", "partition", "account",
                                                 "qos", "time_limit", "constraint", "workdir", "env_activate")]
    values += [(f"command[{i}]", arg) for i, arg in enumerate(spec.command)]
    values += [(f"env[{key!r}]", f"{key}={value}") for key, value in spec.env.items()]
    for name, value in values:
        if value is not None and (char := control_character(str(value))) is not None:
            raise ValueError(f"refusing to render the sbatch script: {name} {str(value)[:80]!r} contains the control "
                             f"character {char} (every value must be one line of printable text)")


def render_sbatch(spec: JobSpec) -> str:
    """Render the batch script. Every value that reaches the shell goes through :func:`shlex.quote`;
    a value with a control character is refused (:class:`ValueError`)."""
    _check_one_line(spec)
    q = shlex.quote
    lines = ["#!/bin/bash", f"#SBATCH --job-name={q(spec.job_name)}", f"#SBATCH --comment={q(spec.tag)}"]
    for flag, value in (
        ("partition", spec.partition),
        ("account", spec.account),
        ("qos", spec.qos),
        ("constraint", spec.constraint),
    ):
        if value:
            lines.append(f"#SBATCH --{flag}={q(value)}")
    mem_mb = max(1, int(round(spec.mem_gb * 1024)))
    lines += [
        f"#SBATCH --time={format_minutes(_parse_minutes(spec.time_limit))}",
        f"#SBATCH --mem={mem_mb}M",
        f"#SBATCH --cpus-per-task={int(spec.cpus)}",
        f"#SBATCH --nodes={int(spec.nodes)}",
        "#SBATCH --ntasks-per-node=1" if spec.nodes > 1 else "#SBATCH --ntasks=1",
        f"#SBATCH --output={q(spec.stdout_path)}",
        f"#SBATCH --error={q(spec.stderr_path)}",
    ]
    if spec.gpus:
        lines.append(f"#SBATCH --gres=gpu:{int(spec.gpus)}")
    lines += ["", "set -euo pipefail"]
    if spec.workdir:
        lines.append(f"cd {q(spec.workdir)}")
    if spec.env_activate:
        # A conda env is a directory with conda-meta/; a venv has bin/activate.
        act = q(spec.env_activate)
        lines.append(
            f'if [ -f {act}/bin/activate ]; then source {act}/bin/activate; '
            f'else eval "$(conda shell.bash hook)" && conda activate {act}; fi'
        )
    for key, value in sorted(spec.env.items()):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"invalid environment variable name {key!r}")
        lines.append(f"export {key}={q(value)}")
    if spec.nodes > 1:
        lines.append('head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
    lines.append(_launch_line(spec))
    return "\n".join(lines) + "\n"
