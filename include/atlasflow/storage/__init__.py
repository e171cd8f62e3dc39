"""Disk budget: the folder layout, the reservation ledger, the cleanup policy and the monitor."""

from __future__ import annotations

from atlasflow.core.layout import AREAS, StorageLayout, tree_bytes
from atlasflow.storage.cleanup import Cleaner
from atlasflow.storage.estimate import batch_footprint
from atlasflow.storage.ledger import Admission, BudgetExceededError, Ledger, Reservation

__all__ = [
    "AREAS",
    "Admission",
    "BudgetExceededError",
    "Cleaner",
    "Ledger",
    "Reservation",
    "StorageLayout",
    "batch_footprint",
    "tree_bytes",
]
