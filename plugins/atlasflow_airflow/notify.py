"""Airflow side of :mod:`atlasflow.ops.notify`: the failure callback and the SMTP sender.

The message and the channel logic live in the library; this module only reads the task context
and resolves the Airflow SMTP connection (credentials stay in the connection, never in code).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def smtp_sender(conn_id: str, to: list[str], subject: str, text: str) -> None:
    """Send ``text`` through the SMTP provider's hook and the Airflow connection ``conn_id``."""
    from html import escape

    from airflow.providers.smtp.hooks.smtp import SmtpHook

    with SmtpHook(smtp_conn_id=conn_id) as hook:
        hook.send_email_smtp(to=to, subject=subject, html_content=f"<pre>{escape(text)}</pre>")


def notify_failure(context: Any) -> None:
    """``on_failure_callback``: tell the configured channel which task failed and why.

    Never raises: a callback error would hide the original failure in the log.
    """
    try:
        from atlasflow.ops.notify import failure_message, send
        from atlasflow_airflow.runtime import parse_time_config, task_config

        ti = context["ti"]
        message = failure_message(dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
                                  try_number=getattr(ti, "try_number", None), error=context.get("exception"),
                                  log_url=getattr(ti, "log_url", None))
        try:
            config = task_config(context)
        except Exception as exc:  # a broken overrides Variable/Param must not silence the notification
            log.warning("run-time config unavailable (%s); notifying with the config file's notify section", exc)
            config = parse_time_config()
        send(config.notify, message, smtp=smtp_sender)
    except Exception:  # the failure itself is already recorded by Airflow; this is best effort
        log.exception("atlasflow failure notification could not be prepared")
