"""The folders under ``storage.base_dir`` and how many bytes each holds (see docs/contracts.md)."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AREAS", "BATCH_DIR", "StorageLayout", "tree_bytes"]

#: A batch's own folder under models/checkpoints or models/integration (group 1: its index).
BATCH_DIR = re.compile(r"^batch_([0-9]{4,})$")

# Allocation areas from the config and the folders that count against each.
AREAS: dict[str, tuple[str, ...]] = {
    "data": ("data/raw", "data/processed"),
    "models": ("models",),
    "cache": ("cache",),
    # reports/ is the run reports' fixed address (reports/latest.json); it counts as outputs
    "outputs": ("outputs", "reports"),
}


def tree_bytes(path: Path) -> int:
    """Bytes on disk of the regular files under ``path`` (symlinks are not followed or counted)."""
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            entries = os.scandir(current)
        except (FileNotFoundError, NotADirectoryError):
            try:
                st = current.lstat()
            except FileNotFoundError:
                continue
            total += max(st.st_blocks * 512, st.st_size)
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        # the larger of allocated and apparent size: conservative for the budget
                        total += max(st.st_blocks * 512, st.st_size)
                except FileNotFoundError:  # deleted while we walked: it no longer uses space
                    continue
    return total


@dataclass(frozen=True)
class StorageLayout:
    """Paths of the storage areas for one base directory."""

    base_dir: Path

    @classmethod
    def of(cls, base_dir: str | os.PathLike[str]) -> StorageLayout:
        return cls(Path(base_dir).resolve())

    @property
    def raw(self) -> Path:
        return self.base_dir / "data" / "raw"

    @property
    def processed(self) -> Path:
        return self.base_dir / "data" / "processed"

    @property
    def models(self) -> Path:
        return self.base_dir / "models"

    @property
    def checkpoints(self) -> Path:
        return self.models / "checkpoints"

    @property
    def production_pointer(self) -> Path:
        """``models/production.json``: the promoted checkpoint (written by atlas_retrain)."""
        return self.models / "production.json"

    @property
    def integration(self) -> Path:
        return self.models / "integration"

    @property
    def cache(self) -> Path:
        return self.base_dir / "cache"

    @property
    def outputs(self) -> Path:
        return self.base_dir / "outputs"

    @property
    def reports(self) -> Path:
        return self.base_dir / "reports"

    @property
    def state(self) -> Path:
        return self.base_dir / "state"

    @property
    def tombstones(self) -> Path:
        return self.state / "tombstones"

    def raw_dir(self, dataset_id: str) -> Path:
        return self.raw / dataset_id

    def processed_dir(self, batch_id: str) -> Path:
        return self.processed / batch_id

    def ensure(self) -> StorageLayout:
        for path in (self.raw, self.processed, self.checkpoints, self.integration, self.cache, self.outputs,
                     self.tombstones):
            path.mkdir(parents=True, exist_ok=True)
        return self

    def area_usage(self) -> dict[str, int]:
        """Bytes used per allocation area."""
        return {area: sum(tree_bytes(self.base_dir / sub) for sub in subs) for area, subs in AREAS.items()}

    def free_bytes(self) -> int:
        """Free bytes on the volume holding the base dir (statvfs, as an unprivileged user sees it)."""
        probe = self.base_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def inside(self, path: Path) -> Path:
        """``path`` resolved, or ``ValueError`` when it lies outside the base dir (symlinks included)."""
        resolved = Path(os.path.realpath(path))
        if resolved != self.base_dir and not resolved.is_relative_to(self.base_dir):
            raise ValueError(f"refusing to touch {path}: it resolves to {resolved}, outside {self.base_dir}")
        return resolved
