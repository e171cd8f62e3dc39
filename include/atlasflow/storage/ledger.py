"""The storage ledger: byte reservations, admission against the disk budget, and history.

A batch is admitted only when the bytes it will need fit next to what is already on disk and
what other admitted batches still expect to write. The ledger is one SQLite file under
``state/``: every admission runs inside ``BEGIN IMMEDIATE``, so concurrent processes (Airflow
sensors, CLI calls) serialise and can never both admit past the budget.

Double counting is avoided per batch: a reservation still *outstanding* is its bytes minus what its
own folders hold now, so a batch's files are counted once, either as usage or as reservation.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atlasflow.core.config import GB, StorageConfig
from atlasflow.core.layout import StorageLayout, tree_bytes

__all__ = ["Admission", "BudgetExceededError", "Ledger", "Reservation"]

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    batch_id TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    paths TEXT NOT NULL,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER,
    created REAL NOT NULL,
    lease_expires REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'released', 'reclaimed'))
);
CREATE TABLE IF NOT EXISTS deletions (
    time REAL NOT NULL, batch_id TEXT, dataset_id TEXT, path TEXT NOT NULL, bytes INTEGER NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    time REAL NOT NULL, data INTEGER, models INTEGER, cache INTEGER, outputs INTEGER, reserved INTEGER, free INTEGER,
    budget INTEGER, event TEXT
);
CREATE TABLE IF NOT EXISTS expansion (
    time REAL NOT NULL, dataset_id TEXT NOT NULL, format TEXT NOT NULL, raw_bytes INTEGER NOT NULL,
    processed_bytes INTEGER NOT NULL
);
"""


# Columns added after the first release: ledgers created before get them on open (NULL in old rows).
_ADDED_COLUMNS = {"samples": (("budget", "INTEGER"), ("event", "TEXT"))}
SAMPLE_KEYS = ("time", "data", "models", "cache", "outputs", "reserved", "free", "budget", "event")


# Processed bytes per downloaded byte before any dataset of a format has been measured here:
# benchmarks/expansion_factors.py on real cells, rounded up by ~25 % (gzip'd text expands most).
# fastq: the processed h5ad of a quantified sample per FASTQ byte (a guess, err high: counts are
# ~1000x smaller than reads); rds: like h5ad, a compressed binary of the same matrix.
SEED_EXPANSION = {"h5ad": 0.7, "10x_h5": 0.5, "10x_mtx": 2.2, "loom": 0.5, "csv": 1.0, "tsv": 6.0,
                  "fastq": 0.05, "rds": 1.5}


class BudgetExceededError(ValueError):
    """A batch that can never fit the budget, however long it waits."""


@dataclass(frozen=True)
class Reservation:
    batch_id: str
    bytes: int
    paths: tuple[str, ...]
    owner: str
    host: str
    pid: int | None
    created: float
    lease_expires: float
    status: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Admission:
    """The answer to one admission attempt; ``reason`` says why in words a user can act on."""

    admitted: bool
    batch_id: str
    bytes: int
    reason: str
    used: int = 0
    outstanding: int = 0
    free: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return "\nState:\tZ" not in status


class Ledger:
    """Reservations and history for one base directory.

    Parameters
    ----------
    config
        The storage section: budget, allocations, free-space floor, lease length.
    """

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.layout = StorageLayout.of(config.base_dir).ensure()
        self.path = self.layout.state / "ledger.sqlite"
        with self._connect() as db:
            db.executescript(SCHEMA)
            for table, columns in _ADDED_COLUMNS.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if name not in have:
                        try:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                        except sqlite3.OperationalError as exc:  # another process added it first
                            if "duplicate column" not in str(exc):
                                raise

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=60000")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # one writer at a time across processes
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ---- queries ------------------------------------------------------------------------------

    def reservations(self, *, active_only: bool = True) -> list[Reservation]:
        with self._connect() as db:
            query = "SELECT * FROM reservations" + (" WHERE status = 'active'" if active_only else "")
            rows = db.execute(query + " ORDER BY created").fetchall()
        return [self._row(r) for r in rows]

    def reservation(self, batch_id: str) -> Reservation | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM reservations WHERE batch_id = ?", (batch_id,)).fetchone()
        return None if row is None else self._row(row)

    @staticmethod
    def _row(row: Sequence[Any]) -> Reservation:
        return Reservation(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4], row[5], row[6], row[7], row[8])

    def outstanding(self, reservation: Reservation) -> int:
        """Bytes a reservation still expects to write: its size minus what its folders hold now."""
        written = sum(tree_bytes(self.layout.base_dir / p) for p in reservation.paths)
        return max(0, reservation.bytes - written)

    def usage(self) -> dict[str, int]:
        return self.layout.area_usage()

    def deletions(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT time, batch_id, dataset_id, path, bytes, reason FROM deletions ORDER BY time").fetchall()
        return [dict(zip(("time", "batch_id", "dataset_id", "path", "bytes", "reason"), r, strict=True)) for r in rows]

    def samples(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(f"SELECT {', '.join(SAMPLE_KEYS)} FROM samples ORDER BY time").fetchall()
        return [dict(zip(SAMPLE_KEYS, r, strict=True)) for r in rows]

    # ---- admission ----------------------------------------------------------------------------

    def try_admit(
        self,
        batch_id: str,
        nbytes: int,
        *,
        paths: Sequence[str] = (),
        owner: str = "",
        after: str | None = None,
        bind_pid: bool = False,
    ) -> Admission:
        """Reserve ``nbytes`` for ``batch_id`` if they fit now.

        Parameters
        ----------
        batch_id
            The batch; a second call for an admitted batch is a no-op that renews its lease
            (a cleared or retried task adopts its own reservation).
        nbytes
            The batch's whole footprint (downloads, processed files, checkpoint).
        paths
            Folders (relative to the base dir) the batch will fill; what they hold counts as the
            reservation being used, not as extra usage.
        owner
            Who asks (e.g. ``dag/run/task``), for the monitor and the logs.
        after
            A batch that must have been admitted first (batches are admitted in order, so an early
            big batch is never starved by later small ones).
        bind_pid
            Tie the reservation to this process: when it dies on this host, the reservation is
            reclaimable at once (for runs outside Airflow). Otherwise only the lease expires it.

        Raises
        ------
        BudgetExceededError
            When ``nbytes`` exceeds the whole budget: waiting would never help.
        """
        budget = self.config.max_storage_bytes
        if nbytes > budget:
            raise BudgetExceededError(
                f"{batch_id} needs {nbytes / GB:.2f} GB but the whole budget is {budget / GB:.2f} GB: it can never "
                "be admitted; raise storage.max_storage_gb, lower plan.batch_size or plan.max_batch_gb, or check "
                "the manifest's expected_bytes"
            )
        now = time.time()
        lease = now + self.config.reservation_lease_hours * 3600
        host, pid = socket.gethostname(), os.getpid() if bind_pid else None
        with self._transaction() as db:
            self._reclaim(db, now)
            row = db.execute("SELECT status FROM reservations WHERE batch_id = ?", (batch_id,)).fetchone()
            if row is not None and row[0] == "active":
                db.execute("UPDATE reservations SET lease_expires = ?, owner = ?, host = ?, pid = ? WHERE batch_id = ?",
                           (lease, owner, host, pid, batch_id))
                return Admission(True, batch_id, nbytes, f"{batch_id} already admitted; lease renewed")
            if after is not None:
                prev = db.execute("SELECT 1 FROM reservations WHERE batch_id = ?", (after,)).fetchone()
                if prev is None:
                    return Admission(False, batch_id, nbytes, f"waiting for {after} to be admitted first")
            others = [self._row(r) for r in db.execute("SELECT * FROM reservations WHERE status = 'active'")]
            outstanding = sum(self.outstanding(r) for r in others)
            usage = self.layout.area_usage()
            used = sum(usage.values())
            free = self.layout.free_bytes()
            floor = int(self.config.min_free_gb * GB)
            if used + outstanding + nbytes > budget:
                reason = (f"{batch_id} waits: {nbytes / GB:.3f} GB needed, {used / GB:.3f} GB on disk + "
                          f"{outstanding / GB:.3f} GB still reserved by {len(others)} batch(es) "
                          f"of a {budget / GB:.3f} GB budget")
                if not others:
                    reason += ("; no other batch holds a reservation, so only freeing space (fewer kept "
                               "checkpoints, `atlasflow storage` shows what is reclaimable) or a larger "
                               "storage.max_storage_gb will admit it")
                self._sample(db, reserved=outstanding, free=free, usage=usage,
                             event=f"{batch_id} waits")
                return Admission(False, batch_id, nbytes, reason, used, outstanding, free)
            if free - outstanding - nbytes < floor:
                reason = (f"{batch_id} waits: the volume has {free / GB:.3f} GB free, {outstanding / GB:.3f} GB of it "
                          f"promised, and {self.config.min_free_gb:g} GB must stay free")
                self._sample(db, reserved=outstanding, free=free, usage=usage,
                             event=f"{batch_id} waits")
                return Admission(False, batch_id, nbytes, reason, used, outstanding, free)
            db.execute(
                "INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'active')",
                (batch_id, int(nbytes), json.dumps(list(paths)), owner, host, pid, now, lease),
            )
            self._sample(db, reserved=outstanding + nbytes, free=free, usage=usage, event=f"{batch_id} admitted")
        log.info("admitted %s: %d bytes reserved (%s)", batch_id, nbytes, owner)
        return Admission(True, batch_id, nbytes, f"{batch_id} admitted: {nbytes / GB:.3f} GB reserved",
                         used, outstanding, free)

    def _reclaim(self, db: sqlite3.Connection, now: float) -> None:
        host = socket.gethostname()
        for r in [self._row(x) for x in db.execute("SELECT * FROM reservations WHERE status = 'active'")]:
            dead = r.pid is not None and r.host == host and not _pid_alive(r.pid)
            if r.lease_expires < now or dead:
                why = f"owner pid {r.pid} is gone" if dead else "lease expired"
                db.execute("UPDATE reservations SET status = 'reclaimed' WHERE batch_id = ?", (r.batch_id,))
                log.warning("reclaimed the reservation of %s (%d bytes): %s", r.batch_id, r.bytes, why)

    def heartbeat(self, batch_id: str) -> bool:
        """Renew a batch's lease (long tasks call this); False when it holds no active reservation."""
        lease = time.time() + self.config.reservation_lease_hours * 3600
        with self._transaction() as db:
            cur = db.execute("UPDATE reservations SET lease_expires = ? WHERE batch_id = ? AND status = 'active'",
                             (lease, batch_id))
            return cur.rowcount == 1

    def release(self, batch_id: str) -> bool:
        """End a batch's reservation (its cleanup ran); False when there was none active."""
        with self._transaction() as db:
            cur = db.execute("UPDATE reservations SET status = 'released' WHERE batch_id = ? AND status = 'active'",
                             (batch_id,))
            done = cur.rowcount == 1
            self._sample(db, event=f"{batch_id} released")
        if done:
            log.info("released the reservation of %s", batch_id)
        return done

    # ---- history ------------------------------------------------------------------------------

    def record_deletion(self, path: str, nbytes: int, reason: str, *, batch_id: str | None = None,
                        dataset_id: str | None = None) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO deletions VALUES (?, ?, ?, ?, ?, ?)",
                       (time.time(), batch_id, dataset_id, path, int(nbytes), reason))

    def record_expansion(self, dataset_id: str, fmt: str, raw_bytes: int, processed_bytes: int) -> None:
        """Measured processed/raw bytes for a dataset, so later estimates for ``fmt`` improve."""
        if raw_bytes <= 0:
            return
        with self._transaction() as db:
            db.execute("INSERT INTO expansion VALUES (?, ?, ?, ?, ?)",
                       (time.time(), dataset_id, fmt, int(raw_bytes), int(processed_bytes)))

    def expansion_factor(self, fmt: str | None) -> float:
        """Processed bytes per raw byte for ``fmt``: measured here (byte-weighted), else a seed value
        for known formats, else ``storage.default_expansion``."""
        if fmt:
            with self._connect() as db:
                raw, processed = db.execute(
                    "SELECT SUM(raw_bytes), SUM(processed_bytes) FROM expansion WHERE format = ?", (fmt,)).fetchone()
            if raw:
                return processed / raw
            if fmt in SEED_EXPANSION:
                return SEED_EXPANSION[fmt]
        return self.config.default_expansion

    def expansion_table(self) -> dict[str, dict[str, float]]:
        with self._connect() as db:
            rows = db.execute("SELECT format, COUNT(*), SUM(raw_bytes), SUM(processed_bytes) FROM expansion "
                              "GROUP BY format ORDER BY format").fetchall()
        return {f: {"datasets": n, "raw_bytes": r, "processed_bytes": p, "factor": p / r} for f, n, r, p in rows}

    def sample(self, event: str | None = None) -> None:
        """Record current usage (for the storage-over-time plot); ``event`` says what just happened.

        The steps call this after each download, processed dataset, training and cleanup. The
        folders are walked before the write lock is taken, so a sample never blocks an admission
        for the length of a walk.
        """
        usage = self.layout.area_usage()
        reserved = sum(self.outstanding(r) for r in self.reservations())
        free = self.layout.free_bytes()
        with self._transaction() as db:
            self._insert_sample(db, usage, reserved, free, event)

    def _sample(self, db: sqlite3.Connection, *, reserved: int | None = None, free: int | None = None,
                usage: dict[str, int] | None = None, event: str | None = None) -> None:
        usage = self.layout.area_usage() if usage is None else usage
        if reserved is None:
            reserved = sum(self.outstanding(self._row(r)) for r in db.execute(
                "SELECT * FROM reservations WHERE status = 'active'"))
        self._insert_sample(db, usage, reserved, self.layout.free_bytes() if free is None else free, event)

    def _insert_sample(self, db: sqlite3.Connection, usage: dict[str, int], reserved: int, free: int,
                       event: str | None) -> None:
        db.execute(f"INSERT INTO samples ({', '.join(SAMPLE_KEYS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (time.time(), usage["data"], usage["models"], usage["cache"], usage["outputs"], reserved, free,
                    self.config.max_storage_bytes, event))
