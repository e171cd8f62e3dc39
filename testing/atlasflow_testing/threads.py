"""Background threads for ``with`` blocks: a local HTTP stand-in served on 127.0.0.1, or a sampler that
looks at something every few milliseconds. One place for the start/stop so every stand-in and sampler
shuts down the same way."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import HTTPServer
from typing import Self, TypeVar

__all__ = ["SampledInThread", "ServedInThread", "listen"]

_S = TypeVar("_S", bound=HTTPServer)


def listen(make: Callable[[], _S], port: int) -> _S:
    """``make()`` the server, turning a failure to bind into an error that names the port."""
    try:
        return make()
    except OSError as exc:
        raise OSError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc} (port busy?)") from exc


class ServedInThread:
    """Serves ``self._server`` (set by the subclass, see :func:`listen`) in a daemon thread while in a
    ``with`` block; shut down and closed on exit."""

    _server: HTTPServer

    def _serve_in_thread(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class SampledInThread:
    """Calls :meth:`sample` every ``every_s`` seconds in a daemon thread while in a ``with`` block."""

    def __init__(self, *, every_s: float = 0.05) -> None:
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
