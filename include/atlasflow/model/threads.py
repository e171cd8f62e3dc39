"""torch's CPU threads for one step, restored afterwards (the step may run inside a longer-lived process)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op threads set to ``n`` (``None``: as they are), then restore them.

    Results are bit-identical across runs, backends and resumes only at the same thread count (a
    reduction split over other threads adds in another order), so a step that pins it pins it for all.
    """
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
