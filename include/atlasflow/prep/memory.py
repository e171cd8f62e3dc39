"""The QC memory strategy: which row of the strategy matrix (vocabulary size × RAM) QC runs with.

``validate_system`` picks and records it once per run (``state/system.json``); every processing
task then applies the recorded choice, so all datasets of a run are processed alike.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from atlasflow.core.config import AtlasConfig, QCConfig

__all__ = ["STRATEGIES", "MemoryStrategy", "apply_memory_strategy", "choose_memory_strategy",
           "recorded_memory_strategy", "system_file"]


@dataclass(frozen=True)
class MemoryStrategy:
    """One row of the QC memory strategy matrix (vocabulary size × RAM), in terms of this pipeline's QC knobs."""

    name: Literal["conservative", "moderate", "split", "aggressive"]
    max_genes: int | None  # vocabulary sizes the row is meant for (None: any larger)
    min_ram_gib: float  # the system RAM the row asks for
    memory_fraction: float  # share of available RAM that in-memory QC may plan to use
    chunk_cells: int
    always_chunked: bool  # "split build": never hold a whole matrix


STRATEGIES = (
    MemoryStrategy("conservative", 5_000, 16, 0.25, 5_000, False),
    MemoryStrategy("moderate", 10_000, 32, 0.5, 10_000, False),
    MemoryStrategy("split", 15_000, 46, 0.5, 20_000, True),
    MemoryStrategy("aggressive", None, 64, 0.75, 50_000, False),
)


def choose_memory_strategy(n_genes: int, ram_bytes: int) -> tuple[MemoryStrategy, str]:
    """Pick the matrix row for this vocabulary size, stepping down while the machine has too little RAM.

    Returns the strategy and a one-line reason; below the conservative row's RAM the conservative
    row is still used, and the reason says so.
    """
    ram_gib = ram_bytes / 2**30
    wanted = STRATEGIES[next(i for i, s in enumerate(STRATEGIES) if s.max_genes is None or n_genes <= s.max_genes)]
    fits = [s for s in STRATEGIES[: STRATEGIES.index(wanted) + 1] if ram_gib >= s.min_ram_gib]
    chosen = fits[-1] if fits else STRATEGIES[0]
    reason = f"{n_genes} genes, {ram_gib:.1f} GiB RAM → {chosen.name}"
    if chosen is not wanted:
        reason += f" (stepped down from {wanted.name}, which asks for {wanted.min_ram_gib:g} GiB)"
    if not fits:
        reason += f"; below even its {chosen.min_ram_gib:g} GiB: expect slow, chunked QC"
    return chosen, reason


def apply_memory_strategy(qc: QCConfig, recorded: dict[str, Any] | None) -> QCConfig:
    """The QC settings a recorded strategy implies; an explicit ``qc.strategy`` (not auto) always wins."""
    if qc.strategy != "auto" or not recorded:
        return qc

    return dataclasses.replace(qc, memory_fraction=recorded["memory_fraction"], chunk_cells=recorded["chunk_cells"],
                               strategy="chunked" if recorded["always_chunked"] else "auto")


def system_file(config: AtlasConfig) -> Path:
    return config.state_dir / "system.json"


def recorded_memory_strategy(config: AtlasConfig) -> dict[str, Any] | None:
    """The strategy the last system validation recorded for this base dir, if any."""

    try:
        return json.loads(system_file(config).read_text())["memory_strategy"]
    except (OSError, ValueError, KeyError):
        return None


