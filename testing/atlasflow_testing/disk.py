"""Peak disk use under some folders, sampled in a background thread (tests and benchmarks)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from atlasflow.core.layout import tree_bytes

__all__ = ["PeakDiskSampler"]


class PeakDiskSampler:
    """``with PeakDiskSampler([base / "data", ...]) as disk: ...`` then ``disk.peak``: the most bytes
    the folders held together at one sample (every ``every_s``; missing folders count 0)."""

    def __init__(self, folders: Iterable[Path], *, every_s: float = 0.05) -> None:
        self.folders, self.every_s, self.peak = tuple(folders), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(tree_bytes(f) for f in self.folders))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakDiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
