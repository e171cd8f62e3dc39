"""atlasflow.ops.notify on every channel; the webhook goes to a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from atlasflow.core.config import NotifyConfig
from atlasflow.ops.notify import Message, failure_message, send
from atlasflow_testing.threads import ServedInThread, listen


class WebhookServer(ServedInThread):
    """A webhook receiver on 127.0.0.1 (an ephemeral port) that keeps every JSON body it is sent.

    ``status`` is what it answers. It runs in a thread of the test process and is shut down on exit.
    """

    def __init__(self, status: int = 204) -> None:
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(json.loads(body))
                outer.headers.append(dict(self.headers))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = listen(lambda: ThreadingHTTPServer(("127.0.0.1", 0), Handler), 0)
        self._serve_in_thread()

    @property
    def hook_url(self) -> str:
        return self.url + "/hook"


MESSAGE = Message("promoted", "[atlasflow] batch_0003 promoted", "batch_0003 promoted: no regression",
                  {"candidate": "models/checkpoints/batch_0003", "deltas": {"validation": 0.012}})


def test_webhook_posts_json_to_the_url_from_the_environment(monkeypatch):
    with WebhookServer() as server:
        monkeypatch.setenv("MY_HOOK", server.hook_url)  # the URL (often with a token) is not in the config file
        out = send(NotifyConfig(channel="webhook", webhook_url_env="MY_HOOK"), MESSAGE)
    assert out == {"channel": "webhook", "event": "promoted", "sent": True, "error": None, "status": 204}
    assert server.received == [MESSAGE.to_dict()]
    assert server.headers[0]["Content-Type"] == "application/json"


def test_an_undeliverable_webhook_is_reported_not_raised(monkeypatch, caplog):
    with WebhookServer(status=500) as server:
        out = send(NotifyConfig(channel="webhook", webhook_url=server.hook_url), MESSAGE)
    assert out["sent"] is False and "500" in out["error"] and len(server.received) == 1
    monkeypatch.delenv("ATLASFLOW_NOTIFY_WEBHOOK_URL", raising=False)
    out = send(NotifyConfig(channel="webhook"), MESSAGE)
    assert out["sent"] is False and "ATLASFLOW_NOTIFY_WEBHOOK_URL" in out["error"]
    assert "file" in send(NotifyConfig(channel="webhook", webhook_url="file:///etc/passwd"), MESSAGE)["error"]
    assert "not delivered" in caplog.text


def test_log_and_smtp_channels(caplog):
    failed = failure_message(dag_id="atlas_ingest", task_id="batch_0001.train", run_id="manual__1", try_number=3,
                             error=RuntimeError("CUDA out of memory"))
    assert send(NotifyConfig(), failed)["sent"] is True
    assert "atlas_ingest.batch_0001.train failed in run manual__1 (try 3): RuntimeError: CUDA out of memory" in caplog.text

    sent: list[tuple] = []
    config = NotifyConfig(channel="smtp", smtp_conn_id="smtp_ops", email_to="a@example.org, b@example.org")
    assert send(config, failed, smtp=lambda *args: sent.append(args))["sent"] is True
    assert sent == [("smtp_ops", ["a@example.org", "b@example.org"], failed.subject, failed.text)]

    def broken(*args: Any) -> None:
        raise ConnectionRefusedError("no SMTP server")

    assert "ConnectionRefusedError" in send(config, failed, smtp=broken)["error"]
    assert "email_to is empty" in send(NotifyConfig(channel="smtp"), failed, smtp=broken)["error"]
