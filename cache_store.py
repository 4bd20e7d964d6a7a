"""The SQLite store behind the cache: a narrow interface that knows nothing of HTTP.

The contract (``get``, ``put``, ``record_hit``, ``delete``, ``clear``, ``stats``, ``flush``,
``close``) is what a second backend implements; ``tests/test_cache_store.py`` holds the shared
contract tests. The table is the original server's ``completions`` table, so a database it wrote
keeps serving hits; schema changes after that go through the numbered migrations below.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("computer_use_cache.store")


class StoreError(Exception):
    """The store could not do what was asked; callers answer without the cache."""


@dataclass(frozen=True)
class CachedEntry:
    key: str
    mode: str
    model: str
    response_json: str
    created_at: float
    updated_at: float
    hits: int


@dataclass(frozen=True)
class NewEntry:
    key: str
    mode: str
    model: str
    request_json: str
    response_json: str


def _m001_initial(db: sqlite3.Connection) -> None:
    """The original server's table, unchanged, so its database files keep working."""
    db.execute(
        """CREATE TABLE IF NOT EXISTS completions (
            cache_key TEXT PRIMARY KEY,
            mode TEXT NOT NULL,
            model TEXT NOT NULL,
            request_json TEXT NOT NULL,
            response_json TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            last_hit_at REAL,
            hits INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute("CREATE INDEX IF NOT EXISTS idx_completions_model ON completions(model)")
    db.execute("CREATE INDEX IF NOT EXISTS idx_completions_updated_at ON completions(updated_at)")


def _m002_counters(db: sqlite3.Connection) -> None:
    """Running totals kept by triggers, so stats never scan the table however large it grows."""
    db.execute("CREATE TABLE IF NOT EXISTS cache_counters (name TEXT PRIMARY KEY, value REAL NOT NULL)")
    db.execute(
        """INSERT OR REPLACE INTO cache_counters(name, value)
           SELECT 'entries', count(*) FROM completions
           UNION ALL SELECT 'hits', coalesce(sum(hits), 0) FROM completions
           UNION ALL SELECT 'stored_bytes',
                  coalesce(sum(length(CAST(request_json AS BLOB))
                               + length(CAST(response_json AS BLOB))), 0) FROM completions"""
    )
    # One statement per execute: executescript() would commit the migration's transaction.
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_count_insert AFTER INSERT ON completions BEGIN
            UPDATE cache_counters SET value = value + 1 WHERE name = 'entries';
            UPDATE cache_counters SET value = value + NEW.hits WHERE name = 'hits';
            UPDATE cache_counters SET value = value + length(CAST(NEW.request_json AS BLOB))
                + length(CAST(NEW.response_json AS BLOB)) WHERE name = 'stored_bytes';
        END"""
    )
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_count_delete AFTER DELETE ON completions BEGIN
            UPDATE cache_counters SET value = value - 1 WHERE name = 'entries';
            UPDATE cache_counters SET value = value - OLD.hits WHERE name = 'hits';
            UPDATE cache_counters SET value = value - length(CAST(OLD.request_json AS BLOB))
                - length(CAST(OLD.response_json AS BLOB)) WHERE name = 'stored_bytes';
        END"""
    )
    # Separate UPDATE OF triggers: a hit-counter flush must not re-measure the stored texts.
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_count_hits AFTER UPDATE OF hits ON completions
        BEGIN
            UPDATE cache_counters SET value = value + NEW.hits - OLD.hits WHERE name = 'hits';
        END"""
    )
    db.execute(
        """CREATE TRIGGER IF NOT EXISTS completions_count_bytes
        AFTER UPDATE OF request_json, response_json ON completions BEGIN
            UPDATE cache_counters SET value = value
                + length(CAST(NEW.request_json AS BLOB)) + length(CAST(NEW.response_json AS BLOB))
                - length(CAST(OLD.request_json AS BLOB)) - length(CAST(OLD.response_json AS BLOB))
                WHERE name = 'stored_bytes';
        END"""
    )


MIGRATIONS: tuple[tuple[int, str, Callable[[sqlite3.Connection], None]], ...] = (
    (1, "initial", _m001_initial),
    (2, "counters", _m002_counters),
)


class SQLiteStore:
    """Cache entries in one SQLite file, shared safely by threads and worker processes.

    Each thread of each process opens its own connection on first use (never before a fork) and
    keeps it. Hits only read: their counters are summed in memory and written in one batch every
    ``hit_flush_seconds`` and on ``flush``/``close``, so a hit never waits for a write lock.
    """

    def __init__(
        self,
        path: str,
        ttl_seconds: float = 0,
        *,
        clock: Callable[[], float] = time.time,
        hit_flush_seconds: float = 1.0,
        busy_timeout_ms: int = 5000,
    ):
        self.path = path
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.hit_flush_seconds = hit_flush_seconds
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._lock = threading.Lock()
        # One writer per process at a time: threads queue on this lock and wake the moment it is
        # free, instead of meeting SQLite's busy handler, which sleeps in growing steps (up to
        # 100 ms) while another connection holds the write lock.
        self._write_lock = threading.Lock()
        self._pending_hits: dict[str, list[float]] = {}
        self._schema_ready_pid: int | None = None
        self._flusher_pid: int | None = None
        self._flusher_stop = threading.Event()
        self._connections: list[sqlite3.Connection] = []

    # -- connections -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # WAL: readers never block the writer nor each other, across processes.
        db.execute("PRAGMA journal_mode=WAL")
        # Wait for a competing writer instead of failing at once with SQLITE_BUSY.
        db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        # NORMAL under WAL: a power cut may lose the last commits, never corrupt the file;
        # the right trade for a cache, and it takes the fsync off every commit.
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _db(self) -> sqlite3.Connection:
        local = self._local
        pid = os.getpid()
        if getattr(local, "pid", None) != pid:
            # First use in this thread, or a connection inherited across fork: open our own.
            try:
                local.db = self._connect()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open cache database: {exc}") from exc
            local.pid = pid
            with self._lock:
                if self._flusher_pid != pid:
                    self._connections = []
                self._connections.append(local.db)
            self._ensure_schema(local.db, pid)
        return local.db

    def _ensure_schema(self, db: sqlite3.Connection, pid: int) -> None:
        with self._lock:
            if self._schema_ready_pid == pid:
                return
            try:
                self._migrate(db)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot prepare cache database: {exc}") from exc
            self._schema_ready_pid = pid
            self._start_flusher(pid)

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            for version, name, migrate in MIGRATIONS:
                if version not in applied:
                    migrate(db)
                    db.execute(
                        "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                        (version, name, time.time()),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _write(self, statements: Callable[[sqlite3.Connection], object]) -> object:
        """Run one write transaction; BEGIN IMMEDIATE so read-then-write never fails as locked."""
        db = self._db()
        try:
            with self._write_lock:
                return self._transaction(db, statements)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    @staticmethod
    def _transaction(db: sqlite3.Connection, statements: Callable[[sqlite3.Connection], object]) -> object:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = statements(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    # -- the contract ------------------------------------------------------------------------

    def is_expired(self, created_at: float, now: float | None = None) -> bool:
        if self.ttl_seconds <= 0:
            return False
        return (self.clock() if now is None else now) - created_at > self.ttl_seconds

    def get(self, key: str) -> CachedEntry | None:
        """The live entry for key, or None (absent, expired, or unreadable)."""
        try:
            row = self._db().execute(
                "SELECT mode, model, response_json, created_at, updated_at, hits "
                "FROM completions WHERE cache_key = ?",
                (key,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        if row is None or self.is_expired(row[3]):
            return None
        return CachedEntry(key, *row)

    def put(self, entry: NewEntry) -> str:
        """Insert or replace; "stored" for a new (or expired) entry, "updated" otherwise.

        Replacing a live entry keeps its created_at, so the TTL counts from the first store.
        """
        now = self.clock()

        def upsert(db: sqlite3.Connection) -> str:
            row = db.execute(
                "SELECT created_at FROM completions WHERE cache_key = ?", (entry.key,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO completions(cache_key, mode, model, request_json, response_json, "
                    "created_at, updated_at, last_hit_at, hits) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, 0)",
                    (entry.key, entry.mode, entry.model, entry.request_json, entry.response_json,
                     now, now),
                )
                return "stored"
            if self.is_expired(row[0], now):
                db.execute(
                    "UPDATE completions SET mode = ?, model = ?, request_json = ?, response_json = ?, "
                    "created_at = ?, updated_at = ?, last_hit_at = NULL, hits = 0 WHERE cache_key = ?",
                    (entry.mode, entry.model, entry.request_json, entry.response_json, now, now,
                     entry.key),
                )
                return "stored"
            db.execute(
                "UPDATE completions SET mode = ?, model = ?, request_json = ?, response_json = ?, "
                "updated_at = ? WHERE cache_key = ?",
                (entry.mode, entry.model, entry.request_json, entry.response_json, now, entry.key),
            )
            return "updated"

        return self._write(upsert)  # type: ignore[return-value]

    def record_hit(self, key: str) -> None:
        """Count a hit in memory; written with the next batch, not on the request path."""
        now = self.clock()
        with self._lock:
            pending = self._pending_hits.get(key)
            if pending is None:
                self._pending_hits[key] = [1, now]
            else:
                pending[0] += 1
                pending[1] = now

    def delete(self, key: str) -> bool:
        return bool(self._write(
            lambda db: db.execute("DELETE FROM completions WHERE cache_key = ?", (key,)).rowcount
        ))

    def clear(self) -> int:
        with self._lock:
            self._pending_hits.clear()
        return int(self._write(lambda db: db.execute("DELETE FROM completions").rowcount))  # type: ignore[arg-type]

    def stats(self) -> dict:
        """The original's stats fields, from running totals: O(1) in the number of entries."""
        self.flush()
        try:
            db = self._db()
            counters = dict(db.execute("SELECT name, value FROM cache_counters"))
            (last_updated_at,) = db.execute("SELECT max(updated_at) FROM completions").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        return {
            "entries": int(counters.get("entries", 0)),
            "hits": int(counters.get("hits", 0)),
            "last_updated_at": last_updated_at,
            "db_path": self.path,
            "ttl_seconds": self.ttl_seconds,
            "stored_bytes": int(counters.get("stored_bytes", 0)),
        }

    def flush(self) -> None:
        """Write the hit counters gathered in memory, in one transaction."""
        with self._lock:
            if not self._pending_hits:
                return
            batch, self._pending_hits = self._pending_hits, {}
        rows = [(int(count), last_at, key) for key, (count, last_at) in batch.items()]
        try:
            self._write(lambda db: db.executemany(
                "UPDATE completions SET hits = hits + ?, "
                "last_hit_at = max(coalesce(last_hit_at, 0), ?) WHERE cache_key = ?",
                rows,
            ))
        except StoreError as exc:
            log.warning("could not write %d hit counters, will retry: %s", len(rows), exc)
            with self._lock:
                for key, (count, last_at) in batch.items():
                    pending = self._pending_hits.setdefault(key, [0, last_at])
                    pending[0] += count
                    pending[1] = max(pending[1], last_at)

    def close(self) -> None:
        """Flush pending hits and close this process's connections (graceful shutdown)."""
        self._flusher_stop.set()
        try:
            self.flush()
        except StoreError as exc:  # pragma: no cover - logged, the process is exiting anyway
            log.warning("hit counters lost on close: %s", exc)
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            try:
                db.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
        self._schema_ready_pid = None
        self._flusher_pid = None

    # -- background hit flusher --------------------------------------------------------------

    def _start_flusher(self, pid: int) -> None:
        if self._flusher_pid == pid or self.hit_flush_seconds <= 0:
            return
        self._flusher_pid = pid
        self._flusher_stop = threading.Event()
        thread = threading.Thread(
            target=self._flush_forever, args=(self._flusher_stop,), name="cache-hit-flusher",
            daemon=True,
        )
        thread.start()

    def _flush_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.hit_flush_seconds):
            try:
                self.flush()
            except Exception:  # keep flushing whatever one batch did
                log.exception("hit counter flush failed")

