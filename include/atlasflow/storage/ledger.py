"""The storage ledger: byte reservations, admission against the disk budget, and history.

A batch is admitted only when the bytes it will need fit next to what is already on disk and
what other admitted batches still expect to write. Every admission runs under one write lock, so
concurrent processes (Airflow sensors, CLI calls, workers on other hosts) serialise and can never
both admit past the budget.

Two backends hold the same tables (docs/deploy.md says which to use when):

- **SQLite** (the default): one file, ``state/ledger.sqlite`` under the base dir, in WAL mode; the
  lock is ``BEGIN IMMEDIATE``. Every process must run on one host (WAL needs shared memory).
- **A server database** (``storage.ledger_url``, e.g. PostgreSQL, which may be Airflow's metadata
  server): for workers on several hosts sharing the base dir; the lock is
  ``LOCK TABLE reservations IN EXCLUSIVE MODE``, held to the end of the transaction.

The folders are walked *before* the lock is taken (a walk of a large or NFS tree may take minutes);
inside the lock the admission only re-reads the reservations (see :meth:`Ledger.try_admit`).

Double counting is avoided per batch: a reservation still *outstanding* is its bytes minus what its
own folders hold now, so a batch's files are counted once, either as usage or as reservation.

**The model lane.** Batches train one after another, so only one at a time writes model artefacts
(a checkpoint, the integration's model). A batch asks for them as ``lane_bytes`` apart from its
data: the earliest admitted batch holds the lane (its reservation includes them); a later batch
reserves its data only, and is admitted only if the lane could still be handed to it (room for
``lane_bytes`` once, or once per checkpoint still missing to ``storage.keep_checkpoints``, since
until then each hand-over leaves a checkpoint behind that cleanup does not prune). Releasing
or reclaiming the holder hands the lane to the earliest active batch in the same transaction. Batches
waiting for the trainer therefore no longer each hold a model's worth of the budget, which is what
kept downloads from running ahead under a small budget.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.pool import NullPool

from atlasflow.core.config import GB, StorageConfig
from atlasflow.core.layout import BATCH_DIR as _BATCH_DIR
from atlasflow.core.layout import StorageLayout, tree_bytes

__all__ = ["Admission", "BudgetExceededError", "Ledger", "LedgerURLError", "Reservation", "ledger_url"]

log = logging.getLogger(__name__)

# Portable DDL (SQLite and PostgreSQL): BIGINT for byte counts (PostgreSQL's INTEGER is 32-bit) and
# DOUBLE PRECISION for Unix times (its REAL is 32-bit); SQLite reads both as its INTEGER / REAL.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS reservations (
    batch_id TEXT PRIMARY KEY,
    bytes BIGINT NOT NULL,
    paths TEXT NOT NULL,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER,
    created DOUBLE PRECISION NOT NULL,
    lease_expires DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'released', 'reclaimed'))
)""",
    """CREATE TABLE IF NOT EXISTS deletions (
    time DOUBLE PRECISION NOT NULL, batch_id TEXT, dataset_id TEXT, path TEXT NOT NULL, bytes BIGINT NOT NULL,
    reason TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS samples (
    time DOUBLE PRECISION NOT NULL, data BIGINT, models BIGINT, cache BIGINT, outputs BIGINT, reserved BIGINT,
    free BIGINT, budget BIGINT, event TEXT
)""",
    """CREATE TABLE IF NOT EXISTS expansion (
    time DOUBLE PRECISION NOT NULL, dataset_id TEXT NOT NULL, format TEXT NOT NULL, raw_bytes BIGINT NOT NULL,
    processed_bytes BIGINT NOT NULL
)""",
)
RESERVATION_COLUMNS = ("batch_id", "bytes", "paths", "owner", "host", "pid", "created", "lease_expires", "status",
                       "lane_bytes", "lane_held")
_RESERVATIONS = f"SELECT {', '.join(RESERVATION_COLUMNS)} FROM reservations"
# Taken by schema creation on a server database: concurrent CREATE TABLE IF NOT EXISTS can collide there.
_SCHEMA_LOCK_KEY = 0x61746C6173  # "atlas"
_schema_ready: set[str] = set()  # server ledgers whose tables this process has already created or checked


# Columns added after the first release: ledgers created before get them on open (NULL in old rows).
_ADDED_COLUMNS = {"samples": (("budget", "BIGINT"), ("event", "TEXT")),
                  "reservations": (("lane_bytes", "BIGINT NOT NULL DEFAULT 0"),
                                   ("lane_held", "INTEGER NOT NULL DEFAULT 0"))}
SAMPLE_KEYS = ("time", "data", "models", "cache", "outputs", "reserved", "free", "budget", "event")


# Processed bytes per downloaded byte before any dataset of a format has been measured here:
# benchmarks/expansion_factors.py on real cells, rounded up by ~25 % (gzip'd text expands most).
# fastq: the processed h5ad of a quantified sample per FASTQ byte (a guess, err high: counts are
# ~1000x smaller than reads); rds: like h5ad, a compressed binary of the same matrix.
SEED_EXPANSION = {"h5ad": 0.7, "10x_h5": 0.5, "10x_mtx": 2.2, "loom": 0.5, "csv": 1.0, "tsv": 6.0,
                  "fastq": 0.05, "rds": 1.5}


class BudgetExceededError(ValueError):
    """A batch that can never fit the budget, however long it waits."""


class LedgerURLError(ValueError):
    """``storage.ledger_url`` (or the variable named by ``storage.ledger_url_env``) is unusable."""


def ledger_url(config: StorageConfig) -> str | None:
    """The server database the ledger lives in, or None for the SQLite file under the base dir.

    ``storage.ledger_url`` wins; else the environment variable named by ``storage.ledger_url_env``
    (keeps the password out of config files); else None.
    """
    url = config.ledger_url or (os.environ.get(config.ledger_url_env) if config.ledger_url_env else None)
    return url.strip() or None if url else None


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
    lane_bytes: int = 0  # the model artefacts this batch needs once it trains (0: it never trains)
    lane_held: bool = False  # whether ``bytes`` includes them (the batch holds the model lane)

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
        The storage section: budget, allocations, free-space floor, lease length, where the ledger lives.
    lock_timeout_s
        How long a write waits for the lock before it fails (a busy ledger is an error, not a hang).
    """

    def __init__(self, config: StorageConfig, *, lock_timeout_s: float = 60.0) -> None:
        self.config = config
        self.layout = StorageLayout.of(config.base_dir).ensure()
        self.lock_timeout_s = lock_timeout_s
        url = ledger_url(config)
        self.path: Path | None = None
        if url is None:
            self.path = self.layout.state / "ledger.sqlite"
            self.engine = self._sqlite_engine(self.path, lock_timeout_s)
        else:
            self.engine = self._server_engine(url)
        self.server = self.engine.dialect.name != "sqlite"
        #: Where the ledger lives, safe to show (a server URL without its password).
        self.location = str(self.path) if self.path else self.engine.url.render_as_string(hide_password=True)
        if not self.server:
            self._create_schema()  # cheap on a local file, and the file may have been replaced
        elif self.location not in _schema_ready:
            self._create_schema()
            _schema_ready.add(self.location)

    @staticmethod
    def _sqlite_engine(path: Path, lock_timeout_s: float) -> Engine:
        # No pool: a connection never outlives its call, so forked workers never share one.
        engine = create_engine(f"sqlite:///{path}", poolclass=NullPool, connect_args={"timeout": lock_timeout_s})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # transactions are begun below, not by the driver
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout_s * 1000)}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock at BEGIN: one writer at a time across processes
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

        return engine

    @staticmethod
    def _server_engine(url: str) -> Engine:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise LedgerURLError(f"storage.ledger_url is not a database URL: {exc}") from None
        shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() != "postgresql":
            raise LedgerURLError(f"storage.ledger_url {shown}: only PostgreSQL is supported as a server ledger "
                                 "(postgresql+psycopg2://user:password@host:port/database); leave it empty for "
                                 "the SQLite file under the base dir")
        try:
            return create_engine(parsed, poolclass=NullPool, pool_pre_ping=False)
        except NoSuchModuleError as exc:
            raise LedgerURLError(f"storage.ledger_url {shown}: {exc}") from None

    def _create_schema(self) -> None:
        with self.engine.connect() as db, db.begin():
            if self.server:
                db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            for statement in SCHEMA:
                db.exec_driver_sql(statement)
            for table, columns in _ADDED_COLUMNS.items():
                have = {c["name"] for c in inspect(db).get_columns(table)}
                for name, kind in columns:
                    if name in have:
                        continue
                    try:
                        db.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                    except OperationalError as exc:  # SQLite: another process added it first
                        if "duplicate column" not in str(exc):
                            raise

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection for reads (each statement sees the latest committed state)."""
        with self.engine.connect() as db, db.begin():
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction holding the ledger's lock until it commits or rolls back."""
        with self.engine.connect().execution_options(write=True) as db, db.begin():
            if self.server:
                db.execute(text(f"SET LOCAL lock_timeout = {int(self.lock_timeout_s * 1000)}"))
                db.exec_driver_sql("LOCK TABLE reservations IN EXCLUSIVE MODE")
            yield db

    # ---- queries ------------------------------------------------------------------------------

    def reservations(self, *, active_only: bool = True) -> list[Reservation]:
        with self._connect() as db:
            return self._reservations(db, active_only=active_only)

    def _reservations(self, db: Connection, *, active_only: bool = True) -> list[Reservation]:
        query = _RESERVATIONS + (" WHERE status = 'active'" if active_only else "")
        return [self._row(r) for r in db.execute(text(query + " ORDER BY created, batch_id"))]

    def reservation(self, batch_id: str) -> Reservation | None:
        with self._connect() as db:
            return self._reservation(db, batch_id)

    def _reservation(self, db: Connection, batch_id: str) -> Reservation | None:
        row = db.execute(text(_RESERVATIONS + " WHERE batch_id = :b"), {"b": batch_id}).fetchone()
        return None if row is None else self._row(row)

    @staticmethod
    def _row(row: Sequence[Any]) -> Reservation:
        return Reservation(row[0], int(row[1]), tuple(json.loads(row[2])), row[3], row[4], row[5], float(row[6]),
                           float(row[7]), row[8], int(row[9] or 0), bool(row[10]))

    def outstanding(self, reservation: Reservation) -> int:
        """Bytes a reservation still expects to write: its size minus what its folders hold now.

        A folder's temporaries beside it count as written too: a checkpoint save or an integration
        builds ``.<name>.<owner>.tmp`` (or ``<name>.<owner>.partial``) next to its folder and renames
        it into place, and those bytes are already on disk, so they are not also still outstanding.
        """
        written = 0
        listings: dict[Path, list[str]] = {}
        for rel in reservation.paths:
            path = self.layout.base_dir / rel
            written += tree_bytes(path)
            if path.parent not in listings:
                try:
                    listings[path.parent] = os.listdir(path.parent)
                except (FileNotFoundError, NotADirectoryError):
                    listings[path.parent] = []
            for name in listings[path.parent]:
                if ((name.startswith(f".{path.name}.") and name.endswith(".tmp"))
                        or (name.startswith(f"{path.name}.") and name.endswith(".partial"))):
                    written += tree_bytes(path.parent / name)
        return max(0, reservation.bytes - written)

    def usage(self) -> dict[str, int]:
        return self.layout.area_usage()

    def deletions(self) -> list[dict[str, Any]]:
        keys = ("time", "batch_id", "dataset_id", "path", "bytes", "reason")
        with self._connect() as db:
            rows = db.execute(text(f"SELECT {', '.join(keys)} FROM deletions ORDER BY time")).fetchall()
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def samples(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(text(f"SELECT {', '.join(SAMPLE_KEYS)} FROM samples ORDER BY time")).fetchall()
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
        lane_bytes: int = 0,
    ) -> Admission:
        """Reserve ``nbytes`` for ``batch_id`` if they fit now (and its model lane, see the module's doc).

        The folders are measured before the write lock is taken: first what every active
        reservation has written, then the whole tree, so bytes written in between count twice (a
        safe overestimate), never not at all. Inside the lock the reservations are read again:
        one measured before keeps its figure, one admitted meanwhile counts whole (nothing of it
        was measured), one released or reclaimed meanwhile counts nothing.

        Parameters
        ----------
        batch_id
            The batch; a second call for an admitted batch is a no-op that renews its lease
            (a cleared or retried task adopts its own reservation).
        nbytes
            The batch's data footprint (downloads, processed files, working space).
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
        lane_bytes
            The model artefacts the batch writes when it trains (0: it never trains): reserved
            now if no active batch holds the model lane, else handed to it later.

        Raises
        ------
        BudgetExceededError
            When ``nbytes + lane_bytes`` exceeds the whole budget: waiting would never help.
        """
        budget = self.config.max_storage_bytes
        if nbytes + lane_bytes > budget:
            nbytes += lane_bytes  # the message names the batch's whole footprint
            raise BudgetExceededError(
                f"{batch_id} needs {nbytes / GB:.2f} GB but the whole budget is {budget / GB:.2f} GB: it can never "
                "be admitted; raise storage.max_storage_gb, lower plan.batch_size or plan.max_batch_gb, or check "
                "the manifest's expected_bytes"
            )
        mine = self.reservation(batch_id)
        measured = None if mine is not None and mine.status == "active" else self._measure()
        admission = self._admit(batch_id, nbytes, paths=paths, owner=owner, after=after, bind_pid=bind_pid,
                                measured=measured, lane_bytes=lane_bytes)
        if admission is None:  # its reservation was reclaimed between the look and the lock: measure after all
            admission = self._admit(batch_id, nbytes, paths=paths, owner=owner, after=after, bind_pid=bind_pid,
                                    measured=self._measure(), lane_bytes=lane_bytes)
        assert admission is not None
        if admission.admitted and "admitted:" in admission.reason:
            log.info("admitted %s: %d bytes reserved (%s)", batch_id, nbytes, owner)
        return admission

    def _measure(self) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
        """Outstanding bytes per active reservation (keyed with its size), then usage per area."""
        before = {r.batch_id: (r.bytes, self.outstanding(r)) for r in self.reservations()}
        return before, self.layout.area_usage()

    def _admit(self, batch_id: str, nbytes: int, *, paths: Sequence[str], owner: str, after: str | None,
               bind_pid: bool, measured: tuple[Mapping[str, tuple[int, int]], dict[str, int]] | None,
               lane_bytes: int = 0) -> Admission | None:
        budget = self.config.max_storage_bytes
        now = time.time()
        lease = now + self.config.reservation_lease_hours * 3600
        host, pid = socket.gethostname(), os.getpid() if bind_pid else None
        with self._transaction() as db:
            self._reclaim(db, now)
            mine = self._reservation(db, batch_id)
            if mine is not None and mine.status == "active":
                db.execute(text("UPDATE reservations SET lease_expires = :lease, owner = :owner, host = :host, "
                                "pid = :pid WHERE batch_id = :b"),
                           {"lease": lease, "owner": owner, "host": host, "pid": pid, "b": batch_id})
                return Admission(True, batch_id, nbytes, f"{batch_id} already admitted; lease renewed")
            if after is not None and self._reservation(db, after) is None:
                return Admission(False, batch_id, nbytes, f"waiting for {after} to be admitted first")
            if measured is None:
                return None
            before, usage = measured
            others = self._reservations(db)
            outstanding = sum(before[r.batch_id][1] if before.get(r.batch_id, (None,))[0] == r.bytes else r.bytes
                              for r in others)
            used = sum(usage.values())
            free = self.layout.free_bytes()  # statvfs: cheap, so taken fresh under the lock
            floor = int(self.config.min_free_gb * GB)
            takes_lane = lane_bytes > 0 and not any(r.lane_held for r in others)
            reserve = nbytes + (lane_bytes if takes_lane else 0)
            # room the lane's later hand-overs need, kept free rather than reserved by every batch
            headroom = 0 if takes_lane or lane_bytes == 0 else self._lane_headroom(others, lane_bytes)
            if used + outstanding + reserve + headroom > budget:
                reason = (f"{batch_id} waits: {reserve / GB:.3f} GB needed"
                          + (f" (+{headroom / GB:.3f} GB kept free for the model lane)" if headroom else "")
                          + f", {used / GB:.3f} GB on disk + {outstanding / GB:.3f} GB still reserved by "
                          f"{len(others)} batch(es) of a {budget / GB:.3f} GB budget")
                if not others:
                    reason += ("; no other batch holds a reservation, so only freeing space (fewer kept "
                               "checkpoints, `atlasflow storage` shows what is reclaimable) or a larger "
                               "storage.max_storage_gb will admit it")
                self._insert_sample(db, usage, outstanding, free, f"{batch_id} waits")
                return Admission(False, batch_id, nbytes, reason, used, outstanding, free)
            if free - outstanding - reserve - headroom < floor:
                reason = (f"{batch_id} waits: the volume has {free / GB:.3f} GB free, {outstanding / GB:.3f} GB of it "
                          f"promised, and {self.config.min_free_gb:g} GB must stay free")
                self._insert_sample(db, usage, outstanding, free, f"{batch_id} waits")
                return Admission(False, batch_id, nbytes, reason, used, outstanding, free)
            row = {"b": batch_id, "bytes": int(reserve), "paths": json.dumps(list(paths)), "owner": owner,
                   "host": host, "pid": pid, "created": now, "lease": lease, "lane": int(lane_bytes),
                   "held": int(takes_lane)}
            # a released or reclaimed batch that is admitted again takes its old row
            db.execute(text(
                f"INSERT INTO reservations ({', '.join(RESERVATION_COLUMNS)}) VALUES (:b, :bytes, :paths, :owner, "
                ":host, :pid, :created, :lease, 'active', :lane, :held) ON CONFLICT (batch_id) DO UPDATE SET "
                "bytes = :bytes, paths = :paths, owner = :owner, host = :host, pid = :pid, created = :created, "
                "lease_expires = :lease, status = 'active', lane_bytes = :lane, lane_held = :held"), row)
            self._insert_sample(db, usage, outstanding + reserve, free, f"{batch_id} admitted")
        lane = (" with the model lane" if takes_lane else
                f"; its {lane_bytes / GB:.3f} GB of model artefacts come with the model lane" if lane_bytes else "")
        return Admission(True, batch_id, reserve, f"{batch_id} admitted: {reserve / GB:.3f} GB reserved{lane}",
                         used, outstanding, free)

    def _lane_headroom(self, others: Sequence[Reservation], lane_bytes: int) -> int:
        """Bytes to keep free so that the model lane can always be handed on.

        A hand-over leaves the previous holder's checkpoint and scVI model behind. Until
        ``keep_checkpoints`` of them are on disk cleanup prunes none, so each hand-over before that
        needs room for one more; after it, each hand-over's prune frees what it adds. One lane of
        room stays free in any case: a lane holds the checkpoint twice (the save beside the old
        copy), and that spare copy covers a later batch's larger lane or a promoted checkpoint that
        pruning skips.
        """
        largest = max([lane_bytes] + [r.lane_bytes for r in others if not r.lane_held])
        root = self.layout.checkpoints
        kept = sum(1 for p in root.iterdir() if _BATCH_DIR.match(p.name)) if root.is_dir() else 0
        return largest * max(1, self.config.keep_checkpoints - kept)

    def _pass_lane(self, db: Connection) -> None:
        """Hand the model lane to the earliest active batch that needs it when nobody holds it."""
        active = self._reservations(db)
        if any(r.lane_held for r in active):
            return
        waiting = [r for r in active if r.lane_bytes > 0]  # in admission order (created, batch id)
        if not waiting:
            return
        to = waiting[0]
        db.execute(text("UPDATE reservations SET bytes = bytes + lane_bytes, lane_held = 1 WHERE batch_id = :b"),
                   {"b": to.batch_id})
        log.info("handed the model lane (%d bytes) to %s", to.lane_bytes, to.batch_id)

    def _reclaim(self, db: Connection, now: float) -> None:
        host = socket.gethostname()
        reclaimed = False
        for r in self._reservations(db):
            dead = r.pid is not None and r.host == host and not _pid_alive(r.pid)
            if r.lease_expires < now or dead:
                why = f"owner pid {r.pid} is gone" if dead else "lease expired"
                db.execute(text("UPDATE reservations SET status = 'reclaimed' WHERE batch_id = :b"), {"b": r.batch_id})
                log.warning("reclaimed the reservation of %s (%d bytes): %s", r.batch_id, r.bytes, why)
                reclaimed = True
        if reclaimed:
            self._pass_lane(db)

    def heartbeat(self, batch_id: str) -> bool:
        """Renew a batch's lease (long tasks call this); False when it holds no active reservation."""
        lease = time.time() + self.config.reservation_lease_hours * 3600
        with self._transaction() as db:
            cur = db.execute(text("UPDATE reservations SET lease_expires = :lease WHERE batch_id = :b "
                                  "AND status = 'active'"), {"lease": lease, "b": batch_id})
            return cur.rowcount == 1

    def release(self, batch_id: str) -> bool:
        """End a batch's reservation (its cleanup ran); False when there was none active."""
        with self._transaction() as db:
            cur = db.execute(text("UPDATE reservations SET status = 'released' WHERE batch_id = :b "
                                  "AND status = 'active'"), {"b": batch_id})
            done = cur.rowcount == 1
            if done:
                self._pass_lane(db)
        if done:
            self.sample(f"{batch_id} released")  # measured after the lock is let go
            log.info("released the reservation of %s", batch_id)
        return done

    # ---- history ------------------------------------------------------------------------------

    def record_deletion(self, path: str, nbytes: int, reason: str, *, batch_id: str | None = None,
                        dataset_id: str | None = None) -> None:
        with self._transaction() as db:
            db.execute(text("INSERT INTO deletions (time, batch_id, dataset_id, path, bytes, reason) "
                            "VALUES (:t, :b, :d, :p, :n, :r)"),
                       {"t": time.time(), "b": batch_id, "d": dataset_id, "p": path, "n": int(nbytes), "r": reason})

    def record_expansion(self, dataset_id: str, fmt: str, raw_bytes: int, processed_bytes: int) -> None:
        """Measured processed/raw bytes for a dataset, so later estimates for ``fmt`` improve."""
        if raw_bytes <= 0:
            return
        with self._transaction() as db:
            db.execute(text("INSERT INTO expansion (time, dataset_id, format, raw_bytes, processed_bytes) "
                            "VALUES (:t, :d, :f, :r, :p)"),
                       {"t": time.time(), "d": dataset_id, "f": fmt, "r": int(raw_bytes), "p": int(processed_bytes)})

    def expansion_factor(self, fmt: str | None) -> float:
        """Processed bytes per raw byte for ``fmt``: measured here (byte-weighted), else a seed value
        for known formats, else ``storage.default_expansion``."""
        if fmt:
            with self._connect() as db:
                raw, processed = db.execute(text(
                    "SELECT SUM(raw_bytes), SUM(processed_bytes) FROM expansion WHERE format = :f"), {"f": fmt}).one()
            if raw:
                return int(processed) / int(raw)
            if fmt in SEED_EXPANSION:
                return SEED_EXPANSION[fmt]
        return self.config.default_expansion

    def expansion_table(self) -> dict[str, dict[str, float]]:
        with self._connect() as db:
            rows = db.execute(text("SELECT format, COUNT(*), SUM(raw_bytes), SUM(processed_bytes) FROM expansion "
                                   "GROUP BY format ORDER BY format")).fetchall()
        return {f: {"datasets": n, "raw_bytes": int(r), "processed_bytes": int(p), "factor": int(p) / int(r)}
                for f, n, r, p in rows}

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

    def _insert_sample(self, db: Connection, usage: dict[str, int], reserved: int, free: int,
                       event: str | None) -> None:
        db.execute(text(f"INSERT INTO samples ({', '.join(SAMPLE_KEYS)}) VALUES "
                        f"({', '.join(':' + k for k in SAMPLE_KEYS)})"),
                   {"time": time.time(), **{k: usage[k] for k in ("data", "models", "cache", "outputs")},
                    "reserved": reserved, "free": free, "budget": self.config.max_storage_bytes, "event": event})
