"""SystemValidationOperator: the first task of an ingest run; stops the run before any download if
this worker (or, with the slurm backend, the cluster) cannot run the pipeline."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator


def slurm_reachability(conn_id: str) -> Any:
    """A check that the SSH connection opens (host key verified) and slurmctld answers ``scontrol ping``.

    The connection's ``known_hosts`` extra is checked first: a missing file or host entry fails with
    the exact ``ssh-keyscan`` step that fills it (:func:`atlasflow.ops.validate.known_hosts_check`).
    """
    from airflow.sdk import BaseHook

    from atlasflow.ops.validate import Check, known_hosts_check
    from atlasflow_airflow.hooks.slurm import SlurmHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:
        return Check("slurm", "fail", f"connection {conn_id!r}: {type(exc).__name__}: {exc}")
    extra = conn.extra_dejson
    known = None
    if not extra.get("no_host_key_check") and not extra.get("host_key"):
        known = known_hosts_check(conn.host, conn.port, extra.get("known_hosts"), conn_id=conn_id)
        if known.status != "ok" and extra.get("known_hosts"):
            return Check("slurm", known.status, known.detail)
    try:
        up, reply = SlurmHook(ssh_conn_id=conn_id, transient_retries=1).ping()
    except Exception as exc:  # host key refused, connection missing, auth failure: all say the same thing
        detail = f"connection {conn_id!r}: {type(exc).__name__}: {exc}"
        if known is not None and known.status != "ok":  # no known_hosts extra: say how to add one
            detail += f" ({known.detail})"
        return Check("slurm", "fail", detail)
    if not up:
        return Check("slurm", "fail", f"connection {conn_id!r} opened but slurmctld did not answer: {reply[:300]}")
    return Check("slurm", "ok", f"{conn_id}: {reply.splitlines()[0] if reply else 'UP'}")


class SystemValidationOperator(BaseOperator):
    """Runs :func:`atlasflow.ops.validate.validate_for_run` (plus SLURM reachability when
    ``training.backend`` is ``slurm``) and records the memory strategy for the run's QC steps."""

    ui_color = "#e8f0e8"

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from atlasflow.ops.validate import SystemValidationError, validate_for_run
        from atlasflow_airflow.runtime import task_config

        config = task_config(context)
        extra = [lambda: slurm_reachability(config.slurm.conn_id)] if config.training.backend == "slurm" else []
        try:
            return validate_for_run(config, extra=extra)
        except SystemValidationError as exc:
            if exc.failed == ["slurm"]:
                raise  # a cluster that does not answer may answer at the next try
            raise AirflowFailException(str(exc)) from exc  # disk, tools, versions: retrying changes nothing
