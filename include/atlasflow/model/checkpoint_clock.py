"""When an intra-batch checkpoint is due: every N steps, or every M minutes, whichever comes first."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["CheckpointClock"]


@dataclass
class CheckpointClock:
    """``training.checkpoint_every_steps`` and ``training.checkpoint_every_minutes`` as one decision.

    The minutes bound the work a killed job loses when steps are slow (a large model on a few
    GPUs); the steps keep the old behaviour and stay deterministic. ``now`` is injectable for tests.
    """

    every_steps: int
    every_minutes: float | None = None
    now: Callable[[], float] = time.monotonic
    _last: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._last = self.now()  # created when the batch's training starts

    def due(self, global_step: int, *, agree: Callable[[bool], bool] | None = None) -> bool:
        """Whether to save after ``global_step``; a True answer restarts the minutes.

        ``agree``: with several ranks, every rank must take the same decision (a save is a
        collective): pass a function that combines the ranks' answers (e.g. an all-reduce MAX of
        the flag). Needed only with ``every_minutes``, whose answer depends on each rank's clock.
        """
        t = self.now()
        by_time = self.every_minutes is not None and t - self._last >= self.every_minutes * 60
        decision = global_step % self.every_steps == 0 or by_time
        if agree is not None and self.every_minutes is not None:
            decision = agree(decision)
        if decision:
            self._last = t
        return decision
