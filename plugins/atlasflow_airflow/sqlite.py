"""Connection arguments for a SQLite metadata database, the embedded default of ``make demo``.

Set by ``scripts/airflow_env.sh`` and the test harness as
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=atlasflow_airflow.sqlite.CONNECT_ARGS`` (and the
``_ASYNC`` twin), only when the metadata database is SQLite.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONNECT_ARGS"]

# SQLite lets one process write at a time and Python's driver gives up after 5 s. The scheduler,
# dag-processor, API server, every running task and the CLI all write; on a loaded 2-core machine
# `airflow backfill create` lost that race ("database is locked"). Waiting longer costs nothing
# when the lock is free.
CONNECT_ARGS: dict[str, Any] = {"timeout": 60}
