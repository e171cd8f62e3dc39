"""Remote command lines and the state-resolution rule shared by every SLURM client (sync and async)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from atlasflow.slurm.parse import SACCT_FIELDS, SQUEUE_FORMAT, JobInfo, JobState

#: stderr fragments that mean "try again", not "the job failed".
TRANSIENT_PATTERNS = re.compile(
    r"Socket timed out|Unable to contact slurm controller|Connection (reset|refused)|"
    r"slurm_load_jobs error: (Socket|Unable)|Zero Bytes were transmitted|Transport endpoint|"
    r"Resource temporarily unavailable|Broken pipe",
    re.IGNORECASE,
)


def is_transient(stderr: str) -> bool:
    return bool(TRANSIENT_PATTERNS.search(stderr or ""))


def submit_cmd() -> str:
    """sbatch reading the script from stdin."""
    return "sbatch --parsable"


def job_id_list(job_ids: str | Iterable[str]) -> str:
    """``a,b,c`` for squeue/sacct ``--jobs``: each id validated as an integer, duplicates dropped, sorted.

    A single ``str`` is one id (not an iterable of characters).
    """
    ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
    return ",".join(str(j) for j in sorted({int(j) for j in ids}))


_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*\$?")


def user_name(text: str) -> str:
    """A POSIX user name (what ``id -un`` printed), validated before it reaches a command line."""
    name = text.strip()
    if not _USER_NAME.fullmatch(name):
        raise ValueError(f"not a user name: {name[:80]!r}")
    return name


def whoami_cmd() -> str:
    """The cluster-side user the SSH connection runs as."""
    return "id -un"


def squeue_cmd(job_ids: Iterable[str] | None = None, *, user: str | None = None) -> str:
    """squeue of the given jobs (all states, so jobs slurmctld still remembers as finished show), or of all;
    only ``user``'s jobs when given."""
    ids = job_id_list(job_ids) if job_ids is not None else ""
    sel = f" --jobs={shlex.quote(ids)}" if ids else ""
    if user is not None:
        sel += f" --user={shlex.quote(user_name(user))}"
    return f"squeue -h -t all{sel} -o {shlex.quote(SQUEUE_FORMAT)}"


def adoption_problem(info: JobInfo | None, *, user: str, output_dir: str, tag: str) -> str | None:
    """Why a job carrying our tag must not be adopted, or None when it may.

    The tag (``--comment``) is only a name: anyone may submit a job with it. A job is ours when
    scontrol says its owner is the connection's user and it writes its output where this task
    instance would have (``<output_dir>/<job name>.<tag>.try<N>.out``): only then may its result,
    which names the checkpoint the next batch loads, be trusted.
    """
    if info is None:
        return "scontrol does not know it (cannot check its owner)"
    if info.user != user:
        return f"it belongs to user {info.user or '(unknown)'!r}, not to the connection's user {user!r}"
    out = info.stdout or ""
    folder, _, name = out.rpartition("/")
    if folder.rstrip("/") != output_dir.rstrip("/") or f".{tag}.try" not in name:
        return f"its output {out or '(none)'!r} is not this task's ({output_dir.rstrip('/')}/*.{tag}.try*.out)"
    return None


def ping_cmd() -> str:
    """Asks slurmctld whether it answers (``Slurmctld(primary) at HOST is UP``)."""
    return "scontrol ping"


def ping_ok(stdout: str) -> bool:
    return " is UP" in stdout


def scontrol_cmd(job_id: str) -> str:
    return f"scontrol show job -o {int(job_id)}"


def sacct_cmd(job_ids: str | Iterable[str]) -> str:
    """sacct of one job id or of several at once (one slurmdbd query for a whole batch)."""
    return f"sacct -P -n -X --jobs={shlex.quote(job_id_list(job_ids))} --format={shlex.quote(SACCT_FIELDS)}"


def scancel_cmd(job_ids: Iterable[str]) -> str:
    return "scancel " + " ".join(str(int(j)) for j in job_ids)


def tail_cmd(path: str, nbytes: int = 16000) -> str:
    return f"tail -c {int(nbytes)} {shlex.quote(path)} 2>/dev/null || true"


def cat_cmd(path: str) -> str:
    return f"cat {shlex.quote(path)}"


def result_path_for(stdout_path: str) -> str:
    """The job writes its result JSON next to its output: ``<stdout>.result.json``."""
    return f"{stdout_path}.result.json"


def lost_or_none(job_id: str, missing_since: float | None, now: float, grace_s: float) -> JobInfo | None:
    """A job absent from squeue, scontrol and sacct is LOST only once the grace window has passed."""
    if missing_since is not None and now - missing_since >= grace_s:
        return JobInfo(job_id, JobState.LOST, reason=f"absent from squeue, scontrol and sacct for {grace_s:.0f}s")
    return None
