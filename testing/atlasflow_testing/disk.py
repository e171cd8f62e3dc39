"""Peak disk use under some folders, sampled in a background thread (tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from atlasflow.core.layout import tree_bytes
from atlasflow_testing.threads import SampledInThread

__all__ = ["PeakDiskSampler"]


class PeakDiskSampler(SampledInThread):
    """``with PeakDiskSampler([base / "data", ...]) as disk: ...`` then ``disk.peak``: the most bytes
    the folders held together at one sample (every ``every_s``; missing folders count 0)."""

    def __init__(self, folders: Iterable[Path], *, every_s: float = 0.05) -> None:
        super().__init__(every_s=every_s)
        self.folders, self.peak = tuple(folders), 0

    def sample(self) -> None:
        self.peak = max(self.peak, sum(tree_bytes(f) for f in self.folders))
