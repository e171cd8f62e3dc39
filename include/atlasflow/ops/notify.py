"""Notifications: a failed task, a promoted (or kept) checkpoint.

Three channels, chosen by ``notify.channel``:

- ``log`` (default): the message goes to the task log at WARNING level;
- ``webhook``: a JSON ``POST`` (``{"event", "subject", "text", "details"}``) to ``notify.webhook_url``,
  or to the URL in the environment variable ``notify.webhook_url_env`` so a URL carrying a token
  stays out of config files;
- ``smtp``: a mail through the Airflow SMTP connection ``notify.smtp_conn_id``. This library never
  imports Airflow, so the caller passes the sender (``atlasflow_airflow.notify.smtp_sender``).

Delivery never raises: a notification that cannot be sent is logged and reported in the returned
dict, because a broken webhook must not turn a successful promotion (or the original failure) into
a different error.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from atlasflow.core.config import NotifyConfig

__all__ = ["Message", "SmtpSender", "failure_message", "send"]

log = logging.getLogger(__name__)

Event = Literal["task_failed", "promoted", "kept"]
#: ``(conn_id, recipients, subject, text) -> None``; raises on failure.
SmtpSender = Callable[[str, list[str], str, str], None]


@dataclass(frozen=True)
class Message:
    """What is sent, whatever the channel."""

    event: Event
    subject: str
    text: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, "subject": self.subject, "text": self.text, "details": dict(self.details)}


def failure_message(*, dag_id: str, task_id: str, run_id: str, try_number: int | None,
                    error: BaseException | str | None, log_url: str | None = None) -> Message:
    """The message for a task that failed after its retries."""
    reason = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else (error or "unknown error")
    text = f"{dag_id}.{task_id} failed in run {run_id} (try {try_number}): {reason}"
    if log_url:
        text += f"\nlog: {log_url}"
    return Message("task_failed", f"[atlasflow] {dag_id}.{task_id} failed", text,
                   {"dag_id": dag_id, "task_id": task_id, "run_id": run_id, "try_number": try_number,
                    "error": reason, "log_url": log_url})


def _webhook_url(config: NotifyConfig) -> str | None:
    return config.webhook_url or os.environ.get(config.webhook_url_env) or None


def _post(url: str, message: Message, timeout_s: float) -> int:
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"webhook URL must be http(s), got {url.split(':', 1)[0]!r}")
    body = json.dumps(message.to_dict(), default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "atlasflow-notify"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (scheme checked above)
        return int(response.status)


def send(config: NotifyConfig, message: Message, *, smtp: SmtpSender | None = None) -> dict[str, Any]:
    """Deliver ``message`` on the configured channel.

    Parameters
    ----------
    config
        The ``notify`` section.
    message
        What to send.
    smtp
        Sends a mail through an Airflow connection; required by the ``smtp`` channel only.

    Returns
    -------
    ``{"channel", "event", "sent": bool, "error": str | None}`` (plus ``"status"`` for a webhook).
    The message is always written to the log as well, so it is in the task log whatever happens.
    """
    log.warning("%s\n%s", message.subject, message.text)
    out: dict[str, Any] = {"channel": config.channel, "event": message.event, "sent": False, "error": None}
    try:
        if config.channel == "log":
            out["sent"] = True
        elif config.channel == "webhook":
            url = _webhook_url(config)
            if not url:
                raise ValueError(f"notify.channel is webhook but neither notify.webhook_url nor "
                                 f"${config.webhook_url_env} is set")
            out["status"] = _post(url, message, config.timeout_s)
            out["sent"] = True
        else:
            recipients = [r.strip() for r in (config.email_to or "").split(",") if r.strip()]
            if not recipients:
                raise ValueError("notify.channel is smtp but notify.email_to is empty")
            if smtp is None:
                raise ValueError("notify.channel is smtp but no SMTP sender was given (run it from Airflow)")
            smtp(config.smtp_conn_id, recipients, message.subject, message.text)
            out["sent"] = True
    except (OSError, ValueError, urllib.error.URLError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        log.error("notification %r not delivered on %s: %s", message.event, config.channel, out["error"])
    except Exception as exc:  # a third-party sender (SMTP hook) may raise anything; never let it mask the event
        out["error"] = f"{type(exc).__name__}: {exc}"
        log.exception("notification %r not delivered on %s", message.event, config.channel)
    return out
