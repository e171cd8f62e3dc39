"""The cleanup policy: what is deleted when, every deletion recorded, a tombstone per dataset.

- a dataset's raw download: once it has been processed;
- a batch's processed files: once the batch has been trained;
- checkpoints and integration models: all but the last ``storage.keep_checkpoints`` batches
  (the production checkpoint named by ``models/production.json`` is always kept);
- the cache: between batches.

Nothing outside the base dir is ever deleted: every path is resolved first, and symlinks are
removed as links, never followed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atlasflow.core.fsutil import discard_dir, write_json_atomic
from atlasflow.core.layout import BATCH_DIR as _BATCH_DIR
from atlasflow.core.layout import StorageLayout, tree_bytes
from atlasflow.storage.ledger import Ledger

__all__ = ["Cleaner", "file_sha256"]

log = logging.getLogger(__name__)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Cleaner:
    """Applies the cleanup policy for one base dir and records what it freed in the ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.layout: StorageLayout = ledger.layout

    def remove(self, path: Path, reason: str, *, batch_id: str | None = None, dataset_id: str | None = None) -> int:
        """Delete one file or folder below the base dir, recording the bytes freed; returns them."""
        if not os.path.lexists(path):
            return 0
        if path.is_symlink():  # a link is removed as a link, whatever it points at
            self.layout.inside(path.parent)
            path.unlink()
            return 0
        target = self.layout.inside(path)
        if target == self.layout.base_dir:
            raise ValueError("refusing to delete the whole base dir")
        nbytes = tree_bytes(target)
        if target.is_dir():
            # renamed aside first (a kill leaves no half-deleted checkpoint or dataset under its name);
            # rmtree does not follow symlinks inside the tree; it unlinks them
            discard_dir(target)
        else:
            target.unlink()
        self.ledger.record_deletion(str(target.relative_to(self.layout.base_dir)), nbytes, reason,
                                    batch_id=batch_id, dataset_id=dataset_id)
        log.info("deleted %s (%d bytes): %s", target, nbytes, reason)
        return nbytes

    def delete_raw(self, dataset_id: str, *, batch_id: str | None = None) -> int:
        """Delete a processed dataset's download; returns the bytes freed."""
        return self.remove(self.layout.raw_dir(dataset_id), "raw data no longer needed: dataset processed",
                            batch_id=batch_id, dataset_id=dataset_id)

    def delete_processed(self, batch_id: str) -> int:
        """Delete a trained batch's processed files."""
        return self.remove(self.layout.processed_dir(batch_id), "processed data no longer needed: batch trained",
                            batch_id=batch_id)

    def prune_checkpoints(self, keep: int | None = None) -> int:
        """Keep the newest ``keep`` batch folders under models/checkpoints and models/integration."""
        keep = self.ledger.config.keep_checkpoints if keep is None else keep
        production = self._production_checkpoint()
        freed = 0
        for root in (self.layout.checkpoints, self.layout.integration):
            if not root.is_dir():
                continue
            batches = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _BATCH_DIR.match(p.name)))
            for _, path in batches[:-keep] if keep > 0 else batches:
                if root == self.layout.checkpoints and path.resolve() == production:
                    continue  # the promoted model is what the next run resumes from: never pruned
                freed += self.remove(path, f"older than the last {keep} checkpoints", batch_id=path.name)
        return freed

    def _production_checkpoint(self) -> Path | None:
        import json

        pointer = self.layout.production_pointer
        try:
            return Path(json.loads(pointer.read_text())["checkpoint_dir"]).resolve()
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable %s (%s): no checkpoint is protected from pruning", pointer, exc)
            return None

    def clear_cache(self) -> int:
        freed = 0
        if self.layout.cache.is_dir():
            for entry in sorted(self.layout.cache.iterdir()):  # a list: removal renames entries
                freed += self.remove(entry, "cache cleared between batches")
        return freed

    def finish_batch(self, batch_id: str, dataset_ids: list[str]) -> dict[str, Any]:
        """Everything the policy frees once a batch is trained, then release its reservation."""
        freed = {
            "raw": sum(self.delete_raw(d, batch_id=batch_id) for d in dataset_ids),
            "processed": self.delete_processed(batch_id),
            "checkpoints": self.prune_checkpoints(),
            "cache": self.clear_cache(),
        }
        released = self.ledger.release(batch_id)
        return {"batch_id": batch_id, "freed_bytes": freed, "released": released}

    def reclaimable(self, trained_batches: set[str] | None = None) -> dict[str, int]:
        """Bytes the policy could free now (for the monitor): cache, surplus checkpoints, trained batches' data."""
        keep = self.ledger.config.keep_checkpoints
        surplus = 0
        for root in (self.layout.checkpoints, self.layout.integration):
            if root.is_dir():
                batches = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _BATCH_DIR.match(p.name)))
                surplus += sum(tree_bytes(p) for _, p in batches[:-keep])
        processed = 0
        if trained_batches and self.layout.processed.is_dir():
            processed = sum(tree_bytes(p) for p in self.layout.processed.iterdir() if p.name in trained_batches)
        tombstoned_raw = 0
        if self.layout.raw.is_dir():
            tombstoned_raw = sum(tree_bytes(p) for p in self.layout.raw.iterdir()
                                 if (self.layout.tombstones / f"{p.name}.json").exists())
        return {"cache": tree_bytes(self.layout.cache), "old_checkpoints": surplus,
                "processed_of_trained_batches": processed, "raw_of_processed_datasets": tombstoned_raw}

    def write_tombstone(self, dataset_id: str, info: Mapping[str, Any]) -> Path:
        """What resume needs to know about a dataset after its data is gone (checksums, counts, hashes)."""
        path = self.layout.tombstones / f"{dataset_id}.json"
        return write_json_atomic(path, {"dataset_id": dataset_id, **info})

    def tombstone(self, dataset_id: str) -> dict[str, Any] | None:
        import json

        path = self.layout.tombstones / f"{dataset_id}.json"
        return json.loads(path.read_text()) if path.exists() else None
